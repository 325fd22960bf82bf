"""The `sidecar` command: each subcommand against real database files (and a real daemon for check)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from helpers import event
from procs import SidecarProcess, free_port

from sidecar.cli import main
from sidecar.simulator import Simulator, SimulatorConfig, start


def now_event(n: int, **kw: object) -> dict[str, object]:
    """A valid event stamped with the real current time (the CLI uses the system clock)."""
    from datetime import UTC, datetime

    e = event(n, **kw)  # type: ignore[arg-type]
    e["time"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return e


def test_migrate_creates_and_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sidecar migrate` applies the schema once, then reports up to date."""
    db = tmp_path / "m.db"
    assert main(["migrate", "--db", str(db)], env={}) == 0
    assert "applied 001_core, 002_records" in capsys.readouterr().out
    assert main(["migrate"], env={"SIDECAR_DB": str(db)}) == 0
    assert "up to date" in capsys.readouterr().out


def test_replay_spool_then_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`replay --spool` imports NDJSON (duplicates once, bad lines reported) and `usage` shows it offline."""
    db = tmp_path / "s.db"
    spool = tmp_path / "spool.ndjson"
    lines = [json.dumps(now_event(i)) for i in range(5)] + [json.dumps(now_event(0)), "{broken", ""]
    spool.write_text("\n".join(lines) + "\n")
    code = main(["replay", "--db", str(db), "--spool", str(spool)], env={})
    out = capsys.readouterr()
    assert code == 1  # one line was rejected
    assert json.loads(out.out)["spool"] == {"accepted": 5, "duplicates": 1, "rejected": 1}
    assert "spool.ndjson:7" in out.err
    assert main(["usage", "--db", str(db), "--json", "--dimension", "inference-requests"], env={}) == 0
    usage = json.loads(capsys.readouterr().out)
    assert [r["raw"] for r in usage["rows"]] == [5]
    assert main(["usage", "--db", str(db)], env={}) == 0
    assert "identifier:cust-a" in capsys.readouterr().out


def test_usage_without_database_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`usage` on a missing file exits 1 and says which file."""
    assert main(["usage", "--db", str(tmp_path / "nope.db")], env={}) == 1
    assert "nope.db" in capsys.readouterr().err


def test_bad_setting_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A configuration error exits 2 and names the setting."""
    assert main(["migrate"], env={"SIDECAR_HOUR_GRACE_S": "-5"}) == 2
    assert "SIDECAR_HOUR_GRACE_S" in capsys.readouterr().err


def test_serve_without_region_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`serve` fails at start with a clear message when no AWS region is set."""
    assert main(["serve", "--db", str(tmp_path / "x.db")], env={}) == 2
    assert "AWS_REGION" in capsys.readouterr().err


def test_corrupt_database_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A database that fails its integrity check is never replaced: exit 3 and a message."""
    db = tmp_path / "bad.db"
    db.write_bytes(b"SQLite format 3\x00" + b"\x07" * 8000)
    assert main(["migrate", "--db", str(db)], env={}) == 3
    assert "refusing to start" in capsys.readouterr().err
    assert db.read_bytes()[16:20] == b"\x07" * 4


async def test_flush_once_sends_to_simulator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`flush --once` seals (after the grace), sends, prints a summary, and exits 0 when all is sent."""
    sim = Simulator(SimulatorConfig(subscribe_all=True, product_code="p1"))
    runner, url = await start(sim)
    try:
        db = tmp_path / "f.db"
        # Usage recorded two hours ago (by a store on a clock set back) is due for sending now.
        import time

        from sidecar.clock import ManualClock
        from sidecar.config import Settings
        from sidecar.events import validate_event
        from sidecar.store import Store

        then = time.time() - 7200
        store = Store.open(db, settings=Settings(db_path=db, birth_hour="report"), clock=ManualClock(then))
        store.ingest_future([validate_event(event(1, when=then - 60), now=then, max_age_s=86400,
                                            max_future_s=300)]).result()
        store.close()
        env = {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
               "AWS_ENDPOINT_URL_MARKETPLACE_METERING": url, "SIDECAR_PRODUCT_CODE": "p1"}
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["flush", "--once", "--db", str(db), "--timeout", "5"], env)
        summary = json.loads(capsys.readouterr().out)
        assert code == 0, summary
        assert summary["outcomes"] == {"sent": 2}
        assert sim.counters.billed == 2
    finally:
        await runner.cleanup()


def test_check_against_running_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`check` exits 0 against a healthy daemon and 1 when nothing listens."""
    proc = SidecarProcess(tmp_path / "c.db")
    proc.start()
    try:
        assert main(["check"], env={"SIDECAR_LISTEN": f"127.0.0.1:{proc.port}"}) == 0
        assert "db_writable=True" in capsys.readouterr().out
    finally:
        proc.terminate()
    assert main(["check"], env={"SIDECAR_LISTEN": f"127.0.0.1:{free_port()}"}) == 1


def test_serve_refuses_corrupt_database(tmp_path: Path) -> None:
    """`sidecar serve` on a corrupt file exits 3 with the reason and leaves the file as it was."""
    import subprocess
    import sys

    db = tmp_path / "bad.db"
    junk = b"SQLite format 3\x00" + b"\x07" * 8000
    db.write_bytes(junk)
    done = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--db", str(db)],
                          env={"AWS_REGION": "us-east-1", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    assert "refusing to start" in done.stderr
    assert db.read_bytes() == junk
