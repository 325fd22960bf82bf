"""schema/usage-event.schema.json and the parser agree on what a valid event is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from helpers import ACCOUNT, event
from test_events import REJECTIONS

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "schema" / "usage-event.schema.json").read_text())
# Rules that depend on the clock, or on Python's date parsing, cannot be written in JSON Schema.
NOT_IN_SCHEMA = {"time future", "time too old", "time impossible", "gpu infinite"}


@pytest.mark.parametrize(("name", "obj", "message"), [r for r in REJECTIONS if r[0] not in NOT_IN_SCHEMA],
                         ids=[r[0] for r in REJECTIONS if r[0] not in NOT_IN_SCHEMA])
def test_schema_rejects_what_the_parser_rejects(name: str, obj: Any, message: str) -> None:
    """Every static contract rule is in the schema too."""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, SCHEMA)


@pytest.mark.parametrize("obj", [
    event(1), event(2, customer=ACCOUNT), event(3, customer={"tenant": "acme"}),
    event(4, cached_tokens=3, gpu_seconds=0.5, model="m", finish="stop", extra_field=True),
])
def test_schema_accepts_valid_events(obj: dict[str, Any]) -> None:
    """Events the parser accepts are valid against the schema."""
    jsonschema.validate(obj, SCHEMA)
