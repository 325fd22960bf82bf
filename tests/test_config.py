"""Settings from the environment and TOML: defaults, overrides, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import DEFAULT_DIMENSIONS, CustomerRef, Settings, load_settings, validate_for_serving
from sidecar.errors import ConfigError


def test_defaults() -> None:
    """With nothing set, the documented defaults apply."""
    s = load_settings({})
    assert (s.listen_host, s.listen_port, s.synchronous, s.hour_grace_s) == ("127.0.0.1", 9600, "FULL", 300)
    assert s.dimensions == DEFAULT_DIMENSIONS
    assert s.region is None


def test_env_overrides_toml(tmp_path: Path) -> None:
    """TOML sets values; environment variables win over it."""
    cfg = tmp_path / "sidecar.toml"
    cfg.write_text("""
[sidecar]
hour_grace_s = 120
flush_interval_s = 5
product_code = "prod-abc"

[[dimensions]]
name = "output-tokens"
source = "completion_tokens"
unit = 1000

[customers]
acme = { customer_identifier = "acme-aws" }
""")
    s = load_settings({"SIDECAR_CONFIG": str(cfg), "SIDECAR_HOUR_GRACE_S": "60", "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "eu-west-1"})
    assert s.hour_grace_s == 60
    assert s.flush_interval_s == 5.0
    assert s.product_code == "prod-abc"
    assert [d.name for d in s.dimensions] == ["output-tokens"]
    assert s.customers == {"acme": CustomerRef(customer_identifier="acme-aws")}
    assert s.region == "us-east-1"


@pytest.mark.parametrize(("env", "message"), [
    ({"SIDECAR_LISTEN": "9600"}, "SIDECAR_LISTEN: must be HOST:PORT"),
    ({"SIDECAR_LISTEN": "127.0.0.1:http"}, "SIDECAR_LISTEN: port 'http' is not a number"),
    ({"SIDECAR_HOUR_GRACE_S": "-1"}, "SIDECAR_HOUR_GRACE_S: must not be negative"),
    ({"SIDECAR_FLUSH_INTERVAL_S": "soon"}, "SIDECAR_FLUSH_INTERVAL_S: not a number"),
    ({"SIDECAR_SYNCHRONOUS": "OFF"}, "SIDECAR_SYNCHRONOUS: must be one of FULL, NORMAL, EXTRA"),
    ({"SIDECAR_EXPIRED_POLICY": "drop"}, "SIDECAR_EXPIRED_POLICY: must be one of carry, expire"),
    ({"SIDECAR_TOKEN": "short"}, "SIDECAR_TOKEN: must be at least 16 characters"),
    ({"SIDECAR_CONFIG": "/nonexistent/sidecar.toml"}, "SIDECAR_CONFIG: cannot read"),
])
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    """Each bad value raises ConfigError whose message starts with the setting's name."""
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(("toml", "message"), [
    ("[sidecar]\nnope = 1\n", "[sidecar].nope: unknown setting"),
    ("[[dimensions]]\nname = 'x'\nsource = 'eval(1)'\n", "dimensions[0].source: must be one of"),
    ("[[dimensions]]\nname = 'x'\nsource = 'count'\nunit = 0\n", "dimensions[0].unit: must be a whole number"),
    ("[customers]\nacme = { aws_account_id = '12' , license_arn = 'x' }\n",
     "customers.acme.aws_account_id: must be a string of exactly 12 digits"),
    ("not toml [", "SIDECAR_CONFIG:"),
])
def test_bad_toml_is_named(tmp_path: Path, toml: str, message: str) -> None:
    """TOML mistakes name the table and key."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings({"SIDECAR_CONFIG": str(cfg)})
    assert str(info.value).startswith(message), str(info.value)


def test_region_required_when_asked() -> None:
    """Commands that talk to AWS fail at start with a clear message when no region is set."""
    with pytest.raises(ConfigError, match="AWS_REGION"):
        load_settings({}, require_region=True)
    assert load_settings({"AWS_DEFAULT_REGION": "us-west-2"}, require_region=True).region == "us-west-2"


def test_non_loopback_listen_needs_token() -> None:
    """Listening beyond loopback without a token is refused."""
    with pytest.raises(ConfigError, match="SIDECAR_TOKEN"):
        validate_for_serving(Settings(listen_host="0.0.0.0"))  # noqa: S104
    validate_for_serving(Settings(listen_host="0.0.0.0", token="x" * 16))  # noqa: S104
    validate_for_serving(Settings(listen_host="::1"))
