"""Recoverable rejections: a record AWS certainly refused (a typo'd dimension, a wrong product code,
CustomerNotSubscribed) is rebuilt under the fixed configuration by `sidecar replay --state rejected`
and billed exactly once, inside the window as its own hour, outside it carried into the open hour."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from flushkit import H09, PRODUCT, Kit, make_kit
from helpers import event

from sidecar.cli import main
from sidecar.clock import HOUR_S, hour_start
from sidecar.config import Dimension
from sidecar.simulator import SimulatorConfig

SEALED = H09 + HOUR_S + 400
LISTING = frozenset({"inference-requests", "tokens-1k"})
TYPO = (Dimension(name="inference-requests", source="count", unit=1),
        Dimension(name="tokens-processed", source="total_tokens", unit=1000))
FIXED_TOML = ('[[dimensions]]\nname = "inference-requests"\nsource = "count"\n\n'
              '[[dimensions]]\nname = "tokens-1k"\nsource = "total_tokens"\nunit = 1000\n')


def billed(kit: Kit, customer: str, dimension: str) -> dict[int, int]:
    """What the simulator billed, by hour."""
    return {k.hour_start: int(v.quantity) for k, v in kit.sim.billed.items()
            if k.customer == customer and k.dimension == dimension}


async def cli(kit: Kit, *args: str, toml: str | None = None, product_code: str = PRODUCT) -> int:
    """Run `sidecar ARGS` on the kit's database (the kit's store is closed meanwhile, as the daemon would be)."""
    kit.store.close()
    env = {"SIDECAR_DB": str(kit.settings.db_path), "SIDECAR_PRODUCT_CODE": product_code}
    if toml is not None:
        path = kit.settings.db_path.parent / "fixed.toml"
        path.write_text(toml)
        env["SIDECAR_CONFIG"] = str(path)
    code = await asyncio.to_thread(main, list(args), env)
    kit.reopen()
    return code


@pytest.fixture
async def typo(tmp_path: Path):  # type: ignore[no-untyped-def]
    """tokens-processed is refused by AWS (the listing says tokens-1k); the records end rejected."""
    k = await make_kit(tmp_path, dimensions=TYPO, sim_config=SimulatorConfig(
        subscribe_all=True, product_code=PRODUCT, allowed_dimensions=LISTING))
    try:
        k.ingest(*[event(f"e{c}", when=H09 + 60, customer={"customer_identifier": f"cust-{c}"}, prompt=8000,
                         completion=5000) for c in range(2)])
        k.clock.set(SEALED)
        await k.flusher.flush_once()
        states = {(r["dimension"], r["state"]) for r in k.records()}
        assert states == {("inference-requests", "sent"), ("tokens-processed", "rejected")}
        assert {r["aws_status"] for r in k.records() if r["state"] == "rejected"} == {
            "InvalidUsageDimensionException"}
        yield k
    finally:
        await k.close()


def fixed_release(kit: Kit, **changes: object) -> None:
    """The operator fixes the configuration and restarts."""
    kit.settings = replace(kit.settings, **changes)
    kit.reopen()


async def test_typo_fixed_and_replayed_inside_the_window(typo: Kit) -> None:
    """Replay rebuilds the rejected records as tokens-1k for 09:00: 13 units each, billed once."""
    fixed_release(typo, dimensions=(TYPO[0], Dimension(name="tokens-1k", source="total_tokens", unit=1000)))
    out = await typo.store.replay(states=["rejected"], rename={"tokens-processed": "tokens-1k"})
    assert out == {"resent": 0, "rebuilt": 2, "carried": 0, "unknown": 0}
    await typo.flusher.flush_once()
    for c in range(2):
        assert billed(typo, f"cust-{c}", "tokens-1k") == {H09: 13}
    assert typo.states() == {"sent": 4}
    assert typo.sim.counters.conflicts == 0
    conn = sqlite3.connect(typo.settings.db_path)
    history = conn.execute("SELECT old_dimension, old_aws_status FROM record_rebuilds").fetchall()
    conn.close()
    assert history == [("tokens-processed", "InvalidUsageDimensionException")] * 2
    # A second replay finds nothing: nothing is billed twice.
    assert await typo.store.replay(states=["rejected"], rename={"tokens-processed": "tokens-1k"}) == {
        "resent": 0, "rebuilt": 0, "carried": 0, "unknown": 0}


async def test_typo_fixed_and_replayed_outside_the_window(typo: Kit) -> None:
    """Past the window the usage is carried, with its unit, into tokens-1k's open hour: 13 units each."""
    fixed_release(typo, dimensions=(TYPO[0], Dimension(name="tokens-1k", source="total_tokens", unit=1000)))
    typo.clock.set(H09 + 24 * HOUR_S)
    out = await typo.store.replay(states=["rejected"], rename={"tokens-processed": "tokens-1k"})
    assert out == {"resent": 0, "rebuilt": 0, "carried": 2, "unknown": 0}
    typo.clock.set(hour_start(typo.clock.now()) + HOUR_S + 400)
    await typo.flusher.flush_once()
    for c in range(2):
        got = billed(typo, f"cust-{c}", "tokens-1k")
        assert list(got.values()) == [13]
        assert next(iter(got)) >= H09 + 24 * HOUR_S
    assert typo.sim.counters.conflicts == 0


