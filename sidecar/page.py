"""Render the `/usage` data as one self-contained HTML page for operators (inline CSS and SVG, no JS)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from html import escape
from typing import Any

from sidecar.model import BucketState, RecordState

STATE_COLOURS: dict[str, str] = {
    BucketState.OPEN: "#60a5fa",
    BucketState.UNMAPPED: "#22d3ee",
    BucketState.SEALED: "#94a3b8",
    RecordState.PENDING: "#f59e0b",
    RecordState.SENT: "#16a34a",
    RecordState.REJECTED: "#dc2626",
    RecordState.CONFLICT: "#db2777",
    RecordState.EXPIRED: "#78716c",
    RecordState.UNKNOWN: "#7c3aed",
    RecordState.CARRIED: "#a16207",
    RecordState.HELD: "#c026d3",
    RecordState.DISCARDED: "#44403c",
}
OTHER_COLOUR = "#9ca3af"  # a state this page does not know yet still gets drawn
PENDING_ALARM_S = 4 * 3600  # the README's suggested page: oldest pending older than 4 h
COLUMNS = ("hour", "customer", "dimension", "state", "events", "raw", "unit_raw", "carried_in",
           "remainder_in", "quantity", "remainder", "first_event_at", "sealed_at", "record_timestamp",
           "attempts", "aws_status", "metering_record_id", "last_error", "hold_rule", "sent_at")
PLOT_H, TOP, BOTTOM, SLOT_W, BAR_W = 120, 18, 34, 44, 30

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#111827;background:#f8fafc}
header{background:#fff;border-bottom:1px solid #e5e7eb;padding:16px 24px}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:24px 0 8px}h3{font-size:13px;margin:0;color:#374151}
main{padding:0 24px 32px}.muted{color:#6b7280}.facts{display:flex;flex-wrap:wrap;gap:8px;align-items:center}
.pill{display:inline-block;padding:2px 10px;border-radius:999px;font-size:12px;font-weight:600;color:#fff}
.age{padding:4px 12px;border-radius:6px;background:#ecfdf5;color:#065f46;font-weight:600}
.age.alarm{background:#dc2626;color:#fff}.legend{display:flex;flex-wrap:wrap;gap:14px;margin:12px 0;font-size:12px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:5px;vertical-align:-2px}
.charts{display:flex;flex-wrap:wrap;gap:12px}.sub{font-size:12px;margin-bottom:2px}
.chart-box{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 12px;max-width:100%;overflow-x:auto}
h3{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
svg text{font:10px system-ui,sans-serif;fill:#4b5563}svg .value{fill:#111827;font-weight:600}
.table-box{overflow-x:auto;background:#fff;border:1px solid #e5e7eb;border-radius:8px}
table{border-collapse:collapse;font-size:12px;width:100%}th,td{padding:4px 8px;text-align:left;white-space:nowrap}
th{background:#f1f5f9;position:sticky;top:0}tr:nth-child(even) td{background:#f8fafc}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.error{white-space:normal;min-width:220px;color:#991b1b}
td.cut{max-width:240px;overflow:hidden;text-overflow:ellipsis}
.alert{background:#fef2f2;border:1px solid #fca5a5;color:#991b1b;padding:10px 14px;border-radius:8px;margin:12px 0}
.alert b{color:#7f1d1d}
.empty{padding:40px;text-align:center;font-size:16px;background:#fff;border:1px dashed #cbd5e1;border-radius:8px}
"""


def colour(state: str) -> str:
    """The fill colour that stands for a bucket state."""
    return STATE_COLOURS.get(state, OTHER_COLOUR)


def human_age(age_s: float | None) -> str:
    """An age such as '45 s', '12 min', '5 h 03 min' or '2 d 4 h'; 'none' when nothing is pending."""
    if age_s is None:
        return "none"
    seconds = int(age_s)
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours = seconds // 60, seconds // 3600
    if hours == 0:
        return f"{minutes} min"
    if hours < 24:
        return f"{hours} h {minutes % 60:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def bar_value(row: dict[str, Any]) -> float:
    """Whole units once sealed; raw / unit as a fraction while the hour is open or unmapped."""
    if row.get("quantity") is not None:
        return float(row["quantity"])
    return (row.get("raw") or 0) / (row.get("unit_raw") or 1)


def number(value: float) -> str:
    """A value as the page prints it: integers plainly, fractions to three decimals."""
    if value == int(value):
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


def hour_label(hour: str) -> tuple[str, str]:
    """('10:00', '11-28') for an RFC 3339 hour."""
    dt = datetime.fromisoformat(hour.replace("Z", "+00:00"))
    return dt.strftime("%H:%M"), dt.strftime("%m-%d")


