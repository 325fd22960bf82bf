"""Metering records: freezing sealed buckets, claiming due records, and recording outcomes.

Every function here runs inside a write transaction on the writer thread (see `Store.run`).
A record's fields and payload are written once, by `freeze`, and never change; only its
delivery state moves. The bucket row mirrors the record's state so /usage shows one state.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from sidecar.clock import hour_start
from sidecar.usage import BucketKey, Delta, record_timestamp

log = structlog.get_logger("sidecar.records")

REPLAYABLE = ("rejected", "conflict", "expired")


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


def freeze(conn: sqlite3.Connection, *, now: float, product_code: str | None) -> int:
    """Turn every sealed bucket into exactly one stored record (payload frozen), state pending."""
    rows = conn.execute(
        "SELECT b.customer, b.dimension, b.hour, b.quantity, b.first_event_at,"
        " c.aws_account_id, c.license_arn, c.customer_identifier"
        " FROM buckets b JOIN customers c ON c.customer = b.customer"
        " WHERE b.state = 'sealed' ORDER BY b.hour"
    ).fetchall()
    frozen = 0
    for r in rows:
        ts = record_timestamp(r["hour"], r["first_event_at"])
        payload: dict[str, Any] = {"Timestamp": ts, "Dimension": r["dimension"], "Quantity": r["quantity"]}
        if r["customer_identifier"] is not None:
            if not product_code:
                log.error("product_code_missing", customer=r["customer"],
                          hint="set SIDECAR_PRODUCT_CODE to send CustomerIdentifier records")
                continue
            payload["CustomerIdentifier"] = r["customer_identifier"]
            code = product_code
        else:
            payload["CustomerAWSAccountId"] = r["aws_account_id"]
            payload["LicenseArn"] = r["license_arn"]
            code = None
        conn.execute(
            "INSERT INTO records (customer, dimension, hour, timestamp, quantity, aws_account_id, license_arn,"
            " customer_identifier, product_code, payload, state, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?, 'pending', ?)",
            (r["customer"], r["dimension"], r["hour"], ts, r["quantity"], r["aws_account_id"],
             r["license_arn"], r["customer_identifier"], code, payload_json(payload), int(now)),
        )
        conn.execute(
            "UPDATE buckets SET state = 'pending' WHERE customer = ? AND dimension = ? AND hour = ?",
            (r["customer"], r["dimension"], r["hour"]),
        )
        frozen += 1
    return frozen


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


def carry_into_open_hour(conn: sqlite3.Connection, record_id: int, *, now: float, watermark: int,
                         apply_deltas: Any, reason: str) -> None:
    """Move a never-received record's quantity into the current open hour of its customer."""
    r = conn.execute(
        "SELECT r.customer, r.dimension, r.quantity, b.unit FROM records r JOIN buckets b"
        " ON b.customer = r.customer AND b.dimension = r.dimension AND b.hour = r.hour WHERE r.id = ?",
        (record_id,),
    ).fetchone()
    raw = r["quantity"] * r["unit"]
    hour = max(hour_start(now), watermark)
    deltas: dict[BucketKey, Delta] = {}
    if raw:
        deltas[(r["customer"], r["dimension"], hour)] = Delta(raw=raw, events=0, carried_in=raw,
                                                               first_event_at=int(now))
    _set_state(conn, record_id, "carried", last_error=f"{reason}; carried to hour {hour}")
    apply_deltas(conn, deltas)
    log.warning("record_carried", record=record_id, customer=r["customer"], dimension=r["dimension"],
                quantity=r["quantity"], to_hour=hour)


def close_window(conn: sqlite3.Connection, record: int, *, policy: str, now: float, watermark: int,
                 apply_deltas: Any, reason: str) -> str:
    """A record whose window closed: unknown if AWS may have it, else carry or expire by policy."""
    row = conn.execute("SELECT maybe_received, customer, dimension, quantity FROM records WHERE id = ?",
                       (record,)).fetchone()
    if row["maybe_received"]:
        _set_state(conn, record, "unknown", last_error=f"{reason}; an earlier send may have been billed")
        log.error("record_outcome_unknown", record=record, customer=row["customer"],
                  dimension=row["dimension"], quantity=row["quantity"])
        return "unknown"
    if policy == "carry":
        carry_into_open_hour(conn, record, now=now, watermark=watermark, apply_deltas=apply_deltas, reason=reason)
        return "carried"
    _set_state(conn, record, "expired", last_error=reason)
    log.error("record_expired", record=record, customer=row["customer"], dimension=row["dimension"],
              quantity=row["quantity"])
    return "expired"


