"""The deployment files: the compose file validates and mirrors one ECS task; the task definition and
IAM policy say what deploy/README.md promises."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
TASK_DEFINITION = ROOT / "deploy" / "ecs" / "task-definition.json"
IAM_POLICY = ROOT / "deploy" / "ecs" / "iam-policy.json"
SIDECAR_DOCKERFILE = ROOT / "deploy" / "docker" / "sidecar.Dockerfile"
VLLM_DOCKERFILE = ROOT / "deploy" / "docker" / "vllm.Dockerfile"
SHUTDOWN_DEADLINE_S = 25  # the sidecar's default SIDECAR_SHUTDOWN_DEADLINE_S
MIDDLEWARE = "vllm_metering.middleware.UsageMiddleware"


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) if the client has it, else a standalone `docker-compose`, else None."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def load_json(path: Path) -> Any:
    """A JSON file, decoded."""
    return json.loads(path.read_text(encoding="utf-8"))


def containers() -> dict[str, dict[str, Any]]:
    """The task definition's containers by name."""
    return {c["name"]: c for c in load_json(TASK_DEFINITION)["containerDefinitions"]}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """A container definition's environment as a mapping."""
    return {e["name"]: e["value"] for e in container.get("environment", [])}


def test_compose_file_validates() -> None:
    """`docker compose config -q` accepts the file, with every profile (needs no Docker engine)."""
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    for profile in ("cpu", "gpu", "fleet", "lifecycle"):
        result = subprocess.run([*cmd, "-f", str(COMPOSE), "--profile", profile, "config", "-q"],
                                capture_output=True, text=True, check=False, cwd=ROOT)
        assert result.returncode == 0, f"profile {profile}: {result.stderr}"


def test_compose_services_share_one_network_namespace() -> None:
    """Like one awsvpc task: every service joins the sidecar's namespace, which publishes only vLLM's port."""
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    assert {"sidecar", "marketplace", "vllm", "vllm-cpu", "tiny-model"} <= set(services)
    sidecar = services["sidecar"]
    assert "network_mode" not in sidecar
    assert sidecar["environment"]["SIDECAR_LISTEN"] == "127.0.0.1:9600"
    assert sidecar["environment"]["AWS_ENDPOINT_URL_MARKETPLACE_METERING"] == "http://127.0.0.1:9700"
    assert sidecar["environment"]["AWS_REGION"]
    assert [p.rsplit(":", 1)[-1] for p in sidecar["ports"]] == ["8000"]
    for name in ("marketplace", "vllm", "vllm-cpu"):
        assert services[name]["network_mode"] == "service:sidecar", name
    for name in ("vllm", "vllm-cpu"):
        assert services[name]["depends_on"]["sidecar"]["condition"] == "service_healthy"
        assert services[name]["environment"]["METERING_SIDECAR_URL"] == "http://127.0.0.1:9600"
        assert services[name]["environment"]["METERING_SPOOL_PATH"].startswith("/spool/")
    assert "127.0.0.1:9700" in services["marketplace"]["command"]
    assert "--subscribe-all" in services["marketplace"]["command"]
    assert services["vllm-cpu"]["depends_on"]["tiny-model"]["condition"] == "service_completed_successfully"
    assert services["vllm"]["profiles"] == ["gpu"]
    assert services["vllm-cpu"]["profiles"] == services["tiny-model"]["profiles"] == ["cpu"]


def test_task_definition_runs_vllm_after_a_healthy_sidecar() -> None:
    """Both containers, the sidecar essential and health-checked, vLLM waiting for it to be HEALTHY."""
    task = load_json(TASK_DEFINITION)
    assert task["networkMode"] == "awsvpc"
    by_name = containers()
    assert set(by_name) == {"sidecar", "vllm"}
    sidecar, vllm = by_name["sidecar"], by_name["vllm"]
    assert sidecar["essential"] is True
    assert sidecar["healthCheck"]["command"] == ["CMD", "sidecar", "check"]
    assert {"containerName": "sidecar", "condition": "HEALTHY"} in vllm["dependsOn"]
    volumes = {v["name"] for v in task["volumes"]}
    assert {m["sourceVolume"] for m in sidecar["mountPoints"]} <= volumes
    assert {m["sourceVolume"] for m in vllm["mountPoints"]} <= volumes
    assert [m["containerPath"] for m in sidecar["mountPoints"]] == ["/data"]


def test_task_definition_gives_the_shutdown_flush_time() -> None:
    """stopTimeout covers the sidecar's 25 s flush deadline plus a margin; vLLM finishes requests and
    drains its reporter (it stops first, as it depends on the sidecar) within its own stopTimeout."""
    sidecar, vllm = containers()["sidecar"], containers()["vllm"]
    assert sidecar["stopTimeout"] >= 30
    assert sidecar["stopTimeout"] >= SHUTDOWN_DEADLINE_S + 5
    deadline = float(env_of(sidecar).get("SIDECAR_SHUTDOWN_DEADLINE_S", SHUTDOWN_DEADLINE_S))
    assert sidecar["stopTimeout"] >= deadline + 5
    command = vllm["command"]
    grace = float(command[command.index("--shutdown-timeout") + 1]) if "--shutdown-timeout" in command else 0.0
    drain = float(env_of(vllm).get("METERING_SHUTDOWN_TIMEOUT_S", 10))
    assert vllm["stopTimeout"] >= grace + drain + 5
    assert vllm["stopTimeout"] <= 120 and sidecar["stopTimeout"] <= 120  # ECS's maximum


