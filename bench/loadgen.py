"""Load generators for the benchmark: wrk when installed, else a built-in aiohttp client.

Both post single usage events with unique ids over keep-alive connections and report requests/s
and latency percentiles. The same generator is used for the baseline and the sidecar in one run.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

WRK_SCRIPT = r"""
local counter = 0
local prefix = "%s-" .. tostring(math.random(1, 1000000000)) .. "-"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  local body = '{"event_id":"' .. prefix .. counter .. '","time":"%s","customer":{"customer_identifier":"c'
    .. (counter %% 50) .. '"},"prompt_tokens":120,"completion_tokens":80}'
  return wrk.format(nil, "%s", nil, body)
end
"""


@dataclass
class LoadResult:
    """What one load run measured."""

    generator: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def single_event(prefix: str, n: int) -> bytes:
    """One usage event with a unique id."""
    return json.dumps({"event_id": f"{prefix}-{n}", "time": now_rfc3339(),
                       "customer": {"customer_identifier": f"c{n % 50}"},
                       "prompt_tokens": 120, "completion_tokens": 80}).encode()


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, *, connections: int, seconds: float, prefix: str) -> LoadResult:
    """Run wrk with a Lua script that makes every request's event id unique."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
    script.write_text(WRK_SCRIPT % (prefix, now_rfc3339(), path))
    base = url.split("/", 3)
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, int(seconds))}s", "--latency",
         "-s", str(script), f"{base[0]}//{base[2]}"], capture_output=True, text=True, check=True)
    script.unlink()
    text = out.stdout

    def pct(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    reqs = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    secs_m = re.search(r"requests in ([\d.]+)(ms|s|m)", text)
    secs = float(secs_m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[secs_m.group(2)]  # type: ignore[union-attr]
    errors_m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return LoadResult("wrk", reqs, secs, reqs / secs, pct("50"), pct("99"),
                      int(errors_m.group(1)) if errors_m else 0)


async def _aiohttp_load(url: str, connections: int, seconds: float, prefix: str) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal counter, errors
            while time.perf_counter() < deadline:
                counter += 1
                body = single_event(prefix, counter)
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status >= 300:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(connections)])
        elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return LoadResult("aiohttp-client", n, elapsed, n / elapsed, latencies[n // 2] * 1000,
                      latencies[min(n - 1, int(n * 0.99))] * 1000, errors)


def run_load(url: str, *, connections: int, seconds: float, prefix: str, generator: str) -> LoadResult:
    """Single-event POST load with the chosen generator."""
    if generator == "wrk":
        return run_wrk(url, connections=connections, seconds=seconds, prefix=prefix)
    return asyncio.run(_aiohttp_load(url, connections, seconds, prefix))


async def _batch_load(url: str, *, batch: int, ndjson: bool, posters: int, seconds: float,
                      prefix: str) -> tuple[int, float, int]:
    counter = 0
    events = 0
    errors = 0
    deadline = time.perf_counter() + seconds
    ctype = "application/x-ndjson" if ndjson else "application/json"
    async with aiohttp.ClientSession() as session:

        # One template per run, made before timing; each request only swaps in a fresh id prefix
        # (a C-speed bytes.replace), so the generator's own CPU stays out of the measurement.
        when = now_rfc3339()
        items = [{"event_id": f"@@PFX@@-{i}", "time": when, "customer": {"customer_identifier": f"c{i % 50}"},
                  "prompt_tokens": 120, "completion_tokens": 80} for i in range(batch)]
        template = ("\n".join(json.dumps(i) for i in items) if ndjson else json.dumps(items)).encode()

        async def poster() -> None:
            nonlocal counter, events, errors
            while time.perf_counter() < deadline:
                counter += 1
                body = template.replace(b"@@PFX@@", f"{prefix}-{counter}".encode())
                async with session.post(url, data=body, headers={"Content-Type": ctype}) as resp:
                    out = await resp.json()
                    if resp.status == 200:
                        events += out["accepted"]
                    else:
                        errors += 1

        started = time.perf_counter()
        await asyncio.gather(*[poster() for _ in range(posters)])
        return events, time.perf_counter() - started, errors


def run_batch_load(url: str, *, batch: int, ndjson: bool, posters: int, seconds: float,
                   prefix: str) -> tuple[int, float, int]:
    """Batched ingest: (events accepted, seconds, failed requests)."""
    return asyncio.run(_batch_load(url, batch=batch, ndjson=ndjson, posters=posters, seconds=seconds, prefix=prefix))
