"""The latency benchmark runs end to end (tiny sizes) and prints its table."""

from __future__ import annotations

import pytest

from vllm_metering import bench_latency


def test_bench_runs_in_process_and_every_metered_request_reaches_the_sidecar(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A small in-process run prints p50/p99 rows for each workload and loses no event."""
    bench_latency.main(["--requests", "10", "--tokens", "4"])
    out = capsys.readouterr().out
    assert "p99 +" in out
    for workload in bench_latency.WORKLOADS:
        assert f"in-process {workload}: last byte, sink" in out
    assert "in-process: 330 requests through the reporter, 330 events stored by the sidecar" in out
