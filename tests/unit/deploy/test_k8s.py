"""docker/k8s/*.yaml, validated offline against Kubernetes' own OpenAPI schemas (PyPI kubernetes-validate,
pinned; its schemas ship inside the package, strict mode: unknown fields are errors), then checked for what
the server needs: probes on the right endpoints, a drain that fits the grace period, resource requests,
Services that select the pods they front, and a multi-node layout whose ranks add up."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serve.settings import ServeSettings, build_parser, parse_settings
from tests.unit.deploy.tools import REPO_ROOT

K8S_DIR = REPO_ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest release still maintained upstream when this was written
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def by_kind(path: Path) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in documents(path):
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def env_of(container: dict[str, Any], config_maps: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """The container's literal environment: its ConfigMaps (`envFrom`), then its own `value`s."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update((config_maps or {})[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def test_manifests_exist() -> None:
    assert [p.name for p in MANIFESTS] == ["multi-node.yaml", "single-node.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_document_matches_the_kubernetes_schema(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    deployment = copy.deepcopy(by_kind(K8S_DIR / "single-node.yaml")["Deployment"][0])
    container = pod_spec(deployment)["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def check_server_container(
    workload: dict[str, Any], container: dict[str, Any], env: dict[str, str] | None = None
) -> None:
    """Probes, drain and resources of a container that runs `serve` (`env`: its environment)."""
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names.get("http") == parse_settings([]).port
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model load on a slow node
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(
        (env if env is not None else env_of(container)).get(
            "LLMSTACK_DRAIN_TIMEOUT_SECONDS", ServeSettings.model_fields["drain_timeout_seconds"].default
        )
    )
    assert pod_spec(workload)["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def check_service_fronts(service: dict[str, Any], workload: dict[str, Any]) -> None:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    selector = service["spec"]["selector"]
    assert selector.items() <= labels.items(), (selector, labels)
    container_ports = {p["name"] for c in pod_spec(workload)["containers"] for p in c.get("ports", [])}
    assert all(p["targetPort"] in container_ports for p in service["spec"]["ports"])


def test_single_node_is_a_deployment_behind_a_service() -> None:
    kinds = by_kind(K8S_DIR / "single-node.yaml")
    assert sorted(kinds) == ["Deployment", "Service"]
    deployment, service = kinds["Deployment"][0], kinds["Service"][0]
    (container,) = pod_spec(deployment)["containers"]
    check_server_container(deployment, container)
    check_service_fronts(service, deployment)


def test_multi_node_is_a_leader_and_headless_workers_whose_ranks_add_up() -> None:
    kinds = by_kind(K8S_DIR / "multi-node.yaml")
    assert {kind: len(docs) for kind, docs in kinds.items()} == {
        "ConfigMap": 1,
        "Service": 2,
        "StatefulSet": 2,
    }
    config_maps = {c["metadata"]["name"]: c["data"] for c in kinds["ConfigMap"]}
    sets = {s["metadata"]["labels"]["app.kubernetes.io/component"]: s for s in kinds["StatefulSet"]}
    leader, worker = sets["leader"], sets["worker"]
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    ranks = [s for s in services.values() if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in ranks] == [leader["spec"]["serviceName"]]
    assert worker["spec"]["serviceName"] == leader["spec"]["serviceName"]
    (api,) = (s for s in services.values() if s["spec"].get("clusterIP") != "None")
    check_service_fronts(api, leader)
    check_service_fronts(ranks[0], leader)  # the handshake port is the leader's
    assert ranks[0]["spec"]["selector"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()

    (serve,) = pod_spec(leader)["containers"]
    serve_env = env_of(serve, config_maps)
    assert "command" not in serve  # the image's entrypoint: `serve`
    check_server_container(leader, serve, serve_env)
    (engine,) = pod_spec(worker)["containers"]
    worker_env = env_of(engine, config_maps)
    script = " ".join(engine["args"])
    assert engine["command"] == ["/bin/sh", "-c"] and "python -m serve.headless" in script

    # both sides read the same engine settings, and every setting is one of serve's
    assert serve.get("envFrom") == engine.get("envFrom")
    settings = {k for k in serve_env | worker_env if k.startswith("LLMSTACK_")}
    options = {a.dest for a in build_parser()._actions}  # vLLM's options and the stack's settings
    assert {k.removeprefix("LLMSTACK_").lower() for k in settings} <= options
    # rank layout: the leader runs its local ranks, each worker pod the same number after it
    size, local = (
        int(serve_env["LLMSTACK_DATA_PARALLEL_SIZE"]),
        int(serve_env["LLMSTACK_DATA_PARALLEL_SIZE_LOCAL"]),
    )
    assert leader["spec"]["replicas"] == 1
    assert local * (1 + worker["spec"]["replicas"]) == size
    assert '--data-parallel-start-rank "$((POD_INDEX + 1))"' in script and local == 1
    # workers reach the leader through its stable name on the ranks Service, at the handshake port
    leader_dns = f"{leader['metadata']['name']}-0.{leader['spec']['serviceName']}."
    assert leader_dns in script
    rpc_port = int(serve_env["LLMSTACK_DATA_PARALLEL_RPC_PORT"])
    assert {p["containerPort"] for p in serve["ports"] if p["name"] == "dp-rpc"} == {rpc_port}
    assert [p["port"] for p in ranks[0]["spec"]["ports"]] == [rpc_port]
    assert all(pod_spec(w)["terminationGracePeriodSeconds"] > 0 for w in (leader, worker))
    assert {"cpu", "memory"} <= set(engine["resources"]["requests"])
