"""A two-minute demo with no AWS account: the sidecar, the local Marketplace simulator, a few events.

Run `python -m sidecar.demo`. It starts `sidecar simulate-marketplace` and `sidecar serve` (on an
embedded SQLite file in a fresh folder), posts events (one three times, one invalid), prints
/usage, stops the sidecar with SIGTERM (which seals the open hour and flushes), then prints what
the simulator billed and `sidecar usage` read straight from the database file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PRODUCT = "demo-product"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data,  # noqa: S310 (loopback only)
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"process exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def main() -> int:
    """Run the demo; returns 0 when every step did what it should."""
    work = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    sim_port, port = _port(), _port()
    sim_url, url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "AWS_"))}
    env.update({
        "SIDECAR_DB": str(work / "sidecar.db"), "SIDECAR_LISTEN": f"127.0.0.1:{port}",
        "SIDECAR_PRODUCT_CODE": PRODUCT, "SIDECAR_LOG_FORMAT": "json", "SIDECAR_LOG_LEVEL": "warning",
        "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AKIDDEMO", "AWS_SECRET_ACCESS_KEY": "demo-secret",
        "AWS_ENDPOINT_URL_MARKETPLACE_METERING": sim_url,
        # The demo's simulator is as new as its database: no earlier sidecar can have reported this
        # hour, so the demo bills it at once instead of deferring it to the next hour.
        "SIDECAR_BIRTH_HOUR": "report",
    })
    sidecar = [sys.executable, "-m", "sidecar"]
    log = (work / "demo.log").open("ab")
    sim = subprocess.Popen([*sidecar, "simulate-marketplace", "--listen", f"127.0.0.1:{sim_port}",  # noqa: S603
                            "--subscribe-all", "--product-code", PRODUCT], env=env, stdout=log, stderr=log)
    daemon = subprocess.Popen([*sidecar, "serve"], env=env, stdout=log, stderr=log)  # noqa: S603
    try:
        _wait(sim_url + "/_sim/state", sim)
        _wait(url + "/healthz", daemon)
        print(f"sidecar on {url}, database {work / 'sidecar.db'}, simulator on {sim_url}\n")
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        events = [
            {"event_id": f"chatcmpl-demo-{i}", "time": now, "customer": {"customer_identifier": cust},
             "model": "tiny", "prompt_tokens": prompt, "completion_tokens": completion, "finish": "stop"}
            for i, (cust, prompt, completion) in enumerate(
                [("acme", 1200, 800), ("acme", 300, 150), ("globex", 5000, 2500), ("initech", 40, 10)])
        ]
        for attempt in range(3):
            status, body = _request(url + "/v1/events", events)
            print(f"POST /v1/events (4 events, try {attempt + 1}) -> {status} {body}")
        status, body = _request(url + "/v1/events", {"event_id": "bad", "time": now, "customer": {},
                                                     "prompt_tokens": -1, "completion_tokens": 0})
        print(f"POST /v1/events (invalid event) -> {status} {body}\n")
        _, usage = _request(url + "/usage")
        print("GET /usage (open hour):")
        for row in usage["rows"]:
            print(f"  {row['hour']} {row['customer']:<22} {row['dimension']:<20} raw={row['raw']:<6} {row['state']}")
        print("\nSIGTERM: the sidecar seals the open hour and flushes it before exiting ...")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=40)
        print(f"sidecar exited with {code}\n")
        _, state = _request(sim_url + "/_sim/state")
        print("The simulator billed:")
        for b in sorted(state["billed"], key=lambda b: (b["customer"], b["dimension"])):
            print(f"  {b['customer']:<10} {b['dimension']:<20} quantity={b['quantity']}")
        print(f"\n`sidecar usage --db {work / 'sidecar.db'}` (read from the file, daemon stopped):\n")
        out = subprocess.run([*sidecar, "usage", "--db", str(work / "sidecar.db")], env=env,  # noqa: S603
                             capture_output=True, text=True, check=True)
        print(out.stdout)
        ok = code == 0 and len(state["billed"]) == 6 and state["counters"]["conflicts"] == 0
        print("demo OK" if ok else f"demo FAILED; see {work / 'demo.log'}")
        return 0 if ok else 1
    finally:
        for p in (daemon, sim):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
