"""schema/openapi.json: a valid OpenAPI 3.1 document, in step with the router, that the live sidecar honours."""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import openapi_spec_validator
import pytest
import schemathesis
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, settings
from procs import SidecarProcess
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from sidecar.app import OPEN_PATHS, create_app
from sidecar.config import Settings
from sidecar.events import NDJSON_TYPES, RFC3339

ROOT = Path(__file__).resolve().parent.parent
OPENAPI_PATH = ROOT / "schema" / "openapi.json"
EVENT_SCHEMA_PATH = ROOT / "schema" / "usage-event.schema.json"
DOC: dict[str, Any] = json.loads(OPENAPI_PATH.read_text())
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
OPENAPI_ROUTE = ("GET", "/openapi.json")
TOKEN = "t" * 32


def routed_operations() -> set[tuple[str, str]]:
    """(method, path) of every route the app registers, less the HEAD that aiohttp adds to each GET."""
    app = create_app(Settings())
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.resource is not None and r.method != "HEAD"}


def documented_operations() -> set[tuple[str, str]]:
    """(method, path) of every operation in the document."""
    return {(method.upper(), path) for path, item in DOC["paths"].items() for method in item if method in HTTP_METHODS}


ROUTED = routed_operations()


def test_document_is_valid_openapi_3_1() -> None:
    """The document passes the OpenAPI 3.1 validator, schemas included."""
    assert DOC["openapi"].startswith("3.1.")
    openapi_spec_validator.validate(DOC, cls=openapi_spec_validator.OpenAPIV31SpecValidator)


def test_embedded_event_schema_is_the_contract() -> None:
    """components/schemas/UsageEvent is schema/usage-event.schema.json, less the keys that only a file has."""
    contract = json.loads(EVENT_SCHEMA_PATH.read_text())
    assert DOC["components"]["schemas"]["UsageEvent"] == {
        k: v for k, v in contract.items() if k not in ("$schema", "$id")}


def test_every_route_is_documented_and_nothing_else() -> None:
    """The router and the document name the same operations (GET /openapi.json may wait for its route)."""
    documented = documented_operations()
    if OPENAPI_ROUTE not in ROUTED:
        documented.discard(OPENAPI_ROUTE)
    assert sorted(ROUTED - documented) == [], "routes missing from schema/openapi.json"
    assert sorted(documented - ROUTED) == [], "operations in schema/openapi.json that no route serves"


def test_open_routes_need_no_token() -> None:
    """The token is optional everywhere, and exactly the auth middleware's open paths opt out of it."""
    assert DOC["security"] == [{}, {"bearerAuth": []}]
    open_paths = {path for path, item in DOC["paths"].items()
                  for method, op in item.items() if method in HTTP_METHODS and op.get("security") == []}
    assert open_paths == set(OPEN_PATHS)


async def test_served_document_is_the_file(tmp_path: Path) -> None:
    """GET /openapi.json serves schema/openapi.json unchanged."""
    if OPENAPI_ROUTE not in ROUTED:
        pytest.skip("GET /openapi.json is not routed yet")
    app = create_app(Settings(db_path=tmp_path / "sidecar.db"), background=False)
    async with TestClient(TestServer(app)) as c:
        resp = await c.get("/openapi.json")
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == DOC


# --- the live sidecar against the document ------------------------------------------------------------


