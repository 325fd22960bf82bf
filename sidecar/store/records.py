"""Metering records: freezing sealed buckets, claiming due records, and recording outcomes.

Every function here runs inside a write transaction on the writer thread (see `Store.run`).
A record's fields and payload are written once, by `freeze`, and never change; only its
delivery state moves. The bucket row mirrors the record's state so /usage shows one state.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from sidecar.config import MAX_QUANTITY, Dimension
from sidecar.model import REPLAYABLE, HoldOutcome, Outcome, RecordState
from sidecar.store.lifecycle import subscribers_sql
from sidecar.usage import BucketKey, Delta, guardrail, record_timestamp

if TYPE_CHECKING:  # buckets imports this module; the rules object is only passed in
    from sidecar.store.buckets import Buckets

log = structlog.get_logger("sidecar.records")

HISTORY_S = 7 * 24 * 3600  # the spike rule compares with the customer's last 7 days


def certainly_refused(aws_status: str | None) -> bool:
    """Whether AWS's answer means the record was certainly not billed (so it may be rebuilt).

    CustomerNotSubscribed per record, or a request-level refusal for the record's content
    (InvalidUsageDimension…, InvalidProductCode…, DisabledApi…) isolated to it by bisection.
    """
    s = aws_status or ""
    return s == "CustomerNotSubscribed" or (s.startswith("Invalid") and s.endswith("Exception")) \
        or s == "DisabledApiException"


@dataclass(frozen=True, kw_only=True)
class Guard:
    """What freezing needs to check a record before anything leaves: the store's one rule for what
    the running configuration can bill, and each dimension's limits."""

    dimensions: Mapping[str, Dimension]
    spike_factor: float
    unbillable: Callable[[str, int], str | None]  # why usage of (dimension, raw unit) cannot be billed


@dataclass(frozen=True, slots=True)
class DueRecord:
    """A frozen record ready to send: its id and the exact UsageRecord to put on the wire."""

    id: int
    payload: Mapping[str, Any]
    scheme: str  # "identifier" (needs the call's ProductCode) or "license"
    product_code: str | None
    timestamp: int
    maybe_received: bool
    attempts: int

    @property
    def match_key(self) -> tuple[str, str, str, int]:
        """How AWS's per-record results are matched back: customer, dimension, timestamp."""
        p = self.payload
        who = p.get("CustomerIdentifier") or f"{p.get('CustomerAWSAccountId')}/{p.get('LicenseArn')}"
        return (self.scheme, who, str(p["Dimension"]), int(p["Timestamp"]))


