"""docker/docker-compose.yml, validated by the real docker-compose v2 binary (`config -q`, then the
resolved model as JSON) for each profile, and docker/prometheus.yml by promtool: the server is reachable as
`server:8000` in both profiles, GPUs are reserved in `gpu`, Grafana gets its provisioning."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.deploy.tools import REPO_ROOT, docker_compose, promtool

COMPOSE_FILE = REPO_ROOT / "docker" / "docker-compose.yml"
PROFILES = {"cpu": "server", "gpu": "server-gpu"}


def compose(*args: str, profile: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(docker_compose()), "-f", str(COMPOSE_FILE)]
    if profile:
        command += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "LLMSTACK_", "GRAFANA_"))}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env, check=False
    )


def resolved(profile: str | None) -> dict[str, Any]:
    result = compose("config", "--format", "json", profile=profile)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


# ids avoid the bare word "gpu": conftest skips tests whose keywords include it.
@pytest.mark.parametrize("profile", [*PROFILES, None], ids=lambda p: f"profile-{p or 'default'}")
def test_compose_config_is_valid(profile: str | None) -> None:
    result = compose("config", "-q", profile=profile)
    assert result.returncode == 0, result.stderr


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: the binary refuses an invalid compose file (its Python wrapper would not)."""
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  server:\n    image: x\n    ports: 8000\n    deploy: {resources: 3}\n")
    result = subprocess.run(
        [str(docker_compose()), "-f", str(bad), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0


@pytest.mark.parametrize(("profile", "service"), PROFILES.items(), ids=["profile-cpu", "profile-gpu"])
def test_each_profile_runs_one_server_with_prometheus_and_grafana(profile: str, service: str) -> None:
    services = resolved(profile)["services"]
    assert set(services) == {service, "prometheus", "grafana"}
    server = services[service]
    assert server["healthcheck"]["test"] == ["CMD", "python", "/usr/local/bin/llmstack-healthcheck"]
    assert {(v["source"], v["target"]) for v in server["volumes"] if v["type"] == "volume"} == {
        ("models", "/models")
    }
    assert [p["target"] for p in server["ports"]] == [8000]
    assert "environment" not in server  # settings come only from the optional docker/server.env
    dockerfile = Path(server["build"]["context"]) / server["build"]["dockerfile"]
    assert dockerfile.is_file(), dockerfile
    assert server["build"]["context"] == str(REPO_ROOT)
    # Prometheus scrapes `server:8000`: the service name (cpu) or a network alias (gpu).
    assert service == "server" or "server" in server["networks"]["default"]["aliases"]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: f"profile-{p}")
def test_every_service_is_restarted_after_a_failure(profile: str) -> None:
    """`serve` exits non-zero when its engine dies (tests/e2e/test_engine_death.py): compose restarts it."""
    for name, service in resolved(profile)["services"].items():
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name


def test_default_profile_is_cpu() -> None:
    """docker/.env selects the cpu profile, so a plain `docker compose up` runs on any machine."""
    assert set(resolved(None)["services"]) == {"server", "prometheus", "grafana"}


def test_gpu_profile_reserves_gpus() -> None:
    server = resolved("gpu")["services"]["server-gpu"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    assert "deploy" not in resolved("cpu")["services"]["server"]


def test_prometheus_scrapes_the_server() -> None:
    services = resolved("cpu")["services"]
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    config_path = Path(mounts["/etc/prometheus/prometheus.yml"])
    assert config_path == REPO_ROOT / "docker" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "server:8000" in targets


def test_grafana_mounts_its_provisioning_and_dashboards() -> None:
    grafana = resolved("cpu")["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == REPO_ROOT / "grafana" / "provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == REPO_ROOT / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO_ROOT / "grafana" / "dashboards" / Path(home).name).is_file()


def test_promtool_accepts_prometheus_config() -> None:
    result = subprocess.run(
        [str(promtool()), "check", "config", "--syntax-only", str(REPO_ROOT / "docker" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_server_env_file_reaches_the_server(tmp_path: Path) -> None:
    """Settings written in docker/server.env (optional) become the server's environment, in both profiles."""
    root = tmp_path / "repo"
    (root / "docker").mkdir(parents=True)
    for name in ("docker-compose.yml", ".env", "prometheus.yml"):
        (root / "docker" / name).write_bytes((REPO_ROOT / "docker" / name).read_bytes())
    (root / "docker" / "server.env").write_text('LLMSTACK_SERVED_MODEL_NAME=smol\nLLMSTACK_API_KEY=["k-1"]\n')
    compose_file = str(root / "docker" / "docker-compose.yml")
    for profile, service in PROFILES.items():
        result = subprocess.run(
            [str(docker_compose()), "-f", compose_file, "--profile", profile, "config", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        environment = json.loads(result.stdout)["services"][service]["environment"]
        assert environment == {"LLMSTACK_SERVED_MODEL_NAME": "smol", "LLMSTACK_API_KEY": '["k-1"]'}
