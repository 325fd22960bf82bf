"""Security defaults: loopback by default, token checks, and no secrets in logs."""

from __future__ import annotations

import json
from pathlib import Path

from procs import SidecarProcess

from sidecar.config import load_settings
from sidecar.logs import _redact

TOKEN = "tok-0123456789abcdef-SECRET"


def test_default_listen_is_loopback() -> None:
    """With nothing configured the daemon listens on 127.0.0.1 only."""
    assert load_settings({}).listen_host == "127.0.0.1"


def test_redaction_processor() -> None:
    """Any log key that names a credential is replaced before rendering."""
    out = _redact(None, "info", {"event": "x", "token": TOKEN, "Authorization": "Bearer x",
                                 "aws_secret_access_key": "k", "count": 3})
    assert out == {"event": "x", "token": "[redacted]", "Authorization": "[redacted]",
                   "aws_secret_access_key": "[redacted]", "count": 3}


def test_token_and_credentials_never_reach_the_log(tmp_path: Path) -> None:
    """A daemon with a token, hit with right and wrong tokens at debug level, never logs either."""
    proc = SidecarProcess(tmp_path / "s.db", env={"SIDECAR_TOKEN": TOKEN, "SIDECAR_LOG_LEVEL": "debug"})
    proc.start()
    try:
        import urllib.request

        for auth in (f"Bearer {TOKEN}", "Bearer wrong-token-value-xyz"):
            req = urllib.request.Request(proc.url + "/v1/events", method="POST", data=json.dumps({
                "event_id": "e1", "time": "2026-11-28T00:00:00Z", "customer": {"tenant": "t"},
                "prompt_tokens": 1, "completion_tokens": 1}).encode(),
                headers={"Content-Type": "application/json", "Authorization": auth})
            try:
                urllib.request.urlopen(req, timeout=5).close()
            except urllib.error.HTTPError:
                pass
    finally:
        proc.terminate()
    log = proc.log()
    assert "sidecar_started" in log
    for secret in (TOKEN, "wrong-token-value-xyz", proc.env["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in log