def chart(dimension: str, customer: str, rows: list[dict[str, Any]], hours: list[str], top: float) -> str:
    """One customer's hourly bars for one dimension; `top` is the dimension's largest value."""
    by_hour = {r["hour"]: r for r in rows}
    width = SLOT_W * len(hours) + 16
    parts = [f'<svg class="chart" width="{width}" height="{TOP + PLOT_H + BOTTOM}" role="img"'
             f' data-max="{number(top)}" data-plot-height="{PLOT_H}"'
             f' aria-label="{escape(f"{dimension} for {customer}")}">',
             f'<line x1="0" x2="{width}" y1="{TOP + PLOT_H}" y2="{TOP + PLOT_H}" stroke="#cbd5e1"/>']
    previous_day = ""
    for i, hour in enumerate(hours):
        x = 8 + i * SLOT_W
        clock, day = hour_label(hour)
        parts.append(f'<text x="{x + BAR_W / 2}" y="{TOP + PLOT_H + 13}" text-anchor="middle">{clock}</text>')
        if day != previous_day:
            parts.append(f'<text x="{x + BAR_W / 2}" y="{TOP + PLOT_H + 26}" text-anchor="middle">{day}</text>')
            previous_day = day
        row = by_hour.get(hour)
        if row is None:
            continue
        value = bar_value(row)
        height = PLOT_H * value / top if top > 0 else 0.0
        y = TOP + PLOT_H - height
        state = str(row["state"])
        tip = (f"{hour} · {customer} · {dimension}\nstate: {state} · quantity {number(value)}"
               f" (raw {row.get('raw')}, unit {row.get('unit_raw')}, events {row.get('events')})")
        if row.get("last_error"):
            tip += f"\nlast error: {row['last_error']}"
        parts.append(
            f'<rect class="bar" x="{x}" y="{y:.2f}" width="{BAR_W}" height="{height:.2f}" rx="2"'
            f' fill="{colour(state)}" data-hour="{escape(hour)}" data-customer="{escape(customer)}"'
            f' data-dimension="{escape(dimension)}" data-state="{escape(state)}"'
            f' data-quantity="{number(value)}" data-raw="{escape(str(row.get("raw")))}"'
            f' data-unit="{escape(str(row.get("unit_raw")))}"><title>{escape(tip)}</title></rect>'
            f'<text class="value" x="{x + BAR_W / 2}" y="{y - 4:.2f}" text-anchor="middle">{number(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def charts(rows: list[dict[str, Any]]) -> str:
    """Per dimension (one scale each, since units differ), one bar chart per customer."""
    out: list[str] = []
    for dimension in sorted({str(r["dimension"]) for r in rows}):
        dim_rows = [r for r in rows if r["dimension"] == dimension]
        hours = sorted({str(r["hour"]) for r in dim_rows})
        top = max(bar_value(r) for r in dim_rows)
        out.append(f'<h2>{escape(dimension)} <span class="muted">(whole units per hour; open hours as'
                   f" fractions)</span></h2>")
        box_w = max(SLOT_W * len(hours) + 16, 260)  # fixed, so a long customer key is cut, not the chart
        out.append('<div class="charts">')
        for customer in sorted({str(r["customer"]) for r in dim_rows}):
            mine = [r for r in dim_rows if r["customer"] == customer]
            total = sum(bar_value(r) for r in mine)
            out.append(f'<div class="chart-box" style="width:{box_w}px"><h3 title="{escape(customer)}">'
                       f'{escape(customer)}</h3><div class="muted sub">{number(total)} unit{"" if total == 1 else "s"}'
                       f" in {len(mine)} h</div>{chart(dimension, customer, mine, hours, top)}</div>")
        out.append("</div>")
    return "".join(out)


def cell(key: str, value: Any) -> str:
    """One escaped table cell; numbers right-aligned, the state as a coloured pill."""
    if value is None:
        return '<td class="muted">–</td>'
    if key == "state":
        return f'<td><span class="pill" style="background:{colour(str(value))}">{escape(str(value))}</span></td>'
    text = escape(str(value))
    if key in ("customer", "metering_record_id"):  # long keys are cut on screen, whole in the tooltip
        return f'<td class="cut" title="{text}">{text}</td>'
    css = ' class="num"' if isinstance(value, int | float) else ' class="error"' if key == "last_error" else ""
    return f"<td{css}>{text}</td>"


def table(rows: list[dict[str, Any]]) -> str:
    """Every bucket row, newest hour first, as `/usage` returns them."""
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(cell(c, r.get(c)) for c in COLUMNS) + "</tr>" for r in rows)
    return f'<div class="table-box"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def alerts(health: dict[str, Any], parked: list[dict[str, Any]]) -> str:
    """Banners for what an operator must act on before AWS's window closes: unmapped usage first."""
    out = []
    unmapped = health.get("unmapped")
    if unmapped:
        tenants = ", ".join(escape(str(t)) for t in unmapped["tenants"][:10])
        more = "" if len(unmapped["tenants"]) <= 10 else f" and {len(unmapped['tenants']) - 10} more"
        out.append(f'<div class="alert" id="unmapped"><b>Unmapped usage:</b> {unmapped["events"]} events of'
                   f" tenant(s) {tenants}{more} have no customer mapping; the oldest is"
                   f" {human_age(unmapped['oldest_age_s'])} old. Map them (PUT /v1/customers/TENANT or"
                   " SIDECAR_CUSTOMERS) before AWS's window closes; they die with this task's storage.</div>")
    if health.get("held_records"):
        out.append(f'<div class="alert" id="held"><b>Held:</b> {health["held_records"]} record(s) tripped a'
                   " quantity guardrail and are not sent; check them, then `sidecar release --state held`.</div>")
    unconfigured = [p for p in parked if p.get("state") != "ended"]
    if unconfigured:
        dims = ", ".join(sorted({escape(str(p["dimension"])) for p in unconfigured}))
        out.append(f'<div class="alert" id="unconfigured"><b>Unconfigured:</b> {len(unconfigured)} parcel(s) of'
                   f" usage for dimension(s) {dims} that the running configuration does not bill are parked;"
                   " `sidecar release --state unconfigured --dimension OLD=NEW`.</div>")
    overdue = (health.get("lifecycle") or {}).get("final_usage_overdue") or []
    if overdue:
        who = ", ".join(escape(str(c)) for c in overdue[:10])
        out.append(f'<div class="alert" id="final-usage"><b>Final usage overdue:</b> the agreement of {who} began'
                   " to end 30 minutes ago or more and AWS has not accepted all of their records; AWS refuses"
                   " them once the end is final.</div>")
    ended = [p for p in parked if p.get("state") == "ended"]
    if ended:
        who = ", ".join(sorted({escape(str(p["customer"])) for p in ended})[:10])
        out.append(f'<div class="alert" id="ended"><b>Served after the end:</b> {sum(int(p["events"]) for p in ended)}'
                   f" event(s) of {who}, whose subscription ended, are parked and never sent; revoke their"
                   " access.</div>")
    return "".join(out)


