"""The NDJSON spool: durable appends under a cap, acknowledged replay, crash and multi-process safety."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_metering.spool import Spool


def _line(i: int) -> bytes:
    return json.dumps({"event_id": f"e-{i}", "prompt_tokens": i}).encode()


def _replay_all(spool: Spool, *, max_events: int = 1000) -> list[bytes]:
    seen: list[bytes] = []
    while (batch := spool.next_batch(max_events=max_events, max_bytes=10**6)) is not None:
        seen += batch.lines
        spool.commit(batch)
    return seen


def test_appended_lines_replay_in_order_in_batches(tmp_path: Path) -> None:
    """Lines come back in the order written, batch by batch, and the spool is empty afterwards."""
    spool = Spool(tmp_path / "s.ndjson", max_bytes=10**6)
    spool.append([_line(i) for i in range(7)])
    spool.append([_line(i) for i in range(7, 10)])
    assert _replay_all(spool, max_events=3) == [_line(i) for i in range(10)]
    assert not spool.has_data()
    assert not spool.replaying_path.exists()


def test_appends_during_replay_go_to_a_fresh_file(tmp_path: Path) -> None:
    """Events spooled while a replay runs are not lost when the replayed file is deleted."""
    spool = Spool(tmp_path / "s.ndjson", max_bytes=10**6)
    spool.append([_line(1), _line(2)])
    batch = spool.next_batch(max_events=10, max_bytes=10**6)
    assert batch is not None and batch.at_eof
    spool.append([_line(3)])
    spool.commit(batch)
    assert _replay_all(spool) == [_line(3)]


def test_uncommitted_replay_is_sent_again_after_a_crash(tmp_path: Path) -> None:
    """A batch read but never acknowledged is read again by the next process, from the start."""
    path = tmp_path / "s.ndjson"
    first = Spool(path, max_bytes=10**6)
    first.append([_line(i) for i in range(5)])
    batch = first.next_batch(max_events=2, max_bytes=10**6)
    assert batch is not None
    first.commit(batch)  # the first two were acknowledged...
    assert first.next_batch(max_events=2, max_bytes=10**6) is not None  # ...the next two were in flight
    first.release()  # the process dies
    assert _replay_all(Spool(path, max_bytes=10**6)) == [_line(i) for i in range(5)]


def test_only_one_process_replays_at_a_time(tmp_path: Path) -> None:
    """A second spool on the same path (another vLLM API-server process) does not replay concurrently."""
    path = tmp_path / "s.ndjson"
    first, second = Spool(path, max_bytes=10**6), Spool(path, max_bytes=10**6)
    first.append([_line(1)])
    assert first.next_batch(max_events=10, max_bytes=10**6) is not None
    assert second.next_batch(max_events=10, max_bytes=10**6) is None
    first.release()
    assert second.next_batch(max_events=10, max_bytes=10**6) is not None
    second.release()


def test_torn_line_is_skipped_and_never_glued_to_the_next(tmp_path: Path) -> None:
    """A fragment left by a crash mid-write is skipped, and the next append starts on a new line."""
    path = tmp_path / "s.ndjson"
    spool = Spool(path, max_bytes=10**6)
    spool.append([_line(1)])
    with open(path, "ab") as handle:
        handle.write(b'{"event_id":"e-2","prom')
    spool.append([_line(3)])
    batch = spool.next_batch(max_events=10, max_bytes=10**6)
    assert batch is not None
    assert batch.lines == [_line(1), _line(3)]
    assert batch.corrupt == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**9), max_size=60), st.integers(min_value=50, max_value=3000))
def test_cap_is_never_exceeded_and_counts_add_up(tmp_path_factory: object, values: list[int], cap: int) -> None:
    """Whatever is appended, the spool stays under its cap and written + dropped = offered."""
    directory = tmp_path_factory.mktemp("spool")  # type: ignore[attr-defined]
    spool = Spool(directory / "s.ndjson", max_bytes=cap)
    offered = written = 0
    for start in range(0, len(values), 7):
        lines = [_line(v) for v in values[start : start + 7]]
        result = spool.append(lines)
        offered += len(lines)
        written += result.written
        assert result.written + result.dropped == len(lines)
        assert spool.size_bytes() <= cap
    assert len(_replay_all(spool)) == written <= offered


def test_rejected_events_are_kept_with_their_reason(tmp_path: Path) -> None:
    """Events the sidecar refused are written to <spool>.rejected with the error."""
    spool = Spool(tmp_path / "s.ndjson", max_bytes=10**6)
    assert spool.append_rejected([(_line(1), "time: in the future")]) == 0
    [record] = [json.loads(line) for line in spool.rejected_path.read_text().splitlines()]
    assert record == {"error": "time: in the future", "event": {"event_id": "e-1", "prompt_tokens": 1}}
