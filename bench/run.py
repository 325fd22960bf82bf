"""The sidecar's benchmark: every number beside the baseline it is compared with, measured in one run.

    python -m bench.run            # full run (a few minutes)
    python -m bench.run --smoke    # seconds; what CI runs so the benchmark cannot rot

Prints a table and writes JSON to bench/results/latest.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.fleet import bench_fleet
from bench.lifecycle import bench_lifecycle
from bench.loadgen import have_wrk, run_batch_load, run_load
from bench.procs import free_port, sidecar_env, start, stop, wait_http
from sidecar import logs
from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import Dimension, Settings
from sidecar.events import validate_event
from sidecar.flush import Flusher, Pacer
from sidecar.marketplace import MeteringClient
from sidecar.store import Store
from sidecar.store.queries import db_size_bytes

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "ingest_vs_baseline": 0.6, "ingest_p99_ms": 20.0, "batch_events_per_s": 100_000,
    "batch_vs_storage": 0.5, "flush_rate_ratio": 0.95, "peak_rss_mb": 100.0, "startup_1m_s": 2.0,
    "fleet_ingest_ratio": 0.9, "fleet_ship_deltas_per_s": 20_000, "fleet_leader_pass_s": 10.0,
    "fleet_failover_over_ttl_s": 2.0, "lifecycle_final_usage_max_s": 60.0,
}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_http(args: argparse.Namespace, tmp: Path, generator: str) -> dict[str, Any]:
    """Baseline vs single-event ingest vs batch ingest, same generator, same run."""
    out: dict[str, Any] = {}
    port = free_port()
    base = start([sys.executable, str(ROOT / "bench" / "baseline_server.py"), str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        run_load(f"http://127.0.0.1:{port}/v1/events", connections=64, seconds=1, prefix="warm", generator=generator)
        r = run_load(f"http://127.0.0.1:{port}/v1/events", connections=64, seconds=args.seconds, prefix="b",
                     generator=generator)
        out["baseline"] = vars(r)
    finally:
        stop(base)
    db = tmp / "ingest.db"
    port = free_port()
    proc = start([sys.executable, "-m", "sidecar", "serve"], sidecar_env(db, port))
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        url = f"http://127.0.0.1:{port}/v1/events"
        run_load(url, connections=64, seconds=1, prefix="warm", generator=generator)
        r = run_load(url, connections=64, seconds=args.seconds, prefix="single", generator=generator)
        out["ingest"] = vars(r)
        for batch in (100, 1000):
            for ndjson in (False, True):
                n, secs, errors = run_batch_load(url, batch=batch, ndjson=ndjson, posters=4, seconds=args.seconds,
                                                 prefix=f"b{batch}{'n' if ndjson else 'j'}")
                out[f"batch_{batch}_{'ndjson' if ndjson else 'json'}"] = {
                    "events": n, "seconds": secs, "events_per_s": n / secs, "errors": errors}
        out["peak_rss_mb"] = peak_rss_mb(proc.pid)
    finally:
        stop(proc)
    import sqlite3

    conn = sqlite3.connect(db)
    events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    out["db_bytes_per_event"] = db_size_bytes(db) / max(events, 1)
    out["events_stored"] = events
    return out


def make_events(n: int, *, now: float, prefix: str, customer: Any = lambda i: f"c{i % 50}") -> list[Any]:
    """Validated events, as the HTTP edge would hand them to the store."""
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(now - 30, UTC).isoformat().replace("+00:00", "Z")
    return [validate_event({"event_id": f"{prefix}-{i}", "time": when,
                            "customer": {"customer_identifier": customer(i)},
                            "prompt_tokens": 120, "completion_tokens": 80},
                           now=now, max_age_s=86400, max_future_s=300) for i in range(n)]


def bench_storage(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The storage ceiling: the store's own ingest path (dedup + bucket upserts), batches of 1,000, FULL sync."""
    now = time.time()
    settings = Settings(birth_hour="report", db_path=tmp / "storage.db")
    store = Store.open(settings.db_path, settings=settings, clock=ManualClock(now))
    total = 20_000 if args.smoke else 200_000
    batches = [make_events(1000, now=now, prefix=f"s{b}") for b in range(total // 1000)]
    started = time.perf_counter()
    for batch in batches:
        store.ingest_future(batch).result()
    secs = time.perf_counter() - started
    store.close()
    return {"events": total, "seconds": secs, "events_per_s": total / secs}


@contextlib.contextmanager
def simulator() -> Iterator[dict[str, str]]:
    """`sidecar simulate-marketplace` on a free port; yields the client environment that reaches it."""
    port = free_port()
    sim = start([sys.executable, "-m", "sidecar", "simulate-marketplace", "--listen", f"127.0.0.1:{port}",
                 "--subscribe-all", "--product-code", "bench"])
    try:
        wait_http(f"http://127.0.0.1:{port}/_sim/state")
        yield {"AWS_ENDPOINT_URL_MARKETPLACE_METERING": f"http://127.0.0.1:{port}",
               "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    finally:
        stop(sim)


def flusher_for(store: Store, settings: Settings, clock: ManualClock, env: dict[str, str]) -> Flusher:
    """The real flusher and botocore client, paced at the settings' rate."""
    return Flusher(store, MeteringClient(settings, env=env), settings, clock, rng=random.Random(1),
                   pacer=Pacer(settings.calls_per_s))


def bench_flush(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Drain a backlog of sealed records against the simulator at the configured rate."""
    n = 500 if args.smoke else 10_000
    with simulator() as env:
        now = time.time()
        settings = Settings(birth_hour="report", db_path=tmp / "flush.db", region="us-east-1", product_code="bench",
                            dimensions=(Dimension(name="inference-requests", source="count", unit=1),))
        clock = ManualClock(hour_start(now) - 2 * HOUR_S + 60)  # an hour that is sealed by now
        store = Store.open(settings.db_path, settings=settings, clock=clock)
        for b in range(0, n, 1000):
            evs = make_events(min(1000, n - b), now=clock.now(), prefix=f"f{b}", customer=lambda i, b=b: f"c{b + i}")
            store.ingest_future(evs).result()
        clock.set(now)
        flusher = flusher_for(store, settings, clock, env)
        started = time.perf_counter()
        summary = asyncio.run(flusher.flush_once())
        secs = time.perf_counter() - started
        store.close()
    return {"records": n, "seconds": secs, "calls": summary.calls, "sent": summary.outcomes["sent"],
            "calls_per_s": summary.calls / secs, "configured_calls_per_s": settings.calls_per_s,
            "records_per_call": summary.outcomes["sent"] / max(summary.calls, 1)}


def bench_retention(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Constant load over simulated hours with retention on: rows and file size must level off."""
    hours = 6 if args.smoke else 12
    per_hour = 5_000 if args.smoke else 20_000
    with simulator() as env:
        t0 = hour_start(time.time()) - hours * HOUR_S
        clock = ManualClock(t0 + 60)
        settings = Settings(birth_hour="report", db_path=tmp / "retention.db", region="us-east-1", product_code="bench",
                            retention_s=2 * HOUR_S, max_event_age_s=2 * HOUR_S, calls_per_s=1000)
        store = Store.open(settings.db_path, settings=settings, clock=clock)
        flusher = flusher_for(store, settings, clock, env)
        series = []
        for h in range(hours):
            clock.set(t0 + h * HOUR_S + 600)
            for b in range(0, per_hour, 1000):
                store.ingest_future(make_events(1000, now=clock.now(), prefix=f"r{h}-{b}")).result()

            async def flush_and_prune() -> int:
                await flusher.flush_once()
                return await store.prune(batch=1000, max_batches=10_000)

            pruned = asyncio.run(flush_and_prune())
            import sqlite3

            conn = sqlite3.connect(settings.db_path)
            rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            series.append({"hour": h, "event_rows": rows, "pruned": pruned,
                           "db_bytes": db_size_bytes(settings.db_path)})
        store.close()
    return {"events_per_hour": per_hour, "retention_s": 2 * HOUR_S, "series": series}


def bench_startup(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Time from `sidecar serve` to a healthy /healthz with many stored events."""
    n = 50_000 if args.smoke else 1_000_000
    db = tmp / "startup.db"
    now = time.time()
    settings = Settings(birth_hour="report", db_path=db, synchronous="NORMAL")
    store = Store.open(db, settings=settings, clock=ManualClock(now))
    for b in range(0, n, 5000):
        store.ingest_future(make_events(5000, now=now, prefix=f"u{b}")).result()
    store.close()
    port = free_port()
    started = time.perf_counter()
    proc = start([sys.executable, "-m", "sidecar", "serve"], sidecar_env(db, port))
    try:
        secs = wait_http(f"http://127.0.0.1:{port}/healthz")
    finally:
        stop(proc)
    return {"events": n, "seconds": time.perf_counter() - started if secs is None else secs,
            "db_bytes": db_size_bytes(db)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few seconds per case; no targets judged")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per load case (default 10, smoke 1)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.0 if args.smoke else 10.0)
    logs.configure(level="warning", fmt="console")
    generator = "wrk" if args.loadgen == "wrk" or (args.loadgen == "auto" and have_wrk()) else "aiohttp"
    machine = {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "loadgen": generator, "smoke": args.smoke}
    results: dict[str, Any] = {"machine": machine}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as t:
        tmp = Path(t)
        results["http"] = bench_http(args, tmp, generator)
        results["storage"] = bench_storage(args, tmp)
        results["flush"] = bench_flush(args, tmp)
        results["startup"] = bench_startup(args, tmp)
        results["retention"] = bench_retention(args, tmp)
        results["fleet"] = bench_fleet(args, tmp)
        results["lifecycle"] = bench_lifecycle(args, tmp)
    h, s, f, u = results["http"], results["storage"], results["flush"], results["startup"]
    best_batch = max(v["events_per_s"] for k, v in h.items() if k.startswith("batch_"))
    ratios = {
        "ingest_vs_baseline": h["ingest"]["rps"] / h["baseline"]["rps"],
        "ingest_p99_ms": h["ingest"]["p99_ms"],
        "batch_events_per_s": best_batch,
        "batch_vs_storage": best_batch / s["events_per_s"],
        "flush_rate_ratio": f["calls_per_s"] / f["configured_calls_per_s"],
        "peak_rss_mb": h["peak_rss_mb"],
        "startup_1m_s": u["seconds"],
        "fleet_ingest_ratio": results["fleet"]["ingest"]["ratio"],
        "fleet_ship_deltas_per_s": results["fleet"]["shipping"]["deltas_per_s"],
        "fleet_leader_pass_s": results["fleet"]["leader_pass"]["seconds"],
        "fleet_failover_over_ttl_s": results["fleet"]["failover"]["seconds"] - results["fleet"]["failover"]["lease_s"],
        "lifecycle_final_usage_max_s": results["lifecycle"]["max_s"],
    }
    results["ratios"] = ratios
    lower_is_better = {"ingest_p99_ms", "peak_rss_mb", "startup_1m_s", "fleet_leader_pass_s",
                       "fleet_failover_over_ttl_s", "lifecycle_final_usage_max_s"}
    rows = [
        ("baseline: bare aiohttp, single POSTs, 64 conns", f"{h['baseline']['rps']:,.0f} req/s",
         f"p50 {h['baseline']['p50_ms']:.2f} ms, p99 {h['baseline']['p99_ms']:.2f} ms"),
        ("ingest: sidecar, single events, 64 conns", f"{h['ingest']['rps']:,.0f} ev/s",
         f"p50 {h['ingest']['p50_ms']:.2f} ms, p99 {h['ingest']['p99_ms']:.2f} ms"),
    ]
    for k, v in h.items():
        if k.startswith("batch_"):
            rows.append((f"batch ingest: {k[6:].replace('_', ' events, ')} bodies, 4 posters",
                         f"{v['events_per_s']:,.0f} ev/s", f"{v['events']:,} events"))
    rows += [
        ("storage ceiling: store ingest, batches of 1,000, FULL", f"{s['events_per_s']:,.0f} ev/s",
         f"{s['events']:,} events"),
        (f"flush: {f['records']:,} records to the simulator", f"{f['calls_per_s']:.2f} calls/s",
         f"{f['records_per_call']:.1f} records/call, {f['seconds']:.1f} s (limit {f['configured_calls_per_s']:.0f}/s)"),
        ("footprint: peak RSS under load", f"{h['peak_rss_mb']:.1f} MB", ""),
        ("footprint: database bytes per stored event", f"{h['db_bytes_per_event']:.0f} B",
         f"{h['events_stored']:,} events"),
        (f"start-up with {u['events']:,} stored events", f"{u['seconds']:.2f} s", f"DB {u['db_bytes'] / 1e6:.0f} MB"),
    ]
    fl = results["fleet"]
    rows += [
        ("fleet: ingest on one member vs single-file", f"{fl['ingest']['ratio']:.2f}x",
         f"{fl['ingest']['fleet_events_per_s']:,.0f} vs {fl['ingest']['single_events_per_s']:,.0f} ev/s"
         " (100-event bodies, 4 posters)"),
        (f"fleet: shipping, {fl['shipping']['members']} members into PostgreSQL",
         f"{fl['shipping']['deltas_per_s']:,.0f} deltas/s", f"{fl['shipping']['deltas']:,} deltas"),
        (f"fleet: leader pass over {fl['leader_pass']['buckets']:,} due buckets",
         f"{fl['leader_pass']['seconds']:.2f} s",
         f"seal + freeze, {fl['leader_pass']['frozen']:,} records"),
        ("fleet: failover after the leader dies", f"{fl['failover']['seconds']:.2f} s",
         f"lease TTL {fl['failover']['lease_s']:.0f} s"),
        ("lifecycle: unsubscribe-pending published -> billed", f"{results['lifecycle']['median_s']:.3f} s",
         f"median; max {results['lifecycle']['max_s']:.3f} s over {results['lifecycle']['customers']} customers"
         " (SQS long poll, seal, send)"),
    ]
    series = results["retention"]["series"]
    rows.append((f"retention: {results['retention']['events_per_hour']:,} events/h, keep 2 h",
                 f"{series[-1]['event_rows']:,} rows",
                 "rows by hour " + " ".join(f"{p['event_rows'] // 1000}k" for p in series)
                 + f"; DB {series[-1]['db_bytes'] / 1e6:.1f} MB (peak {max(p['db_bytes'] for p in series) / 1e6:.1f})"))
    print(f"\nmachine: {machine['cores']} cores, Python {machine['python']}, load generator: {generator}"
          f"{' (smoke run: targets not judged)' if args.smoke else ''}\n")
    print(f"| {'case':<52} | {'result':>14} | detail |\n|{'-' * 54}|{'-' * 16}|--------|")
    for name, value, detail in rows:
        print(f"| {name:<52} | {value:>14} | {detail} |")
    print("\n| target | measured | goal | met |\n|---|---|---|---|")
    for key, goal in TARGETS.items():
        got = ratios[key]
        met = got <= goal if key in lower_is_better else got >= goal
        print(f"| {key} | {got:,.2f} | {'≤' if key in lower_is_better else '≥'} {goal:,} | {'yes' if met else 'no'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
