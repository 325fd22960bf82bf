"""Bucketing rules: which hour an event's usage lands in, and how a bucket becomes whole units. Pure."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sidecar.clock import HOUR_S, hour_start
from sidecar.config import MAX_QUANTITY, Dimension
from sidecar.events import UsageEvent


def sealing_watermark(now: float, grace_s: int, stored: int) -> int:
    """Hours starting before the returned epoch second are sealed (or due to be).

    An hour is sealed once it ended more than `grace_s` ago; the stored watermark never moves back,
    so a clock that jumps backwards cannot reopen a sealed hour.
    """
    return max(stored, hour_start(now - grace_s))


def target_hour(event_time: float, *, now: float, watermark: int) -> tuple[int, bool]:
    """The bucket hour for an event, and whether it is late (its own hour is already sealed).

    Late usage goes to the current open hour: never earlier than the watermark, so never sealed.
    """
    own = hour_start(event_time)
    if own >= watermark:
        return own, False
    return max(hour_start(now), watermark), True


@dataclass(slots=True, kw_only=True)
class Delta:
    """Usage to add to one bucket. `unit` says what `raw` is worth: raw units per billed unit.

    It travels with the usage (carry, tenant mapping, replay) and has no default, so no path can
    make up a unit: usage whose unit the running configuration does not have is parked, never sent.
    """

    unit: int
    raw: int = 0
    events: int = 0
    carried_in: int = 0
    first_event_at: int = 0


BucketKey = tuple[str, str, int]  # (customer, dimension, hour)


def add_event(
    deltas: dict[BucketKey, Delta],
    event: UsageEvent,
    *,
    customer: str,
    hour: int,
    late: bool,
    dimensions: Iterable[Dimension],
) -> None:
    """Add one event's usage to the per-bucket deltas, one entry per dimension it has usage for."""
    when = int(event.time)
    for dim in dimensions:
        if not dim.per_event:  # fair_share / dedicated GPU time is measured by the sidecar, not summed
            continue
        amount = event.source_amount(dim.source)
        if amount == 0 and dim.source != "count":
            continue
        key = (customer, dim.name, hour)
        delta = deltas.get(key)
        if delta is None:
            deltas[key] = Delta(unit=dim.raw_unit, raw=amount, events=1, carried_in=amount if late else 0,
                                first_event_at=when)
        else:
            delta.raw += amount
            delta.events += 1
            if late:
                delta.carried_in += amount
            delta.first_event_at = min(delta.first_event_at, when)