@schemathesis.serializer(*NDJSON_TYPES)
def ndjson_serializer(ctx: Any, value: Any) -> bytes:
    """NDJSON bodies are documented as strings; a list (negative data) goes as one JSON value per line."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return b"".join(json.dumps(v).encode() + b"\n" for v in value)
    return json.dumps(value).encode()


schema = schemathesis.openapi.from_path(OPENAPI_PATH)
if OPENAPI_ROUTE not in ROUTED:
    schema = schema.exclude(method="GET", path="/openapi.json")

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """`python -m sidecar serve` on a fresh database; its sends go nowhere, its shutdown flush gives up fast."""
    proc = SidecarProcess(tmp_path_factory.mktemp("openapi") / "sidecar.db",
                          env={"SIDECAR_SHUTDOWN_DEADLINE_S": "1"})
    proc.start()
    yield proc
    assert proc.terminate() == 0, proc.log()


def recent_times(body: Any, now: float) -> Any:
    """Move schema-valid event times into the acceptance window, so events are stored, not all refused as old.

    The offset (0 to 47 h back) comes from the event_id, so late usage and duplicates are exercised too
    and the same example always gets the same time within one run.
    """
    def fix(event: Any) -> Any:
        if isinstance(event, dict) and isinstance(event.get("time"), str) and RFC3339.match(event["time"]):
            seed = zlib.crc32(str(event.get("event_id")).encode())
            when = datetime.fromtimestamp(now - seed % (47 * 3600), UTC)
            return {**event, "time": when.isoformat().replace("+00:00", "Z")}
        return event

    return [fix(e) for e in body] if isinstance(body, list) else fix(body)


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_live_sidecar_conforms(case: Any, live_sidecar: SidecarProcess) -> None:
    """Every operation, fed schema-driven valid and invalid input, answers without a 5xx and as documented."""
    if case.method == "POST" and case.operation.path == "/v1/events" and case.media_type == "application/json":
        case.body = recent_times(case.body, datetime.now(UTC).timestamp())
    checks = CHECKS
    if case.operation.path == "/v1/registrations":  # no AWS here: ResolveCustomer answers the documented 503
        checks = [c for c in CHECKS if c is not not_a_server_error]
    case.call_and_validate(base_url=live_sidecar.url, checks=checks, timeout=10)


# --- hand-made refusals --------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, str, str, dict[str, str], bytes, int]] = [
    # (id, method, path, headers, body, expected status)
    ("unknown path", "GET", "/nope", {}, b"", 404),
    ("method not allowed", "DELETE", "/v1/events", {}, b"", 405),
    ("GET on a PUT route", "GET", "/v1/customers/acme", {}, b"", 405),
    ("bad JSON", "POST", "/v1/events", {"Content-Type": "application/json"}, b"{not json", 400),
    ("duplicate keys", "POST", "/v1/events", {"Content-Type": "application/json"}, b'{"a": 1, "a": 2}', 400),
    ("NaN", "POST", "/v1/events", {"Content-Type": "application/json"}, b'{"gpu_seconds": NaN}', 400),
    ("scalar body", "POST", "/v1/events", {"Content-Type": "application/json"}, b"42", 400),
    ("huge body", "POST", "/v1/events", {"Content-Type": "application/json"}, b"[" + b" " * 2048 + b"]", 413),
    ("wrong content type", "POST", "/v1/events", {"Content-Type": "text/plain"}, b"{}", 415),
    ("no content type", "POST", "/v1/events", {}, b"{}", 415),
    ("customer: wrong content type", "PUT", "/v1/customers/acme", {"Content-Type": "text/plain"}, b"{}", 415),
    ("customer: bad JSON", "PUT", "/v1/customers/acme", {"Content-Type": "application/json"}, b"{", 400),
    ("customer: not a customer", "PUT", "/v1/customers/acme", {"Content-Type": "application/json"},
     b'{"tenant": "x"}', 422),
    ("customer: huge body", "PUT", "/v1/customers/acme", {"Content-Type": "application/json"}, b" " * 70_000, 413),
    ("customer: tenant too long", "PUT", "/v1/customers/" + "x" * 257, {"Content-Type": "application/json"},
     b'{"customer_identifier": "c"}', 400),
    ("usage: bad from", "GET", "/usage?from=yesterday", {}, b"", 400),
]


@pytest.fixture
async def small_client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    """The real app with a 1 KiB body limit, so a "huge" body stays small."""
    app = create_app(Settings(db_path=tmp_path / "sidecar.db", max_body_bytes=1024), background=False)
    async with TestClient(TestServer(app)) as c:
        yield c


def assert_documented_error(status: int, body: bytes, content_type: str) -> None:
    """A refusal is a JSON object with an "error" string, valid against the document's Error schema."""
    assert content_type == "application/json", (status, content_type, body[:200])
    payload = json.loads(body)
    assert isinstance(payload, dict)
    assert isinstance(payload.get("error"), str)
    assert payload["error"]
    jsonschema.validate(payload, DOC["components"]["schemas"]["Error"])