def close_windows(conn: sqlite3.Connection, *, now: float, window_s: int, margin_s: int, policy: str,
                  watermark: int, apply_deltas: Any) -> dict[str, int]:
    """Apply the window rule to every pending record that is not being sent right now."""
    counts: dict[str, int] = {}
    for r in conn.execute("SELECT id, timestamp FROM records WHERE state = 'pending' AND in_flight = 0").fetchall():
        if now >= window_closes_at(r["timestamp"], window_s=window_s, margin_s=margin_s):
            state = close_window(conn, r["id"], policy=policy, now=now, watermark=watermark,
                                 apply_deltas=apply_deltas, reason="window closed before AWS accepted it")
            counts[state] = counts.get(state, 0) + 1
    return counts


def _due(conn: sqlite3.Connection, now: float, limit: int) -> list[DueRecord]:
    rows = conn.execute(
        "SELECT id, payload, product_code, timestamp, maybe_received, attempts, customer_identifier"
        " FROM records WHERE state = 'pending' AND in_flight = 0 AND next_attempt_at <= ?"
        " ORDER BY timestamp, id LIMIT ?",
        (now, limit * 4),
    ).fetchall()
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


def claim(conn: sqlite3.Connection, *, now: float, limit: int = 25) -> list[DueRecord]:
    """The oldest due records of one scheme, marked in flight before anything is sent."""
    picked = _due(conn, now, limit)
    conn.executemany("UPDATE records SET in_flight = 1, attempts = attempts + 1 WHERE id = ?",
                     [(r.id,) for r in picked])
    return picked


def mark_sent(conn: sqlite3.Connection, record: int, *, status: str, metering_record_id: str | None,
              now: float) -> None:
    """AWS accepted the record (Success, or a DuplicateRecord of our own earlier send)."""
    _set_state(conn, record, "sent", aws_status=status, metering_record_id=metering_record_id,
               sent_at=int(now))


def mark_terminal(conn: sqlite3.Connection, record: int, *, state: str, status: str | None, error: str) -> None:
    """A definite refusal: rejected (e.g. CustomerNotSubscribed) or conflict (unexplained DuplicateRecord)."""
    _set_state(conn, record, state, aws_status=status, last_error=error)


def mark_retry(conn: sqlite3.Connection, records: Iterable[int], *, error: str, maybe_received: bool,
               next_attempt_at: Mapping[int, float]) -> None:
    """Back to pending, to be resent identically after its backoff."""
    for rid in records:
        conn.execute(
            "UPDATE records SET in_flight = 0, last_error = ?, next_attempt_at = ?,"
            " maybe_received = max(maybe_received, ?) WHERE id = ? AND in_flight = 1",
            (error, next_attempt_at[rid], int(maybe_received), rid),
        )


def replay(conn: sqlite3.Connection, *, states: Iterable[str], now: float, window_s: int, margin_s: int,
           customer: str | None, watermark: int, apply_deltas: Any) -> dict[str, int]:
    """Re-drive terminal records: rejected ones are resent unchanged while AWS's window is open;
    conflicts, expired records and rejected ones past the window are carried into the open hour."""
    states = [s for s in states if s in REPLAYABLE]
    if not states:
        return {}
    marks = ",".join("?" for _ in states)
    sql = f"SELECT id, timestamp, state FROM records WHERE state IN ({marks})"
    args: list[Any] = list(states)
    if customer:
        sql += " AND (customer = ? OR customer LIKE ?)"
        args += [customer, f"%:{customer}%"]
    counts = {"resent": 0, "carried": 0, "unknown": 0}
    for r in conn.execute(sql, args).fetchall():
        # A rejected record (e.g. the customer has subscribed since) is resent unchanged while AWS's
        # window is open. Anything else is closed like an expired window, carried into the open
        # hour: a conflict would only meet the same DuplicateRecord again, an expired record cannot
        # be sent any more, and a record whose earlier send may have been billed is never moved.
        if r["state"] == "rejected" and now < window_closes_at(r["timestamp"], window_s=window_s, margin_s=margin_s):
            conn.execute("UPDATE records SET next_attempt_at = 0, last_error = 'replayed by operator' WHERE id = ?",
                         (r["id"],))
            _set_state(conn, r["id"], "pending")
            counts["resent"] += 1
        else:
            state = close_window(conn, r["id"], policy="carry", now=now, watermark=watermark,
                                 apply_deltas=apply_deltas, reason=f"replayed by operator from {r['state']}")
            counts[state] += 1
    return counts


def pending_summary(conn: sqlite3.Connection) -> tuple[int, float | None]:
    """How many records are pending, and the earliest time one of them is due again."""
    row = conn.execute(
        "SELECT count(*) AS n, min(next_attempt_at) AS t FROM records WHERE state = 'pending'"
    ).fetchone()
    return row["n"], row["t"]