async def test_replay_without_the_rename_parks_instead_of_guessing(typo: Kit) -> None:
    """Without OLD=NEW the old dimension is no longer configured: the usage is parked, nothing sent."""
    fixed_release(typo, dimensions=(TYPO[0], Dimension(name="tokens-1k", source="total_tokens", unit=1000)))
    out = await typo.store.replay(states=["rejected"])
    assert out["carried"] == 2
    typo.clock.set(SEALED + 2 * HOUR_S)
    await typo.flusher.flush_once()
    assert billed(typo, "cust-0", "tokens-1k") == {}
    conn = sqlite3.connect(typo.settings.db_path)
    parked = conn.execute("SELECT dimension, raw, unit FROM parked").fetchall()
    conn.close()
    assert parked == [("tokens-processed", 13_000, 1000)] * 2


async def test_replay_cli_refuses_a_rename_into_another_kind_of_usage(typo: Kit) -> None:
    """tokens-processed=inference-requests would bill tokens as requests: refused, exit 2, nothing changed."""
    assert await cli(typo, "replay", "--state", "rejected", "--dimension", "tokens-processed=inference-requests",
                     toml=FIXED_TOML) == 2
    assert await cli(typo, "replay", "--state", "rejected", "--dimension", "tokens-processed=nope",
                     toml=FIXED_TOML) == 2
    assert {r["state"] for r in typo.records()} == {"sent", "rejected"}


@pytest.mark.parametrize("inside", [True, False])
async def test_wrong_product_code_fixed_and_replayed(tmp_path: Path, inside: bool) -> None:
    """A wrong ProductCode refuses every call; after the fix replay rebuilds (inside the window) or
    carries (outside it) and each customer's usage is billed exactly once."""
    k = await make_kit(tmp_path, product_code="prod-typo")
    try:
        k.ingest(*[event(f"e{c}", when=H09 + 60, customer={"customer_identifier": f"cust-{c}"}, prompt=600,
                         completion=400) for c in range(3)])
        k.clock.set(SEALED)
        await k.flusher.flush_once()
        assert k.states() == {"rejected": 6}
        assert {r["aws_status"] for r in k.records()} == {"InvalidProductCodeException"}
        fixed_release(k, product_code=PRODUCT)
        if not inside:
            k.clock.set(H09 + 24 * HOUR_S)
        out = await k.store.replay(states=["rejected"])
        assert out["rebuilt" if inside else "carried"] == 6
        if not inside:
            k.clock.set(hour_start(k.clock.now()) + HOUR_S + 400)
        await k.flusher.flush_once()
        for c in range(3):
            assert sum(billed(k, f"cust-{c}", "inference-requests").values()) == 1
            assert sum(billed(k, f"cust-{c}", "tokens-processed").values()) == 1
        assert k.sim.counters.conflicts == 0
    finally:
        await k.close()


async def test_replay_cli_rebuilds_with_the_rename(typo: Kit) -> None:
    """The operator's own command: `sidecar replay --state rejected --dimension tokens-processed=tokens-1k`."""
    typo.settings = replace(typo.settings, dimensions=(TYPO[0], Dimension(name="tokens-1k", source="total_tokens",
                                                                          unit=1000)))
    # The CLI runs on the real clock, far past this test's 09:00 window: the usage is carried.
    assert await cli(typo, "replay", "--state", "rejected", "--dimension", "tokens-processed=tokens-1k",
                     toml=FIXED_TOML) == 0
    assert {r["state"] for r in typo.records() if r["dimension"] == "tokens-processed"} == {"carried"}
    conn = sqlite3.connect(typo.settings.db_path)
    open_tokens = conn.execute("SELECT sum(raw) FROM buckets WHERE dimension = 'tokens-1k' AND state = 'open'"
                               ).fetchone()[0]
    conn.close()
    assert open_tokens == 26_000


async def test_a_record_aws_may_have_billed_is_never_rebuilt(typo: Kit) -> None:
    """A rejected record whose earlier send's answer was lost (maybe received) keeps its frozen
    payload: replay resends it unchanged in the window, never rebuilt under the new configuration."""
    conn = sqlite3.connect(typo.settings.db_path)
    conn.execute("UPDATE records SET maybe_received = 1 WHERE state = 'rejected'")
    before = dict(conn.execute("SELECT id, payload FROM records WHERE state = 'rejected'").fetchall())
    conn.commit()
    conn.close()
    fixed_release(typo, dimensions=(TYPO[0], Dimension(name="tokens-1k", source="total_tokens", unit=1000)))
    out = await typo.store.replay(states=["rejected"], rename={"tokens-processed": "tokens-1k"})
    assert out == {"resent": 2, "rebuilt": 0, "carried": 0, "unknown": 0}
    after = {r["id"]: r["payload"] for r in typo.records() if r["id"] in before}
    assert after == before
    typo.clock.set(H09 + 24 * HOUR_S)
    await typo.flusher.flush_once()  # refused again, then past the window: unknown, never carried
    assert {r["state"] for r in typo.records() if r["id"] in before} <= {"rejected", "unknown"}
    assert billed(typo, "cust-0", "tokens-1k") == {}
