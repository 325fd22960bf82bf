"""The operators' usage page: escaping, state colours, bar values, and the page as headless Chromium draws it."""

from __future__ import annotations

import sqlite3
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from helpers import ACCOUNT, T0, event

from sidecar.app import iso, present_row
from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import Settings
from sidecar.events import validate_event
from sidecar.page import PLOT_H, STATE_COLOURS, human_age, render_usage_page
from sidecar.store import Store, UsageFilter, health, reader, records, usage_rows, usage_totals

CHROMIUM = Path("/usr/bin/chromium")
HOUR = "2026-11-28T10:00:00Z"


class Bars(HTMLParser):
    """Collects every `rect.bar` (with its chart's scale) and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.bars: list[dict[str, str]] = []
        self.chart: dict[str, str] = {}
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "svg":
            self.chart = a
        if tag == "rect" and "bar" in a.get("class", "").split():
            self.bars.append({**a, "chart_max": self.chart["data-max"]})


def parse(page: str) -> Bars:
    """The page's bars and tags."""
    p = Bars()
    p.feed(page)
    return p


def row(state: str = "sent", *, customer: str = "identifier:cust-a", dimension: str = "tokens-processed",
        hour: str = HOUR, quantity: int | None = 3, raw: int = 3499, unit: int = 1000,
        **extra: Any) -> dict[str, Any]:
    """One `/usage` row with every field present."""
    base: dict[str, Any] = {
        "hour": hour, "customer": customer, "dimension": dimension, "state": state, "events": 4, "raw": raw,
        "unit_raw": unit, "carried_in": 0, "remainder_in": 0, "quantity": quantity, "remainder": 499,
        "first_event_at": HOUR, "sealed_at": None, "record_timestamp": None, "attempts": None,
        "aws_status": None, "metering_record_id": None, "last_error": None, "sent_at": None,
    }
    return {**base, **extra}


def page_of(rows: list[dict[str, Any]], *, age: int | None = None) -> str:
    """The page for these rows."""
    return render_usage_page({"rows": rows, "totals": [], "health": {"oldest_pending_age_s": age}}, now=T0)


def test_untrusted_values_are_escaped() -> None:
    """A hostile customer name or error text appears as text, never as markup."""
    hostile = "<script>alert(1)</script>"
    page = page_of([row("rejected", customer=hostile, last_error='<img src=x onerror="alert(2)">')])
    assert hostile not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "script" not in parse(page).tags and "img" not in parse(page).tags
    assert parse(page).bars[0]["data-customer"] == hostile


def test_each_state_has_its_own_colour_and_legend_entry() -> None:
    """Every bar is filled with its state's colour, and the legend names every state."""
    hours = [f"2026-11-28T{h:02d}:00:00Z" for h in range(len(STATE_COLOURS))]
    page = page_of([row(s, hour=h) for s, h in zip(STATE_COLOURS, hours, strict=True)])
    fills = {b["data-state"]: b["fill"] for b in parse(page).bars}
    assert fills == STATE_COLOURS
    assert len(set(STATE_COLOURS.values())) == len(STATE_COLOURS)
    for state in ("open", "pending", "sent", "rejected", "expired", "unknown", "conflict", "carried", "sealed"):
        assert f"</i>{state}</span>" in page


def test_bar_values_are_quantities_and_heights_are_proportional() -> None:
    """Sealed bars show whole units, open bars raw / unit; heights follow the dimension's scale."""
    page = page_of([
        row("sent", hour="2026-11-28T08:00:00Z", quantity=4, raw=4200),
        row("pending", hour="2026-11-28T09:00:00Z", quantity=2, raw=2100),
        row("open", hour=HOUR, quantity=None, raw=1500),
        row("unmapped", customer="tenant:acme", quantity=None, raw=250),
    ])
    bars = {(b["data-customer"], b["data-hour"]): b for b in parse(page).bars}
    values = {k: b["data-quantity"] for k, b in bars.items()}
    assert values == {("identifier:cust-a", "2026-11-28T08:00:00Z"): "4",
                      ("identifier:cust-a", "2026-11-28T09:00:00Z"): "2",
                      ("identifier:cust-a", HOUR): "1.5", ("tenant:acme", HOUR): "0.25"}
    for b in bars.values():
        assert b["chart_max"] == "4"
        assert float(b["height"]) == pytest.approx(PLOT_H * float(b["data-quantity"]) / 4, abs=0.01)


def test_empty_data_says_no_usage_yet() -> None:
    """With no rows the page says so, draws no bars and no table."""
    page = render_usage_page({"rows": [], "totals": [], "health": {"oldest_pending_age_s": None}}, now=T0)
    assert "No usage yet" in page
    assert parse(page).bars == [] and "<table" not in page
    assert "oldest pending: none" in page


def test_oldest_pending_age_turns_red_after_four_hours() -> None:
    """The age is human readable, and flagged as an alarm only above 4 h."""
    calm = page_of([row("pending")], age=4 * 3600)
    alarm = page_of([row("pending")], age=4 * 3600 + 1)
    assert 'class="age"' in calm and "oldest pending: 4 h 00 min" in calm
    assert 'class="age alarm"' in alarm and "oldest pending: 4 h 00 min" in alarm


