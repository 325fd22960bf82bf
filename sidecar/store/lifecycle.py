"""The customer lifecycle in a store: subscription rows, which customers a subscriber names, when an
ending customer's usage is sealed (`final_seal`) and what a change of state does (`step`), and what
an operator must see (each customer's state, usage parked after an end, final usage overdue).

The rules of notifications (what one means, which one wins) are `sidecar.subscriptions`; the SQL
here serves both stores (`Buckets.apply_notice` in SQLite, `FleetStore.apply_notice` in PostgreSQL);
the SQLite functions run inside a caller's transaction.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sidecar.clock import HOUR_S, hour_start
from sidecar.model import Scheme
from sidecar.subscriptions import Change, Notice, Subscription, SubscriptionState, subscriber_of

FINAL_USAGE_DUE_S = 1800  # final usage not accepted this long after an end began: alarm


def subscribers_of(customer: str, account: str | None) -> tuple[str, ...]:
    """The subscribers a customer key follows: its account (or identifier), the key itself (one
    licence's end), and the account noted for an identifier customer (`customer_accounts`).
    `subscribers_sql` is the same rule in SQL."""
    own = subscriber_of(customer)
    return tuple(s for s in (own, customer, None if account is None else f"{Scheme.ACCOUNT}{account}") if s)


def subscriber_sql(column: str, *, pg: bool = False) -> str:
    """SQL for the subscriber of the customer key in `column` ('account:<id>/<arn>' → 'account:<id>'),
    in SQLite's dialect or PostgreSQL's (no '%', so it is safe beside query parameters)."""
    account = f"split_part({column}, '/', 1)" if pg else f"substr({column}, 1, instr({column}, '/') - 1)"
    return f"CASE WHEN substr({column}, 1, 8) = 'account:' THEN {account} ELSE {column} END"


# Parked rows are per dimension, and each event adds to every dimension's row: the events of a
# customer-hour are the most any of its dimensions counted (every event counts one request).
PARKED_EVENTS_SQL = ("SELECT customer, hour, max(events) AS events FROM parked WHERE state = 'ended'"
                     " GROUP BY customer, hour")


def subscribers_sql(column: str, *, pg: bool = False) -> str:
    """`subscribers_of` in SQL, as an IN list, for the customer key in `column`."""
    return (f"{subscriber_sql(column, pg=pg)}, {column},"
            f" (SELECT 'account:' || ca.aws_account_id FROM customer_accounts ca WHERE ca.customer = {column})")


def rows_sql(*, pg: bool = False) -> str:
    """Every subscriber's row with the events parked after its end and its records not yet accepted."""
    return (f"WITH ended AS ({PARKED_EVENTS_SQL})"
            " SELECT s.*, (SELECT CAST(coalesce(sum(e.events), 0) AS BIGINT) FROM ended e"
            f" WHERE s.subscriber IN ({subscribers_sql('e.customer', pg=pg)}))"
            " AS parked_events, (SELECT count(*) FROM records r WHERE r.state IN ('pending', 'held')"
            f"   AND s.subscriber IN ({subscribers_sql('r.customer', pg=pg)})) AS unaccepted_records"
            " FROM subscriptions s ORDER BY s.subscriber")


PARKED_AFTER_END_SQL = ("SELECT count(DISTINCT customer) AS customers,"
                        " CAST(coalesce(sum(events), 0) AS BIGINT) AS events"
                        f" FROM ({PARKED_EVENTS_SQL}) x")


@dataclass(frozen=True, slots=True, kw_only=True)
class NoticeResult:
    """What applying one notification did."""

    changed: bool  # False: a duplicate or an older notification (nothing written)
    state: str | None  # the subscriber's state afterwards
    sealed: int = 0  # buckets sealed at once (an agreement ending)
    frozen: int = 0
    parked: int = 0  # open buckets parked (the subscription ended)


def read(conn: sqlite3.Connection, subscriber: str) -> Subscription | None:
    """The stored subscription of `subscriber`, if any notification was applied."""
    row = conn.execute("SELECT * FROM subscriptions WHERE subscriber = ?", (subscriber,)).fetchone()
    return None if row is None else from_row(row)


def from_row(row: Any) -> Subscription:
    """A Subscription from a stored row (SQLite or PostgreSQL)."""
    def opt(name: str) -> int | None:
        return None if row[name] is None else int(row[name])

    return Subscription(subscriber=row["subscriber"], state=SubscriptionState(row["state"]),
                        state_at=int(row["state_at"]), subscribed_at=opt("subscribed_at"),
                        end_began_at=opt("end_began_at"), ended_at=opt("ended_at"), failed_at=opt("failed_at"))


def row_values(sub: Subscription, notice: Notice, now: float) -> tuple[Any, ...]:
    """The values of a subscriptions row, in the column order of `UPSERT`."""
    return (sub.subscriber, sub.state.value, sub.state_at, sub.subscribed_at, sub.end_began_at, sub.ended_at,
            sub.failed_at, notice.product_code, notice.kind, int(now))


UPSERT = (
    "INSERT INTO subscriptions (subscriber, state, state_at, subscribed_at, end_began_at, ended_at, failed_at,"
    " product_code, last_kind, updated_at) VALUES ({p},{p},{p},{p},{p},{p},{p},{p},{p},{p})"
    " ON CONFLICT (subscriber) DO UPDATE SET state = excluded.state, state_at = excluded.state_at,"
    " subscribed_at = excluded.subscribed_at, end_began_at = excluded.end_began_at,"
    " ended_at = excluded.ended_at, failed_at = excluded.failed_at,"
    " product_code = coalesce(excluded.product_code, subscriptions.product_code),"
    " last_kind = excluded.last_kind, updated_at = excluded.updated_at")


def write(conn: sqlite3.Connection, sub: Subscription, notice: Notice, now: float) -> None:
    """Store a subscriber's new subscription."""
    conn.execute(UPSERT.format(p="?"), row_values(sub, notice, now))


LICENCE_ID = re.compile(r"(l-[0-9A-Za-z]+)\Z")


def licence_id(arn: str) -> str | None:
    """The `l-…` id at the end of a licence ARN (events and ResolveCustomer may spell the rest apart)."""
    found = LICENCE_ID.search(arn)
    return None if found is None else found.group(1)


def scoped(notice: Notice, customers: Iterable[str]) -> tuple[Notice, list[str]]:
    """The notice as it applies, and the customers (of those its subscriber names) it applies to.

    A licence's end (License Deprovisioned names the licence) applies to that licence's customer
    only, not to every licence of the account (a replaced agreement deprovisions the old licence
    while the new one is in use): its subscriber becomes that customer's key, found among the
    account's customers by the licence id (else the key the event names, which matches nothing)."""
    named = list(customers)
    if notice.change != Change.ENDED or not notice.license_arn or not notice.subscriber.startswith(Scheme.ACCOUNT):
        return notice, named
    wanted = licence_id(notice.license_arn)
    same = [c for c in named if wanted is not None and c.startswith(Scheme.ACCOUNT) and licence_id(c) == wanted]
    if len(same) == 1:
        return dataclasses.replace(notice, subscriber=same[0]), same
    return dataclasses.replace(notice, subscriber=f"{notice.subscriber}/{notice.license_arn}"), []


class Step(StrEnum):
    """What a change of subscription state does to the customer's usage."""

    SEAL = "seal"  # an end began: seal and freeze their open usage now, to be sent first
    PARK = "park"  # the end is final: park their open usage
    NONE = "none"


def step(current: Subscription | None, new: Subscription) -> Step:
    """The step a subscriber's change from `current` to `new` takes (sealing once, at the change)."""
    if new.state == SubscriptionState.PENDING_END:
        return Step.SEAL if current is None or current.state != new.state else Step.NONE
    return Step.PARK if new.state == SubscriptionState.ENDED else Step.NONE


def customers_of(conn: sqlite3.Connection, subscriber: str) -> list[str]:
    """The stored customer keys a subscriber names: an account's every licence of this product, or
    one customer (an identifier, or one licence's key after a licence's end)."""
    if "/" in subscriber:
        return [r[0] for r in conn.execute("SELECT customer FROM customers WHERE customer = ?", (subscriber,))]
    if subscriber.startswith(Scheme.ACCOUNT):  # its licences, and identifier customers of that account
        prefix = subscriber + "/"
        return [r[0] for r in conn.execute(
            "SELECT customer FROM customers WHERE customer >= ? AND customer < ?"
            " UNION SELECT customer FROM customer_accounts WHERE aws_account_id = ? ORDER BY 1",
            (prefix, prefix[:-1] + "0", subscriber.removeprefix(Scheme.ACCOUNT)))]
    return [r[0] for r in conn.execute("SELECT customer FROM customers WHERE customer = ?", (subscriber,))]


def ending(conn: sqlite3.Connection) -> dict[str, int]:
    """Subscribers whose agreement is ending, with when the end began."""
    return {r[0]: int(r[1] if r[1] is not None else r[2]) for r in conn.execute(
        "SELECT subscriber, end_began_at, state_at FROM subscriptions WHERE state = 'pending_end'")}


def final_seal(*, now: float, began: int, final_seal_s: int) -> tuple[int, bool]:
    """For a customer whose agreement began to end at `began`: seal their buckets of hours starting
    before the returned hour, and whether that seal settles their remainder.

    AWS takes their records for about an hour after the end began, one record per hour. Their usage
    of the hour the end began in was sealed at once; what comes after goes into a later hour's
    bucket, which waits until SIDECAR_FINAL_SEAL_S after the end began (or its hour is over) so that
    it holds as much of the last hour as possible; from then on every hour is sealed as soon as it
    begins. Remainders are settled in the first hour after that deadline only (not every hour of a
    customer left ending), as they would be lost at the end."""
    deadline = began + final_seal_s
    if now < deadline:
        return hour_start(now), False
    return hour_start(now) + HOUR_S, now < deadline + HOUR_S


def by_state(conn: sqlite3.Connection, state: SubscriptionState) -> set[str]:
    """The subscribers in `state`."""
    return {r[0] for r in conn.execute("SELECT subscriber FROM subscriptions WHERE state = ?", (state.value,))}


def rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every subscriber's state, times, usage parked after an end and records not yet accepted (none
    in a file of an earlier release that nothing has migrated yet, read by `sidecar usage`)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'subscriptions'").fetchone() is None:
        return []
    return [dict(r) for r in conn.execute(rows_sql())]


