"""moto's server proves the wire format (AWS JSON 1.1, SigV4, the target header); nothing more."""

from __future__ import annotations

import random
from pathlib import Path

from flushkit import H10, PRODUCT, InstantPacer, customer_events

from sidecar.clock import ManualClock
from sidecar.config import Settings
from sidecar.flush import Flusher
from sidecar.marketplace import MeteringClient
from sidecar.store import Store


async def test_flusher_speaks_to_moto(tmp_path: Path, moto_url: str) -> None:
    """The real client and flusher send a batch moto understands and parse its per-record answer."""
    from helpers import T0

    clock = ManualClock(T0)
    settings = Settings(db_path=tmp_path / "db", region="us-east-1", product_code=PRODUCT,
                        birth_hour="report")
    store = Store.open(settings.db_path, settings=settings, clock=clock)
    try:
        from sidecar.events import validate_event

        evs = [validate_event(e, now=T0, max_age_s=86400, max_future_s=300) for e in customer_events(3)]
        store.ingest_future(evs).result()
        clock.set(H10 + 400)
        client = MeteringClient(settings, env={"AWS_ENDPOINT_URL_MARKETPLACE_METERING": moto_url},
                                credentials=("AKIDTEST", "secret"))
        flusher = Flusher(store, client, settings, clock, rng=random.Random(1), pacer=InstantPacer())
        summary = await flusher.flush_once()
        # moto treats every customer as unsubscribed unless seeded in its own process.
        assert summary.calls == 1
        assert summary.outcomes["rejected"] == 6
        assert summary.outcomes["retry"] == 0, "every result must be matched back to its record"
    finally:
        store.close()