def test_header_counts_buckets_by_state() -> None:
    """The header shows how many buckets are in each state."""
    page = page_of([row("sent", hour="2026-11-28T08:00:00Z"), row("sent", hour="2026-11-28T09:00:00Z"),
                    row("pending")])
    assert 'data-state="sent" data-count="2"' in page and 'data-state="pending" data-count="1"' in page


def test_page_is_self_contained() -> None:
    """No external scripts, styles, fonts or images: the page works offline and behind strict CSPs."""
    page = page_of([row("sent"), row("open", quantity=None)])
    for needle in ("http://", "https://", "<script", "<link", "src=", "url("):
        assert needle not in page


@pytest.mark.parametrize(("seconds", "text"), [(None, "none"), (42, "42 s"), (720, "12 min"),
                                               (5 * 3600 + 180, "5 h 03 min"), (2 * 86400 + 4 * 3600, "2 d 4 h")])
def test_human_age(seconds: int | None, text: str) -> None:
    """Ages read the way an operator says them."""
    assert human_age(seconds) == text


# ---- the real page in a real browser -------------------------------------------------------------


def build_database(path: Path) -> tuple[dict[str, Any], float]:
    """Three hours of usage for two customers and an unmapped tenant, in every common state."""
    settings = Settings(db_path=path, product_code="prod-test-1", birth_hour="report")
    h08 = hour_start(T0) - 2 * HOUR_S
    clock = ManualClock(h08 + 60)
    store = Store.open(path, settings=settings, clock=clock)
    account = {"aws_account_id": ACCOUNT["aws_account_id"], "license_arn": ACCOUNT["license_arn"]}

    def ingest(*objs: dict[str, Any]) -> None:
        now = clock.now()
        store.ingest_future([validate_event(o, now=now, max_age_s=48 * 3600, max_future_s=300)
                             for o in objs]).result()

    try:
        for hour, n in ((0, 3), (1, 5), (2, 2)):
            clock.set(h08 + hour * HOUR_S + 600)
            for i in range(n):
                when = clock.now() - 60
                ingest(event(f"a{hour}-{i}", when=when, prompt=900, completion=350),
                       event(f"b{hour}-{i}", when=when, customer=account, prompt=400, completion=100 * hour))
            if hour < 2:  # seal the hour that just ended
                clock.set(h08 + (hour + 1) * HOUR_S + 400)
                store.seal_due_sync()
        ingest(event("t-1", when=clock.now() - 30, customer={"tenant": "<b>acme</b>"}, prompt=640, completion=0))
        now = clock.now()

        def deliver(conn: sqlite3.Connection) -> None:
            store.freeze(conn, now=now)
            ids = {(c, d, h): i for i, c, d, h in conn.execute("SELECT id, customer, dimension, hour FROM records")}
            for (customer, dimension, hour), rid in ids.items():
                if hour == h08:
                    records.mark_sent(conn, rid, status="Success", metering_record_id=f"mr-{rid}", now=now)
                elif customer.startswith("account:") and dimension == "tokens-processed":
                    records.mark_terminal(conn, rid, state="rejected", status="CustomerNotSubscribed",
                                          error="CustomerNotSubscribed: <licence not active>")

        store.call(deliver)
    finally:
        store.close()
    with reader(path) as conn:
        data = {"rows": [present_row(r) for r in usage_rows(conn, UsageFilter())],
                "totals": usage_totals(conn, UsageFilter()), "health": health(conn, now)}
    return data, now


def chromium(*args: str, profile: Path) -> str:
    """Run headless Chromium once with a fresh profile and no network chatter; return its stdout."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium; CI has it)")
def test_page_in_headless_chromium_shows_the_database_numbers(tmp_path: Path) -> None:
    """Chromium renders one bar per bucket with the quantity and state stored in SQLite; screenshot kept."""
    data, now = build_database(tmp_path / "sidecar.db")
    page = tmp_path / "usage.html"
    page.write_text(render_usage_page(data, now=now), encoding="utf-8")

    dom = chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile-dom")
    drawn = {(b["data-customer"], b["data-dimension"], b["data-hour"]): b for b in parse(dom).bars}

    conn = sqlite3.connect(f"file:{tmp_path / 'sidecar.db'}?mode=ro", uri=True)
    try:
        stored = conn.execute("SELECT customer, dimension, hour, state, quantity, raw, unit FROM buckets").fetchall()
    finally:
        conn.close()
    assert len(stored) == len(drawn) == len(data["rows"])
    assert {s for *_, s, _, _, _ in stored} >= {"open", "unmapped", "pending", "sent", "rejected"}
    for customer, dimension, hour, state, quantity, raw, unit in stored:
        bar = drawn[(customer, dimension, str(iso(hour)))]
        assert bar["data-state"] == state and bar["fill"] == STATE_COLOURS[state]
        expected = quantity if quantity is not None else raw / unit
        assert float(bar["data-quantity"]) == pytest.approx(expected, abs=5e-4)
        assert float(bar["height"]) == pytest.approx(PLOT_H * float(bar["data-quantity"]) / float(bar["chart_max"]),
                                                     abs=0.01)
    assert "<b>acme</b>" not in dom and "&lt;b&gt;acme&lt;/b&gt;" in dom

    shot = tmp_path / "usage-page.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,900", page.as_uri(), profile=tmp_path / "profile-shot")
    print(f"usage page screenshot: {shot}")
    assert shot.exists() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
