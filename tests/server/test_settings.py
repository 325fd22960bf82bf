"""METERING_* settings: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

import vllm_metering
from vllm_metering.errors import ConfigError
from vllm_metering.settings import ENV_SETTINGS, MeteringSettings, load_settings


def test_defaults_without_any_variable() -> None:
    """An empty environment gives the documented defaults."""
    settings = load_settings({})
    assert settings == MeteringSettings()
    assert settings.events_url == "http://127.0.0.1:9600/v1/events"
    assert settings.tenant_headers == ("x-tenant-id", "x-amzn-oidc-identity")
    assert settings.default_tenant == "unattributed"


def test_variables_are_parsed() -> None:
    """Every kind of value is converted: lists, paths, numbers, booleans, empty meaning unset."""
    settings = load_settings(
        {
            "METERING_SIDECAR_URL": "http://sidecar:9600/",
            "METERING_TENANT_HEADERS": " X-Org , X-Team ",
            "METERING_DEFAULT_TENANT": "",
            "METERING_SPOOL_PATH": "/var/spool/m.ndjson",
            "METERING_SPOOL_MAX_BYTES": "1000",
            "METERING_QUEUE_SIZE": "7",
            "METERING_BACKOFF_MAX_S": "2.5",
            "METERING_TRUST_REQUEST_ID": "yes",
            "METERING_ENABLED": "0",
        }
    )
    assert settings.events_url == "http://sidecar:9600/v1/events"
    assert settings.tenant_headers == ("x-org", "x-team")
    assert settings.default_tenant is None
    assert settings.spool_path == Path("/var/spool/m.ndjson")
    assert (settings.spool_max_bytes, settings.queue_size, settings.backoff_max_s) == (1000, 7, 2.5)
    assert settings.trust_request_id and not settings.enabled


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("METERING_QUEUE_SIZE", "many"),
        ("METERING_QUEUE_SIZE", "0"),
        ("METERING_SIDECAR_URL", "127.0.0.1:9600"),
        ("METERING_ENABLED", "maybe"),
        ("METERING_TENANT_HEADERS", " , "),
        ("METERING_REQUEST_TIMEOUT_S", "-1"),
        ("METERING_SPOOL_PATH", ""),
    ],
)
def test_invalid_values_name_the_variable(variable: str, value: str) -> None:
    """A bad value raises ConfigError whose message starts with the variable's name."""
    with pytest.raises(ConfigError, match=f"^{variable}: "):
        load_settings({variable: value})


def test_account_and_licence_headers_come_together() -> None:
    """Only one of the two AWS customer headers is a configuration error."""
    with pytest.raises(ConfigError, match="METERING_LICENSE_ARN_HEADER"):
        load_settings({"METERING_ACCOUNT_ID_HEADER": "x-account"})


def test_token_is_never_echoed_in_errors() -> None:
    """A rejected token value does not appear in the error message."""
    with pytest.raises(ConfigError) as caught:
        load_settings({"METERING_SIDECAR_TOKEN": "abc\ndef-secret"})
    assert "secret" not in str(caught.value)


def test_every_variable_is_documented() -> None:
    """Each METERING_* variable appears in the package docstring's table."""
    doc = vllm_metering.__doc__ or ""
    missing = [name for name in ENV_SETTINGS if name not in doc]
    assert missing == []