SUBSCRIPTION_COLUMNS = ("subscriber", "state", "subscribed_at", "end_began_at", "ended_at", "failed_at",
                        "parked_events", "unaccepted_records", "final_usage_overdue")


def subscriptions_table(subs: list[dict[str, Any]]) -> str:
    """Each customer's subscription state and times (from the notifications queue)."""
    if not subs:
        return ""
    head = "".join(f"<th>{escape(c)}</th>" for c in SUBSCRIPTION_COLUMNS)
    body = "".join("<tr>" + "".join(cell(c, r.get(c)) for c in SUBSCRIPTION_COLUMNS) + "</tr>" for r in subs)
    return (f'<h2>Subscriptions <span class="muted">({len(subs)})</span></h2><div class="table-box" id="subscriptions">'
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def render_usage_page(data: dict[str, Any], *, now: float) -> str:
    """The whole page for `/usage` data plus `health`; `now` (epoch seconds) stamps when it was made."""
    rows: list[dict[str, Any]] = list(data.get("rows") or [])
    age = (data.get("health") or {}).get("oldest_pending_age_s")
    alarm = " alarm" if age is not None and age > PENDING_ALARM_S else ""
    counts = Counter(str(r["state"]) for r in rows)
    order = [s for s in STATE_COLOURS if s in counts] + sorted(set(counts) - set(STATE_COLOURS))
    chips = "".join(f'<span class="pill" data-state="{escape(s)}" data-count="{counts[s]}"'
                    f' style="background:{colour(s)}">{escape(s)} {counts[s]}</span>' for s in order)
    legend = "".join(f'<span><i class="swatch" style="background:{c}"></i>{s}</span>'
                     for s, c in STATE_COLOURS.items())
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if rows:
        content = (f'<div class="legend">{legend}</div>{charts(rows)}'
                   f"<h2>Buckets <span class=\"muted\">({len(rows)} rows)</span></h2>{table(rows)}")
    else:
        content = '<p class="empty">No usage yet: no events have been stored.</p>'
    content += subscriptions_table(list(data.get("subscriptions") or []))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Metering usage</title><style>{CSS}</style></head><body>"
        f'<header><h1>Metering usage <span class="muted" style="font-size:13px;font-weight:400">'
        f"generated {stamp}</span></h1>"
        f'<div class="facts"><span class="age{alarm}" id="oldest-pending" data-age-s="{escape(str(age))}">'
        f"oldest pending: {human_age(age)}</span>{chips}</div></header>"
        f"<main>{alerts(data.get('health') or {}, list(data.get('parked') or []))}{content}</main></body></html>\n"
    )