def overdue(row: dict[str, Any], *, now: float) -> bool:
    """Whether an end began over FINAL_USAGE_DUE_S ago and records of the customer are still unaccepted."""
    began = row.get("end_began_at")
    return (row["state"] in (SubscriptionState.PENDING_END, SubscriptionState.ENDED) and began is not None
            and now - int(began) >= FINAL_USAGE_DUE_S and int(row["unaccepted_records"]) > 0)


def summary(conn: sqlite3.Connection, *, now: float) -> dict[str, Any]:
    """The lifecycle's figures for /healthz and /metrics: customers per state, usage parked after an
    end, customers whose final usage is overdue."""
    subs = rows(conn)
    parked = dict(conn.execute(PARKED_AFTER_END_SQL).fetchone())  # parked is older than this release
    return summarize(subs, parked, now=now)


def summarize(all_rows: list[dict[str, Any]], parked: dict[str, Any], *, now: float) -> dict[str, Any]:
    """The lifecycle's figures from the subscription rows and the usage parked after an end."""
    states: dict[str, int] = {}
    for r in all_rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    return {"customers_by_state": states, "parked_after_end_customers": int(parked["customers"]),
            "parked_after_end_events": int(parked["events"]),
            "final_usage_overdue": [r["subscriber"] for r in all_rows if overdue(r, now=now)]}