def whole_units(raw: int, remainder_in: int, raw_unit: int) -> tuple[int, int]:
    """Quantity in whole units and the raw remainder carried on; nothing is rounded away.

    A quantity above AWS's per-record ceiling is capped and the excess stays in the remainder.
    """
    total = raw + remainder_in
    quantity = min(total // raw_unit, MAX_QUANTITY)
    return quantity, total - quantity * raw_unit


def record_timestamp(hour: int, first_event_at: int) -> int:
    """The record's timestamp: the later of the hour's start and its first event, whole seconds."""
    return min(max(hour, first_event_at), hour + HOUR_S - 1)


def guardrail(quantity: int, *, ceiling: int, floor: int, spike_factor: float, history_max: int | None) -> str | None:
    """Why a record of `quantity` must be held for an operator, or None to send it.

    `ceiling`: no record may carry more. Spike: more than `spike_factor` times the customer's largest
    hourly quantity of the look-back period (only when that history has usage, and only above `floor`).
    """
    if quantity > ceiling:
        return f"ceiling: quantity {quantity} is above the dimension's max_quantity {ceiling}"
    if spike_factor > 0 and history_max and quantity > floor and quantity > spike_factor * history_max:
        return (f"spike: quantity {quantity} is more than {spike_factor:g} x this customer's largest hourly"
                f" quantity of the last 7 days ({history_max}) and above spike_floor {floor}")
    return None


SETTLE_POLICIES = ("half_up", "up", "down", "keep")


def settle_remainder(raw: int, raw_unit: int, policy: str) -> int | None:
    """Whole units to bill for a carried amount at a final seal (None: keep it carried).

    A carry can hold more than one unit (a release changed the unit, a rebuild left raw over, a
    quantity was capped): its whole units are billed first, the policy decides only the part below
    one unit.
    """
    if policy == "keep" or raw <= 0:
        return None
    whole, part = divmod(raw, raw_unit)
    if policy == "up":
        return whole + (1 if part else 0)
    if policy == "half_up":
        return whole + (1 if 2 * part >= raw_unit else 0)
    if policy == "down":
        return whole
    raise ValueError(f"unknown remainder policy {policy!r}")


# ---- GPU time ------------------------------------------------------------------------------

K = TypeVar("K", bound=Hashable)
HOUR_US = HOUR_S * 1_000_000


def engine_interval(event: UsageEvent) -> tuple[int, int] | None:
    """The event's engine interval in epoch µs: its own `engine_start`/`engine_end`, else the
    `gpu_seconds` that ended at the event's `time` (older producers); None without GPU time."""
    if event.engine_start_us is not None and event.engine_end_us is not None:
        return event.engine_start_us, event.engine_end_us
    if event.gpu_micros:
        end = round(event.time * 1_000_000)
        return end - event.gpu_micros, end
    return None


def fair_shares(intervals: Sequence[tuple[K, int, int]], *, gpus: int) -> tuple[dict[K, int], int]:
    """Split the GPU wall time the intervals cover among the intervals running at each moment.

    Each moment's time (x `gpus`) is shared evenly by the requests in the engine then: vLLM steps
    every running sequence once per iteration. Returns µs per key and the total, which is exactly
    the union of the intervals x `gpus`; the per-key amounts add up to it exactly (largest
    remainder rounding), so customers are never billed more GPU time than passed.
    """
    live = [(k, a, b) for k, a, b in intervals if b > a]
    if not live:
        return {}, 0
    bounds = sorted({t for _, a, b in live for t in (a, b)})
    at = {t: i for i, t in enumerate(bounds)}
    change = [0] * len(bounds)
    for _, a, b in live:
        change[at[a]] += 1
        change[at[b]] -= 1
    cumulative = [0.0] * len(bounds)  # share of one running interval from bounds[0] to bounds[i]
    running = union = 0
    for i in range(len(bounds) - 1):
        running += change[i]
        length = bounds[i + 1] - bounds[i]
        if running:
            union += length
            cumulative[i + 1] = cumulative[i] + length / running
        else:
            cumulative[i + 1] = cumulative[i]
    total = union * gpus
    exact: dict[K, float] = {}
    for k, a, b in live:
        exact[k] = exact.get(k, 0.0) + (cumulative[at[b]] - cumulative[at[a]]) * gpus
    return _apportion(exact, total), total


def _apportion(exact: dict[K, float], total: int) -> dict[K, int]:
    """Whole amounts close to `exact` that add up to `total` exactly (largest remainder)."""
    whole = {k: max(0, int(v)) for k, v in exact.items()}
    left = total - sum(whole.values())
    order = sorted(exact, key=lambda k: exact[k] - whole[k], reverse=True)
    i = 0
    while left > 0:
        whole[order[i % len(order)]] += 1
        left -= 1
        i += 1
    order.reverse()
    while left < 0:  # float sums may overshoot by a µs
        k = order[i % len(order)]
        if whole[k] > 0:
            whole[k] -= 1
            left += 1
        i += 1
    return whole


def uncovered_us(start: int, end: int, covered: Iterable[tuple[int, int]]) -> int:
    """How much of [start, end) none of the `covered` intervals covers (µs)."""
    pieces = sorted((max(a, start), min(b, end)) for a, b in covered if b > start and a < end and b > a)
    free, at = 0, start
    for a, b in pieces:
        if a > at:
            free += a - at
        at = max(at, b)
    return free + max(0, end - at)


def hour_pieces(start: int, end: int) -> list[tuple[int, int, int]]:
    """[start, end) in µs cut at UTC hour boundaries: (hour start in s, piece start, piece end)."""
    out = []
    at = start
    while at < end:
        hour_us = at // HOUR_US * HOUR_US
        stop = min(end, hour_us + HOUR_US)
        out.append((hour_us // 1_000_000, at, stop))
        at = stop
    return out
