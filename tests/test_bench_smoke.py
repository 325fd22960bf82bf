"""The benchmark's smoke run, so it cannot rot (no targets are judged here: speed is not a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path: Path) -> None:
    """`python -m bench.run --smoke` measures every case and writes its JSON."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--loadgen", "aiohttp", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    print(done.stdout)
    results = json.loads(out.read_text())
    assert set(results) == {"machine", "http", "storage", "flush", "startup", "retention", "fleet", "lifecycle",
                            "ratios"}
    rows = [p["event_rows"] for p in results["retention"]["series"]]
    assert max(rows[3:]) <= rows[2] * 1.01, f"the event ledger must stop growing under retention: {rows}"
    assert results["http"]["ingest"]["requests"] > 0
    assert results["http"]["ingest"]["errors"] == 0
    assert results["flush"]["sent"] == results["flush"]["records"]
    assert "| ingest: sidecar, single events, 64 conns" in done.stdout
    fleet = results["fleet"]
    assert fleet["leader_pass"]["frozen"] == fleet["leader_pass"]["buckets"]
    assert fleet["shipping"]["deltas"] > 0 and fleet["ingest"]["fleet_events_per_s"] > 0
    assert results["lifecycle"]["customers"] == len(results["lifecycle"]["seconds"]) > 0