def test_task_definition_wires_the_sidecar_and_middleware() -> None:
    """The sidecar listens on the task's loopback, where vLLM's middleware posts; the DB is on the volume."""
    sidecar, vllm = containers()["sidecar"], containers()["vllm"]
    s_env, v_env = env_of(sidecar), env_of(vllm)
    assert s_env["SIDECAR_LISTEN"] == "127.0.0.1:9600"
    assert s_env["SIDECAR_DB"].startswith("/data/")
    assert "AWS_REGION" in s_env and "SIDECAR_PRODUCT_CODE" in s_env
    assert "AWS_ENDPOINT_URL_MARKETPLACE_METERING" not in s_env, "production talks to the real endpoint"
    assert not {k for k in s_env if k.startswith("AWS_") and ("KEY" in k or "TOKEN" in k)}, "use the task role"
    assert v_env["METERING_SIDECAR_URL"] == "http://127.0.0.1:9600"
    assert v_env["METERING_SPOOL_PATH"].startswith("/spool/")


def test_iam_policy_allows_only_batch_meter_usage() -> None:
    """The task role may call BatchMeterUsage and nothing else."""
    policy = load_json(IAM_POLICY)
    assert policy["Version"] == "2012-10-17"
    actions: list[str] = []
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        value = statement["Action"]
        actions += [value] if isinstance(value, str) else value
        assert "NotAction" not in statement
    assert actions == ["aws-marketplace:BatchMeterUsage"]


def test_lifecycle_deployment_files() -> None:
    """The lifecycle's policy adds ResolveCustomer and receive/delete on the one queue (never every
    queue); compose runs a sidecar consuming the queue the simulator publishes to."""
    policy = load_json(ROOT / "deploy" / "ecs" / "lifecycle-policy.json")
    grants = {a: s["Resource"] for s in policy["Statement"] for a in s["Action"]}
    assert set(grants) == {"aws-marketplace:ResolveCustomer", "sqs:ReceiveMessage", "sqs:DeleteMessage"}
    assert grants["sqs:ReceiveMessage"].startswith("arn:aws:sqs:") and "*" not in grants["sqs:ReceiveMessage"]
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    queue = services["lifecycle-sidecar"]["environment"]["SIDECAR_SUBSCRIPTION_QUEUE_URL"]
    assert queue in services["lifecycle-marketplace"]["command"]
    assert services["lifecycle-sidecar"]["environment"]["AWS_ENDPOINT_URL_SQS"] == \
        services["lifecycle-marketplace"]["environment"]["AWS_ENDPOINT_URL_SQS"]


def test_fleet_deployment_files() -> None:
    """Fleet mode: compose runs PostgreSQL and two members with their own files and ids; ECS runs at
    least two tasks with the database URL from Secrets Manager and a stop timeout covering the final
    ship and the lease hand-over; the image carries the fleet extra; the members' dimensions load."""
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    members = [services["member-a"], services["member-b"]]
    assert {s["environment"]["SIDECAR_MEMBER_ID"] for s in members} == {"member-a", "member-b"}
    for m in members:
        assert m["environment"]["SIDECAR_FLEET_URL"].startswith("postgresql://")
        assert m["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert m["environment"]["SIDECAR_TOKEN"]  # members listen off loopback
    assert members[0]["volumes"][0] != members[1]["volumes"][0]  # one file per member
    task = load_json(ROOT / "deploy" / "ecs" / "fleet-task-definition.json")
    sidecar = next(c for c in task["containerDefinitions"] if c["name"] == "sidecar")
    assert [s["name"] for s in sidecar["secrets"]] == ["SIDECAR_FLEET_URL"]
    assert "secretsmanager" in sidecar["secrets"][0]["valueFrom"]
    assert sidecar["stopTimeout"] >= SHUTDOWN_DEADLINE_S + 10
    service = load_json(ROOT / "deploy" / "ecs" / "fleet-service.json")
    assert service["desiredCount"] >= 2
    assert "[fleet]" in SIDECAR_DOCKERFILE.read_text(encoding="utf-8")
    from sidecar.config import load_settings, validate_for_fleet

    settings = load_settings({"SIDECAR_CONFIG": str(ROOT / "deploy" / "fleet" / "fleet.toml"),
                              "SIDECAR_FLEET_URL": "postgresql://x@y/z"})
    validate_for_fleet(settings)


def test_dockerfiles_follow_the_deployment_contract() -> None:
    """The sidecar image runs unprivileged with its health check; the vLLM image always loads the middleware."""
    sidecar = SIDECAR_DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\s*$", sidecar, re.M)
    assert re.search(r"^USER (?!root\b|0\b)\S+", sidecar, re.M)
    assert 'HEALTHCHECK' in sidecar and 'CMD ["sidecar", "check"]' in sidecar
    assert re.search(r"^STOPSIGNAL SIGTERM$", sidecar, re.M)
    assert re.search(r'^CMD \["sidecar", "serve"\]$', sidecar, re.M)
    assert "SIDECAR_DB=/data/sidecar.db" in sidecar and "SIDECAR_LISTEN=127.0.0.1:9600" in sidecar
    vllm = VLLM_DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM vllm/vllm-openai:", vllm, re.M)
    entrypoints = re.findall(r"^ENTRYPOINT \[(.*?)\]$", vllm, re.M | re.S)
    assert len(entrypoints) == 2  # the cpu and gpu targets
    for entrypoint in entrypoints:
        assert f'"--middleware", "{MIDDLEWARE}"' in entrypoint
        assert '"--enable-force-include-usage"' in entrypoint
        assert '"--enable-per-request-metrics"' in entrypoint  # without it gpu-hours is never measured
