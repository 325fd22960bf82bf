"""The domain types in sidecar/model.py are the only spelling of states, schemes and sources."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.events import validate_event
from sidecar.model import (
    SOURCES,
    BucketState,
    CustomerRef,
    HoldOutcome,
    ParkedState,
    RecordState,
    is_tenant_key,
    tenant_key,
    valid_tenant,
)
from sidecar.subscriptions import SubscriptionState

STORE = Path(__file__).resolve().parent.parent / "sidecar" / "store"
# Literals SQL compares a state column with: `state = 'x'`, `state IN ('x', 'y')`, `VALUES (..., 'x')`.
STATE_SQL = re.compile(r"state\s*(?:=|<>|!=)\s*'([a-z_]+)'|state\s+(?:NOT\s+)?IN\s*\(([^)]*)\)", re.I)


def sql_state_literals() -> set[str]:
    found: set[str] = set()
    for path in STORE.glob("*.py"):
        for one, many in STATE_SQL.findall(path.read_text()):
            found |= {one} if one else set(re.findall(r"'([a-z_]+)'", many))
    return found - {""}


def test_every_state_the_store_sql_names_is_a_model_state() -> None:
    """A typo in a SQL state literal ('pendng') would silently match nothing; each must be a model state."""
    known = {s.value for e in (BucketState, RecordState, ParkedState, HoldOutcome, SubscriptionState) for s in e}
    literals = sql_state_literals()
    assert literals, "the pattern found no state literal at all"
    assert literals <= known, literals - known


@given(ident=st.from_regex(r"[!-~]{1,255}", fullmatch=True))
def test_an_identifier_key_parses_back(ident: str) -> None:
    ref = CustomerRef(customer_identifier=ident)
    assert CustomerRef.from_key(ref.key) == ref


def test_an_account_key_parses_back_and_a_tenant_key_is_not_a_customer() -> None:
    ref = CustomerRef(aws_account_id="123456789012",
                      license_arn="arn:aws:license-manager::123456789012:license:l-" + "a" * 32)
    assert CustomerRef.from_key(ref.key) == ref
    assert is_tenant_key(tenant_key("acme")) and not is_tenant_key(ref.key)
    with pytest.raises(ValueError, match="not an AWS customer key"):
        CustomerRef.from_key(tenant_key("acme"))


@pytest.mark.parametrize(("name", "ok"), [("acme", True), ("a" * 256, True), ("", False), ("a" * 257, False),
                                          ("a\nb", False), ("a\x7fb", False), (7, False)])
def test_the_tenant_rule(name: object, ok: bool) -> None:
    assert valid_tenant(name) is ok


def test_every_source_reads_an_event() -> None:
    """The sources table is complete: each source reads its amount from a validated event."""
    e = validate_event({"event_id": "x", "time": "2026-12-01T10:00:00Z", "customer": {"customer_identifier": "c"},
                        "prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 3, "gpu_seconds": 1.5},
                       now=1796119200, max_age_s=10**9, max_future_s=10**9)
    assert {name: e.source_amount(name) for name in SOURCES} == {
        "count": 1, "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cached_tokens": 3,
        "gpu_seconds": 1_500_000}