@pytest.mark.parametrize(("method", "path", "headers", "body", "status"),
                         [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS])
async def test_refusals_are_json_errors(small_client: TestClient[Any, Any], method: str, path: str,
                                       headers: dict[str, str], body: bytes, status: int) -> None:
    """Each hand-made bad request gets its status and a JSON body with an "error" key."""
    resp = await small_client.request(method, path, data=body, headers=headers, skip_auto_headers={"Content-Type"})
    assert resp.status == status, await resp.text()
    assert_documented_error(resp.status, await resp.read(), resp.content_type)


async def test_chunked_huge_body_is_a_json_413(small_client: TestClient[Any, Any]) -> None:
    """A body without Content-Length is cut off at the limit while streaming, with the same JSON refusal."""
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * 512

    resp = await small_client.post("/v1/events", data=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert_documented_error(resp.status, await resp.read(), resp.content_type)


async def test_missing_token_is_a_json_401(tmp_path: Path) -> None:
    """With SIDECAR_TOKEN set, a request without it gets a JSON 401, and /healthz still answers."""
    app = create_app(Settings(db_path=tmp_path / "sidecar.db", token=TOKEN), background=False)
    async with TestClient(TestServer(app)) as c:
        resp = await c.post("/v1/events", json={})
        assert resp.status == 401
        assert_documented_error(resp.status, await resp.read(), resp.content_type)
        assert (await c.get("/healthz")).status == 200


def documented_statuses(method: str, path: str) -> set[str] | None:
    """The documented response statuses of the operation a concrete request path hits, or None."""
    bare = path.split("?")[0]
    key = "/v1/customers/{tenant}" if bare.startswith("/v1/customers/") else bare
    op = DOC["paths"].get(key, {}).get(method.lower())
    return None if op is None else set(op["responses"])


def test_hand_made_refusals_are_documented() -> None:
    """Every status the hand-made requests get from a documented operation is in that operation's responses."""
    for _, method, path, _, _, status in BAD_REQUESTS:
        statuses = documented_statuses(method, path)
        if statuses is not None:
            assert str(status) in statuses, f"{method} {path} does not document {status}"


# Server errors that schemathesis once found against the live sidecar, kept as regression tests.
KNOWN_SERVER_ERRORS = [
    pytest.param("PUT", "/v1/customers/acme", b"[]", id="PUT customer with an empty array"),
    pytest.param("PUT", "/v1/customers/acme", b'[{"customer_identifier": "x"}, 5]', id="PUT customer array"),
    pytest.param("GET", "/usage?from=-Infinity", b"", id="usage from=-Infinity"),
    pytest.param("GET", "/usage?to=1e300", b"", id="usage to=1e300"),
    pytest.param("GET", "/usage?from=99999999999999999999", b"", id="usage from=huge integer"),
]


@pytest.mark.parametrize(("method", "path", "body"), KNOWN_SERVER_ERRORS)
async def test_known_server_errors_are_refusals(small_client: TestClient[Any, Any], method: str, path: str,
                                                body: bytes) -> None:
    """Inputs that once crashed a handler get a documented 4xx JSON refusal."""
    resp = await small_client.request(method, path, data=body, headers={"Content-Type": "application/json"})
    assert 400 <= resp.status < 500, resp.status
    assert str(resp.status) in (documented_statuses(method, path) or set())
    assert_documented_error(resp.status, await resp.read(), resp.content_type)

