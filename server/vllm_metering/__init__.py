"""vLLM-side metering: one usage event per request, delivered to the metering sidecar.

Start vLLM with::

    python -m vllm.entrypoints.openai.api_server ... \\
        --middleware vllm_metering.middleware.UsageMiddleware --enable-force-include-usage \\
        --enable-per-request-metrics

`UsageMiddleware` is a pure ASGI middleware. For every POST whose response carries `usage` (chat
and text completions, embeddings, any other endpoint) it builds one "Usage event v1" and hands it to
a `Reporter` (`vllm_metering.reporter`), which batches events to `POST {sidecar}/v1/events`, retries,
spools to disk while the sidecar is away, and replays the spool once it is back. The response (status,
headers, bytes, streaming) is never changed, and a metering failure never fails a request.

Where usage comes from, in order: the JSON body's `usage`; for SSE streams the last `usage` seen in a
`data:` line (the final `choices: []` chunk with `stream_options.include_usage`, or the cumulative
usage vLLM puts in every chunk with `--enable-force-include-usage` / `continuous_usage_stats`); else
`request.state.request_metadata.final_usage_info`. A stream the client cut off is billed for the last
cumulative usage it received, which exists only with `--enable-force-include-usage` (without it, a
disconnected request has no usage at all, is not billed, and the middleware warns once). An error
response (4xx/5xx, or an error event in a stream) yields an event, with `finish` = `error`, only when
usage is known; otherwise none.

GPU time needs vLLM's `--enable-per-request-metrics` (vLLM refuses it with `--disable-log-stats`)
and, for streams, a final usage chunk (`--enable-force-include-usage` or the client's
`stream_options.include_usage`). `gpu_seconds` is the request's engine time from the response's
`metrics`: `time_to_first_token_ms + generation_time_ms`, first scheduling to last token, prefill
included, queue wait excluded. It is left out when vLLM measured none (flag off, n > 1, no output
token); see `usage.gpu_seconds_from_metrics` for the rules. With it come `engine_start` and
`engine_end` (RFC 3339 UTC, microseconds): the request's engine interval on this process's wall clock,
`engine_end` being when the response completed and `engine_end - engine_start` = `gpu_seconds` exactly.
It is engine time inside shared batches, not exclusive GPU time.

The customer of an event: `aws_account_id` + `license_arn` when both configured headers are present,
else `customer_identifier` when its configured header is present, else `{"tenant": ...}` from the first
present header of METERING_TENANT_HEADERS, else METERING_DEFAULT_TENANT. The front door (ALB, API
Gateway) must set these headers and strip copies sent by clients.

`event_id` is the response id (`chatcmpl-…`, `cmpl-…`; else vLLM's request id; else `xrid-<X-Request-Id>`;
else `uuid-<random>`) followed by `~` and 16 random hex digits, minted once per request. The suffix is
there because clients choose response ids (vLLM builds them from X-Request-Id or the body's
`request_id`): a client reusing one would otherwise have all but its first request de-duplicated away.
Set METERING_TRUST_REQUEST_ID=true to send the bare response id. Ids over 128 characters are hashed.

Environment variables, with defaults (read once, when vLLM builds its app; an invalid value stops
start-up with a message naming the variable):

METERING_ENABLED = true
    false: pass every request through unmetered.
METERING_SIDECAR_URL = http://127.0.0.1:9600
    Base URL of the sidecar; batches go to {url}/v1/events.
METERING_SIDECAR_TOKEN = (unset)
    Sent as `Authorization: Bearer <token>`; must equal the sidecar's SIDECAR_TOKEN. Never logged.
METERING_TENANT_HEADERS = x-tenant-id,x-amzn-oidc-identity
    Comma list of request headers; the first one present (and not blank) names the tenant.
METERING_DEFAULT_TENANT = unattributed
    Tenant of requests that carry no tenant header. The sidecar shows it as unmapped in /usage until
    it is mapped to a customer, so the traffic stays visible. Empty: such requests are not reported
    (counted, and warned about once).
METERING_ACCOUNT_ID_HEADER, METERING_LICENSE_ARN_HEADER = (unset)
    Headers carrying the buyer's 12-digit AWS account id and License Manager licence ARN; when both
    are present the event's customer is `{"aws_account_id", "license_arn"}`. Set both or neither.
METERING_CUSTOMER_IDENTIFIER_HEADER = (unset)
    Header carrying a Marketplace CustomerIdentifier (older products): customer `{"customer_identifier"}`.
METERING_TRUST_REQUEST_ID = false
    true: event_id is the bare response id. Only when clients cannot choose X-Request-Id or `request_id`.
METERING_MAX_JSON_BYTES = 2097152
    JSON bodies up to this size are decoded whole after they were sent; larger ones are scanned in their
    first and last 64 KiB only. Also the longest SSE line that is scanned.
METERING_QUEUE_SIZE = 10000
    Events held in memory; when full, further events go straight to the spool.
METERING_BATCH_MAX_EVENTS = 500, METERING_BATCH_MAX_BYTES = 1000000
    Limits of one POST to the sidecar.
METERING_BATCH_LINGER_S = 0.05
    How long the first queued event waits for others before a batch is posted (a full batch goes at
    once); 0 posts as soon as anything is queued.
METERING_REQUEST_TIMEOUT_S = 5
    Timeout of one POST.
METERING_RETRY_ATTEMPTS = 3
    Tries of a batch (429/5xx/connection errors) before it is spooled.
METERING_BACKOFF_BASE_S = 0.2, METERING_BACKOFF_MAX_S = 30
    Exponential backoff with full jitter: uniform(0, min(max, base * 2**attempt)); the ceiling is also
    the longest pause between probes while the sidecar is away.
METERING_SHUTDOWN_TIMEOUT_S = 10
    On ASGI lifespan shutdown: time to deliver the queue before the rest is spooled.
METERING_SPOOL_PATH = $TMPDIR/vllm-metering/spool.ndjson
    The NDJSON spool (see `vllm_metering.spool`). Put it on a volume that outlives the container.
METERING_SPOOL_MAX_BYTES = 268435456
    Cap of the spool (and, separately, of `<spool>.rejected`). Beyond it events are dropped with an
    ERROR log line `vllm_metering usage_events_dropped dropped=N dropped_total=M ...`.

Logs go to the standard `logging` logger "vllm.metering" (a child of vLLM's "vllm" logger, so vLLM's
handlers print it), one structured line per condition (`vllm_metering <event> key=value ...`, the
same fields in the record's `metering` attribute).
Tokens are never logged.
"""

__version__ = "0.1.0"
