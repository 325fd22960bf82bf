"""Run the real `sidecar` command as a subprocess for crash and shutdown tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SidecarProcess:
    """`python -m sidecar serve` on a free loopback port with its own database file."""

    def __init__(self, db: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "AWS_"))},
            "SIDECAR_DB": str(db),
            "SIDECAR_LISTEN": f"127.0.0.1:{self.port}",
            "SIDECAR_LOG_FORMAT": "json",
            # Tests that are not about a store's birth report its first hour (see test_billing_fixes).
            "SIDECAR_BIRTH_HOUR": "report",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "AKIDTEST",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            # Nothing listens here unless a test points it at a simulator: sends fail to connect.
            "AWS_ENDPOINT_URL_MARKETPLACE_METERING": f"http://127.0.0.1:{free_port()}",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = db.with_suffix(".log")

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the daemon and wait until /healthz answers."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "serve"], env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise TimeoutError(f"sidecar did not become healthy: {self.log()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, exactly like a crashed container."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout_s: float = 40.0) -> int:
        """SIGTERM and wait for a clean exit; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        """What the daemon wrote to its log so far."""
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def post(self, path: str, body: Any, timeout_s: float = 10.0) -> tuple[int, Any]:
        """POST JSON and return (status, decoded body)."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


def stored_ids(db: Path) -> set[str]:
    """Event ids in the database file."""
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT event_id FROM events")}
    finally:
        conn.close()