def payload_json(payload: Mapping[str, Any]) -> str:
    """The canonical serialization a record is frozen with."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def window_closes_at(timestamp: int, *, window_s: int, margin_s: int) -> int:
    """When the sidecar stops trying a record: AWS's window (timestamp + window, and the
    previous-month cut-off at 06:00 UTC on the 1st) minus a safety margin."""
    ts = datetime.fromtimestamp(timestamp, UTC)
    first_next = datetime(ts.year + (ts.month == 12), ts.month % 12 + 1, 1, 6, tzinfo=UTC)
    return min(timestamp + window_s, int(first_next.timestamp())) - margin_s


def aws_accepts(timestamp: int, *, now: float, window_s: int) -> bool:
    """Whether AWS would accept a record with this timestamp now (no margin)."""
    return timestamp <= now and now < window_closes_at(timestamp, window_s=window_s, margin_s=0)


def build_payload(r: Mapping[str, Any], *, dimension: str, quantity: int, timestamp: int,
             product_code: str | None) -> tuple[dict[str, Any], str | None] | None:
    """The UsageRecord for a customer row, and the call's ProductCode; None when a ProductCode is
    needed (CustomerIdentifier customers) and not configured."""
    payload: dict[str, Any] = {"Timestamp": timestamp, "Dimension": dimension, "Quantity": quantity}
    if r["customer_identifier"] is not None:
        if not product_code:
            return None
        payload["CustomerIdentifier"] = r["customer_identifier"]
        return payload, product_code
    payload["CustomerAWSAccountId"] = r["aws_account_id"]
    payload["LicenseArn"] = r["license_arn"]
    return payload, None


def _check_guardrails(conn: sqlite3.Connection, guard: Guard, *, customer: str, dimension: str, hour: int,
                      quantity: int) -> str | None:
    """Why this record must be held (ceiling or spike against the customer's history), or None."""
    dim = guard.dimensions.get(dimension)
    if dim is None:
        return f"dimension {dimension!r} is not configured"
    history = conn.execute(
        "SELECT max(quantity) FROM records WHERE customer = ? AND dimension = ? AND hour >= ? AND hour < ?"
        " AND state = 'sent'", (customer, dimension, hour - HISTORY_S, hour)).fetchone()[0]
    return guardrail(quantity, ceiling=dim.ceiling, floor=dim.floor, spike_factor=guard.spike_factor,
                     history_max=history)


def _hold_or_pend(conn: sqlite3.Connection, guard: Guard, record_id: int, *, customer: str, dimension: str,
                  hour: int, quantity: int, now: float) -> str:
    """Put a freshly (re)built record in `pending`, or in `held` when a guardrail trips (logged as an error)."""
    rule = _check_guardrails(conn, guard, customer=customer, dimension=dimension, hour=hour, quantity=quantity)
    state = RecordState.PENDING if rule is None else RecordState.HELD
    _set_state(conn, record_id, state)
    if rule is not None:
        conn.execute("INSERT INTO holds (record_id, rule, held_at) VALUES (?,?,?) ON CONFLICT (record_id) DO UPDATE"
                     " SET rule = excluded.rule, held_at = excluded.held_at, released_at = NULL, outcome = NULL",
                     (record_id, rule, int(now)))
        log.error("record_held", record=record_id, customer=customer, dimension=dimension, hour=hour,
                  quantity=quantity, rule=rule, hint="check it, then `sidecar release --state held`")
    return state


def freeze(conn: sqlite3.Connection, *, now: float, product_code: str | None, guard: Guard) -> int:
    """Turn every sealed bucket into exactly one stored record (payload frozen), state pending
    (or held, when a guardrail trips: a quantity above the dimension's ceiling, or a spike)."""
    rows = conn.execute(
        "SELECT b.customer, b.dimension, b.hour, b.quantity, b.first_event_at, b.unit, b.events,"
        " c.aws_account_id, c.license_arn, c.customer_identifier"
        " FROM buckets b JOIN customers c ON c.customer = b.customer"
        " WHERE b.state = 'sealed' ORDER BY b.hour"
    ).fetchall()
    frozen = 0
    for r in rows:
        why = guard.unbillable(r["dimension"], r["unit"])
        if why is not None:
            # Sealed under another configuration and never frozen (no ProductCode then, or a crash
            # between sealing and freezing): its quantity is in a unit this release does not bill.
            park(conn, customer=r["customer"], dimension=r["dimension"], hour=r["hour"], unit=r["unit"],
                 raw=r["quantity"] * r["unit"], events=r["events"], first_event_at=r["first_event_at"],
                 reason=why, now=int(now))
            conn.execute("UPDATE buckets SET state = 'carried' WHERE customer = ? AND dimension = ? AND hour = ?",
                         (r["customer"], r["dimension"], r["hour"]))
            continue
        ts = record_timestamp(r["hour"], r["first_event_at"])
        built = build_payload(r, dimension=r["dimension"], quantity=r["quantity"], timestamp=ts,
                              product_code=product_code)
        if built is None:
            log.error("product_code_missing", customer=r["customer"],
                      hint="set SIDECAR_PRODUCT_CODE to send CustomerIdentifier records")
            continue
        payload, code = built
        cur = conn.execute(
            "INSERT INTO records (customer, dimension, hour, timestamp, quantity, aws_account_id, license_arn,"
            " customer_identifier, product_code, payload, state, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?, 'pending', ?)",
            (r["customer"], r["dimension"], r["hour"], ts, r["quantity"], r["aws_account_id"],
             r["license_arn"], r["customer_identifier"], code, payload_json(payload), int(now)),
        )
        assert cur.lastrowid is not None
        _hold_or_pend(conn, guard, cur.lastrowid, customer=r["customer"], dimension=r["dimension"], hour=r["hour"],
                      quantity=r["quantity"], now=now)
        frozen += 1
    return frozen


def park(conn: sqlite3.Connection, *, customer: str, dimension: str, hour: int, unit: int, raw: int, events: int,
         first_event_at: int, reason: str, now: int) -> None:
    """Keep usage the running configuration cannot bill (state `unconfigured`), visible, never sent."""
    conn.execute(
        "INSERT INTO parked (customer, dimension, unit, raw, events, first_event_at, hour, reason, parked_at, state)"
        " VALUES (?,?,?,?,?,?,?,?,?, 'unconfigured')",
        (customer, dimension, unit, raw, events, first_event_at, hour, reason, now))
    log.error("usage_parked", customer=customer, dimension=dimension, raw=raw, unit=unit, hour=hour, reason=reason,
              hint="configure the dimension, or `sidecar release --state unconfigured --dimension OLD=NEW`")


def park_ended(conn: sqlite3.Connection, *, customer: str, dimension: str, hour: int, unit: int, raw: int,
               events: int, first_event_at: int, now: int) -> None:
    """Keep usage of a customer whose subscription ended (state `ended`), visible, never sent: one
    row per customer, dimension, hour and unit, so a customer still sending traffic adds no rows."""
    cur = conn.execute(
        "UPDATE parked SET raw = raw + ?, events = events + ?, first_event_at = min(first_event_at, ?),"
        " parked_at = ? WHERE customer = ? AND dimension = ? AND hour = ? AND unit = ? AND state = 'ended'",
        (raw, events, first_event_at, now, customer, dimension, hour, unit))
    if cur.rowcount:
        return
    conn.execute(
        "INSERT INTO parked (customer, dimension, unit, raw, events, first_event_at, hour, reason, parked_at, state)"
        " VALUES (?,?,?,?,?,?,?,?,?, 'ended')",
        (customer, dimension, unit, raw, events, first_event_at, hour, ENDED_REASON, now))
    log.warning("usage_parked_after_end", customer=customer, dimension=dimension, raw=raw, hour=hour,
                note="the customer's subscription ended; AWS no longer accepts their records")


ENDED_REASON = "the customer's subscription ended (unsubscribe-success / License Deprovisioned)"


def resume_in_flight(conn: sqlite3.Connection) -> int:
    """At start-up: a send that was under way when the process died may have reached AWS."""
    cur = conn.execute(
        "UPDATE records SET in_flight = 0, maybe_received = 1,"
        " last_error = coalesce(last_error || '; ', '') || 'process stopped during a send; outcome unknown'"
        " WHERE in_flight = 1"
    )
    return cur.rowcount


def _set_state(conn: sqlite3.Connection, record_id: int, state: str, **fields: Any) -> None:
    cols = ", ".join(f"{k} = ?" for k in fields)
    conn.execute(
        f"UPDATE records SET state = ?, in_flight = 0{', ' + cols if cols else ''} WHERE id = ?",
        (state, *fields.values(), record_id),
    )
    conn.execute(
        "UPDATE buckets SET state = ? WHERE (customer, dimension, hour) ="
        " (SELECT customer, dimension, hour FROM records WHERE id = ?)",
        (state, record_id),
    )


def _add_carry(conn: sqlite3.Connection, customer: str, dimension: str, raw: int) -> None:
    """Add raw usage below a unit to the customer's carry for the dimension (its next sealed hour takes it)."""
    conn.execute("INSERT INTO carries (customer, dimension, raw) VALUES (?,?,?)"
                 " ON CONFLICT (customer, dimension) DO UPDATE SET raw = raw + excluded.raw",
                 (customer, dimension, raw))


def carry_into_open_hour(conn: sqlite3.Connection, rules: Buckets, record_id: int, *, now: float, reason: str,
                         into: Dimension | None = None) -> None:
    """Move a never-received record's usage into the current open hour of its customer, in raw
    units with the unit it was measured in (or into `into`, a configured dimension of the same
    source, with that dimension's unit). `rules.apply_deltas` parks what the configuration cannot bill."""
    r = conn.execute(
        "SELECT r.customer, r.dimension, r.quantity, b.unit FROM records r JOIN buckets b"
        " ON b.customer = r.customer AND b.dimension = r.dimension AND b.hour = r.hour WHERE r.id = ?",
        (record_id,),
    ).fetchone()
    raw = r["quantity"] * r["unit"]
    hour = rules.open_hour(now)
    dimension, unit = (r["dimension"], r["unit"]) if into is None else (into.name, into.raw_unit)
    deltas: dict[BucketKey, Delta] = {}
    if raw:
        deltas[(r["customer"], dimension, hour)] = Delta(unit=unit, raw=raw, events=0, carried_in=raw,
                                                          first_event_at=int(now))
    _set_state(conn, record_id, RecordState.CARRIED, last_error=f"{reason}; carried to {dimension} hour {hour}")
    rules.apply_deltas(conn, deltas)
    log.warning("record_carried", record=record_id, customer=r["customer"], dimension=r["dimension"],
                quantity=r["quantity"], to_dimension=dimension, to_hour=hour)


def close_window(conn: sqlite3.Connection, rules: Buckets, record: int, *, now: float, reason: str,
                 policy: str | None = None, into: Dimension | None = None) -> str:
    """A record whose window closed: unknown if AWS may have it, else carry or expire by `policy`
    (default: the configured `expired_policy`)."""
    row = conn.execute("SELECT maybe_received, customer, dimension, quantity FROM records WHERE id = ?",
                       (record,)).fetchone()
    if row["maybe_received"]:
        _set_state(conn, record, RecordState.UNKNOWN, last_error=f"{reason}; an earlier send may have been billed")
        log.error("record_outcome_unknown", record=record, customer=row["customer"],
                  dimension=row["dimension"], quantity=row["quantity"])
        return RecordState.UNKNOWN
    if (policy or rules.settings.expired_policy) == "carry":
        carry_into_open_hour(conn, rules, record, now=now, reason=reason, into=into)
        return RecordState.CARRIED
    _set_state(conn, record, RecordState.EXPIRED, last_error=reason)
    log.error("record_expired", record=record, customer=row["customer"], dimension=row["dimension"],
              quantity=row["quantity"])
    return RecordState.EXPIRED


def close_windows(conn: sqlite3.Connection, rules: Buckets, *, now: float) -> dict[str, int]:
    """Apply the window rule to every pending or held record that is not being sent right now."""
    counts: dict[str, int] = {}
    for r in conn.execute(
            "SELECT id, timestamp FROM records WHERE state IN ('pending', 'held') AND in_flight = 0").fetchall():
        if now >= rules.window_closes_at(r["timestamp"]):
            state = close_window(conn, rules, r["id"], now=now, reason="window closed before AWS accepted it")
            counts[state] = counts.get(state, 0) + 1
    return counts


DUE_SQL = ("SELECT id, payload, product_code, timestamp, maybe_received, attempts, customer_identifier"
           " FROM records WHERE state = 'pending' AND in_flight = 0 AND next_attempt_at <= ?")


def _due(conn: sqlite3.Connection, now: float, limit: int) -> list[DueRecord]:
    """Due records in send order: the final usage of customers whose agreement is ending first
    (AWS takes it for about one hour), then the oldest."""
    rows = []
    if conn.execute("SELECT 1 FROM subscriptions WHERE state = 'pending_end' LIMIT 1").fetchone():
        rows = conn.execute(
            DUE_SQL + " AND EXISTS (SELECT 1 FROM subscriptions s WHERE s.state = 'pending_end'"
            f" AND s.subscriber IN ({subscribers_sql('records.customer')})) ORDER BY timestamp, id LIMIT ?",
            (now, limit * 4)).fetchall()
    seen = {r["id"] for r in rows}
    rows += [r for r in conn.execute(DUE_SQL + " ORDER BY timestamp, id LIMIT ?", (now, limit * 4)).fetchall()
             if r["id"] not in seen]
    return pick_due(rows, limit)


def pick_due(rows: Sequence[Mapping[str, Any]], limit: int) -> list[DueRecord]:
    """From due rows in send order, the first `limit` of the first row's scheme and product (one
    call carries one ProductCode)."""
    if not rows:
        return []
    first_scheme = "identifier" if rows[0]["customer_identifier"] is not None else "license"
    first_product = rows[0]["product_code"]
    picked: list[DueRecord] = []
    for r in rows:
        scheme = "identifier" if r["customer_identifier"] is not None else "license"
        if scheme != first_scheme or r["product_code"] != first_product:
            continue  # one scheme and one product per call (the call carries one ProductCode)
        picked.append(DueRecord(id=r["id"], payload=json.loads(r["payload"]), scheme=scheme,
                                product_code=r["product_code"], timestamp=r["timestamp"],
                                maybe_received=bool(r["maybe_received"]), attempts=r["attempts"]))
        if len(picked) == limit:
            break
    return picked


def peek_due(conn: sqlite3.Connection, *, now: float, limit: int) -> list[DueRecord]:
    """Due records without claiming them (dry run)."""
    return _due(conn, now, limit)


def claim(conn: sqlite3.Connection, *, now: float, limit: int = 25, owner: str) -> list[DueRecord]:
    """The oldest due records of one scheme, marked in flight (by `owner`) before anything is sent."""
    picked = _due(conn, now, limit)
    conn.executemany("UPDATE records SET in_flight = 1, attempts = attempts + 1 WHERE id = ?",
                     [(r.id,) for r in picked])
    conn.executemany("INSERT INTO claims (record_id, owner, claimed_at) VALUES (?,?,?) ON CONFLICT (record_id)"
                     " DO UPDATE SET owner = excluded.owner, claimed_at = excluded.claimed_at",
                     [(r.id, owner, int(now)) for r in picked])
    return picked


@dataclass(frozen=True, slots=True, kw_only=True)
class Settlement:
    """How one record's send ended; all of one AWS answer are written in one transaction."""

    record: int
    outcome: Outcome  # retry: back to pending, due at next_attempt_at
    status: str | None = None  # AWS's per-record Status or error code
    metering_record_id: str | None = None
    error: str = ""
    maybe_received: bool = False  # retry: an earlier send of it may have landed
    next_attempt_at: float = 0.0


def settle(conn: sqlite3.Connection, settlements: Iterable[Settlement], *, now: float) -> None:
    """Write the outcomes of one call (see Settlement)."""
    for s in settlements:
        if s.outcome == Outcome.SENT:
            mark_sent(conn, s.record, status=s.status or "Success", metering_record_id=s.metering_record_id, now=now)
        elif s.outcome in (Outcome.CONFLICT, Outcome.REJECTED):
            mark_terminal(conn, s.record, state=s.outcome, status=s.status, error=s.error)
        elif s.outcome == Outcome.RETRY:
            mark_retry(conn, [s.record], error=s.error, maybe_received=s.maybe_received,
                       next_attempt_at={s.record: s.next_attempt_at})
        else:
            raise ValueError(f"unknown outcome {s.outcome!r}")


def mark_sent(conn: sqlite3.Connection, record: int, *, status: str, metering_record_id: str | None,
              now: float) -> None:
    """AWS accepted the record (Success, or a DuplicateRecord of our own earlier send)."""
    _set_state(conn, record, RecordState.SENT, aws_status=status, metering_record_id=metering_record_id,
               sent_at=int(now))


def mark_terminal(conn: sqlite3.Connection, record: int, *, state: str, status: str | None, error: str) -> None:
    """A definite refusal: rejected (e.g. CustomerNotSubscribed) or conflict (unexplained DuplicateRecord)."""
    _set_state(conn, record, state, aws_status=status, last_error=error)


def due_now(conn: sqlite3.Connection, *, held_until: float, now: float) -> int:
    """Pending records waiting for a retry time up to `held_until` become due now (a last chance at shutdown)."""
    return conn.execute(
        "UPDATE records SET next_attempt_at = ? WHERE state = 'pending' AND in_flight = 0 AND next_attempt_at <= ?",
        (now, held_until)).rowcount


def mark_retry(conn: sqlite3.Connection, records: Iterable[int], *, error: str, maybe_received: bool,
               next_attempt_at: Mapping[int, float]) -> None:
    """Back to pending, to be resent identically after its backoff."""
    for rid in records:
        conn.execute(
            "UPDATE records SET in_flight = 0, last_error = ?, next_attempt_at = ?,"
            " maybe_received = max(maybe_received, ?) WHERE id = ? AND in_flight = 1",
            (error, next_attempt_at[rid], int(maybe_received), rid),
        )


def replay(conn: sqlite3.Connection, rules: Buckets, *, states: Iterable[str], now: float,
           customer: tuple[str, list[Any]] | None, rename: Mapping[str, str]) -> dict[str, int]:
    """Re-drive terminal records.

    A rejected record AWS certainly did not bill (see `certainly_refused`) is rebuilt from its usage
    under the current configuration (ProductCode, dimension renamed by `rename`, its unit) and sent
    while AWS's window is open, or its usage is carried (with its unit) into the open hour when not.
    Any other rejected record is resent unchanged while the window is open. Conflicts, expired
    records and rejected ones past the window are carried into the open hour; a record whose
    earlier send may have been billed is never moved (it becomes `unknown`).
    `customer` is an SQL condition on the `customer` column with its arguments (exact matches).
    """
    guard = rules.guard
    states = [s for s in states if s in REPLAYABLE]
    if not states:
        return {}
    marks = ",".join("?" for _ in states)
    sql = ("SELECT id, customer, timestamp, state, dimension, aws_status, maybe_received FROM records"
           f" WHERE state IN ({marks})")
    args: list[Any] = list(states)
    if customer:
        sql += f" AND {customer[0]}"
        args += customer[1]
    counts = {"resent": 0, "rebuilt": 0, "carried": 0, "unknown": 0}
    renamed: set[tuple[str, str, str]] = set()  # (customer, OLD, NEW) whose OLD carry follows the usage
    for r in conn.execute(sql + " ORDER BY id", args).fetchall():
        if r["dimension"] in rename and rename[r["dimension"]] in guard.dimensions:
            renamed.add((r["customer"], r["dimension"], rename[r["dimension"]]))
        target = guard.dimensions.get(rename.get(r["dimension"], r["dimension"]))
        in_window = now < rules.window_closes_at(r["timestamp"])
        if r["state"] == RecordState.REJECTED and not r["maybe_received"] and certainly_refused(r["aws_status"]):
            if in_window and target is not None:
                done = _rebuild(conn, r["id"], target, now=now, guard=guard, product_code=rules.settings.product_code)
                if done is not None:
                    counts[done] += 1
                    continue
            state = close_window(conn, rules, r["id"], policy="carry", now=now, into=target,
                                 reason=f"replayed by operator from {r['state']} ({r['aws_status']})")
            counts[state] += 1
        elif r["state"] == RecordState.REJECTED and in_window:
            # Not certainly refused (an earlier send's answer was lost): only the identical record may go.
            _set_state(conn, r["id"], RecordState.PENDING, next_attempt_at=0, last_error="replayed by operator")
            counts["resent"] += 1
        else:
            state = close_window(conn, rules, r["id"], policy="carry", now=now,
                                 into=target if r["dimension"] in rename else None,
                                 reason=f"replayed by operator from {r['state']}")
            counts[state] += 1
    for who, old, new in sorted(renamed):
        moved = conn.execute("SELECT raw FROM carries WHERE customer = ? AND dimension = ?", (who, old)).fetchone()
        if moved and moved[0]:
            _add_carry(conn, who, new, moved[0])
            conn.execute("UPDATE carries SET raw = 0 WHERE customer = ? AND dimension = ?", (who, old))
            log.warning("remainder_renamed", customer=who, dimension=old, into=new, raw=moved[0])
    return counts


def _rebuild(conn: sqlite3.Connection, record_id: int, target: Dimension, *, now: float, guard: Guard,
             product_code: str | None) -> str | None:
    """Rebuild a certainly-refused record in place under the current configuration: "rebuilt", or
    "resent" when the configuration built the same record again; None when it cannot be (its renamed
    key is taken, or no ProductCode), so the caller carries its usage instead.

    The usage the record stood for (quantity x the unit it was measured in) is re-expressed in the
    target dimension's unit; what is left below one unit joins the customer's carry. The previous
    record is kept in `record_rebuilds`.
    """
    r = conn.execute(
        "SELECT r.*, b.unit AS bucket_unit, c.aws_account_id AS c_account, c.license_arn AS c_license,"
        " c.customer_identifier AS c_identifier FROM records r"
        " JOIN buckets b ON b.customer = r.customer AND b.dimension = r.dimension AND b.hour = r.hour"
        " JOIN customers c ON c.customer = r.customer WHERE r.id = ?", (record_id,)).fetchone()
    if target.name != r["dimension"] and conn.execute(
            "SELECT 1 FROM buckets WHERE customer = ? AND dimension = ? AND hour = ?",
            (r["customer"], target.name, r["hour"])).fetchone():
        return None
    usage = r["quantity"] * r["bucket_unit"]
    quantity = min(usage // target.raw_unit, MAX_QUANTITY)
    left = usage - quantity * target.raw_unit
    who = {"aws_account_id": r["c_account"], "license_arn": r["c_license"], "customer_identifier": r["c_identifier"]}
    built = build_payload(who, dimension=target.name, quantity=quantity, timestamp=r["timestamp"],
                     product_code=product_code)
    if built is None:
        return None
    payload, code = built
    if payload_json(payload) == r["payload"] and code == r["product_code"]:
        _set_state(conn, record_id, RecordState.PENDING, next_attempt_at=0, last_error="replayed by operator")
        return "resent"
    conn.execute(
        "INSERT INTO record_rebuilds (record_id, at, old_state, old_dimension, old_quantity, old_product_code,"
        " old_payload, old_aws_status, reason) VALUES (?,?,?,?,?,?,?,?,?)",
        (record_id, int(now), r["state"], r["dimension"], r["quantity"], r["product_code"], r["payload"],
         r["aws_status"], "AWS certainly did not bill it; rebuilt under the current configuration"))
    key = (r["customer"], r["dimension"], r["hour"])
    conn.execute("UPDATE buckets SET dimension = ?, unit = ?, quantity = ?, remainder = remainder + ?"
                 " WHERE customer = ? AND dimension = ? AND hour = ?",
                 (target.name, target.raw_unit, quantity, left, *key))
    conn.execute(
        "UPDATE records SET dimension = ?, quantity = ?, payload = ?, product_code = ?, aws_account_id = ?,"
        " license_arn = ?, customer_identifier = ?, attempts = 0, maybe_received = 0, in_flight = 0,"
        " next_attempt_at = 0, aws_status = NULL, metering_record_id = NULL,"
        " last_error = ? WHERE id = ?",
        (target.name, quantity, payload_json(payload), code, r["c_account"], r["c_license"], r["c_identifier"],
         f"rebuilt by operator from {r['dimension']} x {r['quantity']} ({r['aws_status']})", record_id))
    if left:
        _add_carry(conn, r["customer"], target.name, left)
    state = _hold_or_pend(conn, guard, record_id, customer=r["customer"], dimension=target.name, hour=r["hour"],
                          quantity=quantity, now=now)
    log.warning("record_rebuilt", record=record_id, customer=r["customer"], old_dimension=r["dimension"],
                old_quantity=r["quantity"], dimension=target.name, quantity=quantity, product_code=code, state=state)
    return "rebuilt"


def release_held(conn: sqlite3.Connection, *, customer: tuple[str, list[Any]] | None, dimension: str | None,
                 record_id: int | None, discard: bool, now: float) -> int:
    """An operator's decision on held records: send them (pending) or discard them (`discarded`:
    terminal and visible, never billed, and never picked up by `replay`)."""
    sql = "SELECT id, customer, dimension, hour, quantity FROM records WHERE state = 'held'"
    args: list[Any] = []
    if customer:
        sql += f" AND {customer[0]}"
        args += customer[1]
    if dimension is not None:
        sql += " AND dimension = ?"
        args.append(dimension)
    if record_id is not None:
        sql += " AND id = ?"
        args.append(record_id)
    rows = conn.execute(sql, args).fetchall()
    for r in rows:
        if discard:
            _set_state(conn, r["id"], RecordState.DISCARDED, last_error="held by a guardrail; discarded by operator")
        else:
            _set_state(conn, r["id"], RecordState.PENDING, next_attempt_at=0, last_error="released by operator")
        conn.execute("UPDATE holds SET released_at = ?, outcome = ? WHERE record_id = ?",
                     (int(now), HoldOutcome.DISCARDED if discard else HoldOutcome.RELEASED, r["id"]))
        log.warning("held_record_discarded" if discard else "held_record_released", record=r["id"],
                    customer=r["customer"], dimension=r["dimension"], hour=r["hour"], quantity=r["quantity"])
    return len(rows)


def discard_unmapped(conn: sqlite3.Connection, *, customer: tuple[str, list[Any]], now: float) -> int:
    """An operator gives up a tenant's unmapped usage (e.g. traffic without a tenant header that no
    customer should pay for): its buckets end `discarded`, visible and never billed."""
    rows = conn.execute("SELECT customer, dimension, hour, raw FROM buckets WHERE state = 'unmapped'"
                        f" AND {customer[0]}", customer[1]).fetchall()
    for r in rows:
        conn.execute("UPDATE buckets SET state = 'discarded', sealed_at = ? WHERE customer = ? AND dimension = ?"
                     " AND hour = ?", (int(now), r["customer"], r["dimension"], r["hour"]))
        log.warning("unmapped_usage_discarded", customer=r["customer"], dimension=r["dimension"], hour=r["hour"],
                    raw=r["raw"])
    return len(rows)


def release_parked(conn: sqlite3.Connection, rules: Buckets, *, dimension: str, into: Dimension,
                   customer: tuple[str, list[Any]] | None, now: float) -> int:
    """Move parked (`unconfigured`) usage of `dimension` into the configured dimension `into`, in the
    customer's open hour, with `into`'s unit. Raises ValueError when the two measure different things."""
    known = conn.execute("SELECT source FROM dimensions WHERE name = ?", (dimension,)).fetchone()
    if known is not None and known["source"] != into.source:
        raise ValueError(f"--dimension: {dimension!r} measured {known['source']}, {into.name!r} measures "
                         f"{into.source}; usage cannot change what it measures")
    sql = "SELECT * FROM parked WHERE state = 'unconfigured' AND dimension = ?"
    args: list[Any] = [dimension]
    if customer:
        sql += f" AND {customer[0]}"
        args += customer[1]
    rows = conn.execute(sql + " ORDER BY id", args).fetchall()
    hour = rules.open_hour(now)
    for p in rows:
        if known is None:
            log.warning("release_source_unknown", parked=p["id"], dimension=dimension, into=into.name,
                        note="no release that opened this file configured it; the operator's mapping is trusted")
        conn.execute("UPDATE parked SET state = 'released', released_to = ?, released_at = ? WHERE id = ?",
                     (into.name, int(now), p["id"]))
        rules.apply_deltas(conn, {(p["customer"], into.name, hour): Delta(
            unit=into.raw_unit, raw=p["raw"], events=p["events"], carried_in=p["raw"],
            first_event_at=p["first_event_at"])})
        log.warning("parked_usage_released", parked=p["id"], customer=p["customer"], dimension=dimension,
                    into=into.name, raw=p["raw"], to_hour=hour)
    return len(rows)


def pending_summary(conn: sqlite3.Connection) -> tuple[int, float | None]:
    """How many records are pending, and the earliest time one of them is due again."""
    row = conn.execute(
        "SELECT count(*) AS n, min(next_attempt_at) AS t FROM records WHERE state = 'pending'"
    ).fetchone()
    return row["n"], row["t"]
