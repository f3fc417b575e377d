"""The Helm chart, offline: lint, render, validate every manifest against the Kubernetes schemas
and the RayService against KubeRay's CRD, and check the facts that matter."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "nnfabric"


def _crd() -> Path:
    """KubeRay's RayService CRD lives in the workplace's shared schemas (not copied into the
    project): $NNFABRIC_K8S_SCHEMAS, else a shared/k8s-schemas beside the checkout or above it."""
    import os

    candidates = [Path(os.environ["NNFABRIC_K8S_SCHEMAS"])] if os.environ.get("NNFABRIC_K8S_SCHEMAS") else []
    candidates += [parent / "shared" / "k8s-schemas" for parent in ROOT.parents]
    candidates.append(Path("/work/shared/k8s-schemas"))  # the workplace's shared folder
    for folder in candidates:
        if (folder / "ray.io_rayservices.yaml").is_file():
            return folder / "ray.io_rayservices.yaml"
    raise FileNotFoundError(f"ray.io_rayservices.yaml not found in {[str(c) for c in candidates]}")


CATALOG = [
    {"name": "big", "source": "org/big-model", "dtype": "bfloat16", "gpus": 4, "replicas": 2, "max_replicas": 5},
    {"name": "small", "source": "openai-community/gpt2", "gpus": 1, "replicas": 1},
    {"name": "also-small", "source": "/models/local-dir", "gpus": 1, "replicas": 3},
    {"name": "cpu-only", "source": "/models/m.gguf", "gpus": 0, "replicas": 1},
]


@functools.cache
def rayservice_validator() -> Any:
    crd = yaml.load(_crd().read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)  # once: checking it takes seconds
    return validator(schema)


def render(values: dict[str, Any] | None = None, files: list[str] = ()) -> list[dict[str, Any]]:
    merged: dict[str, Any] = {}
    for name in files:
        merged = _merge(merged, yaml.safe_load((CHART / name).read_text()))
    merged = _merge(merged, values or {})
    chart = helm.Chart.load(str(CHART))
    out = chart.render(merged, name="fab", namespace="research")
    docs = []
    for path, text in out.items():
        if path.endswith(".txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def find(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


VARIANTS = {
    "defaults": ({"secrets": {"password": "pw"}}, []),
    "dev": ({}, ["values-dev.yaml"]),
    "gpu-bf16-2gpus": ({"secrets": {"password": "pw"}}, ["values-gpu.yaml"]),
    "gpu-catalog+ingress+external-redis": (
        {
            "models": CATALOG,
            "api": {"ingress": {"enabled": True, "tlsSecret": "tls"}},
            "redis": {"enabled": False, "externalUrl": "redis://managed:6379/0"},
        },
        [],
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chart_lints_and_every_manifest_is_valid(variant):
    values, files = VARIANTS[variant]
    report = helm.lint(str(CHART), strict=True)
    assert not report["errors"] and all(m["severity"] < 2 for m in report["messages"]), report
    docs = render(values, files)
    for doc in docs:
        if doc["kind"] == "RayService":
            rayservice_validator().validate(doc)
        else:
            for version in ("1.28.0", "1.37.0"):
                kubernetes_validate.validate(doc, version, strict=True)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "RayService", "NetworkPolicy"} <= kinds


def test_the_gpu_example_shards_a_bfloat16_model_over_two_gpus():
    docs = render({"secrets": {"password": "pw"}}, ["values-gpu.yaml"])
    ray = find(docs, "RayService")[0]
    groups = {g["groupName"]: g for g in ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu2", "gpu1"}
    pod = groups["gpu2"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    from services.common.catalog import Catalog

    catalog = Catalog.model_validate(yaml.safe_load(find(docs, "ConfigMap", "-catalog")[0]["data"]["catalog.yaml"]))
    big = catalog.get("llama-8b")
    assert big is not None and (big.dtype, big.gpus, big.gpu_memory_fraction) == ("bfloat16", 2, 0.85)
    serve = yaml.safe_load(ray["spec"]["serveConfigV2"])
    (app,) = [a for a in serve["applications"] if a["name"] == "model-llama-8b"]
    assert app["args"] == {"model": "llama-8b"}  # built from the catalog: each replica asks Ray for 2 GPUs
    from services.worker.deployment import replica_placement

    assert replica_placement(big)["ray_actor_options"] == {"num_gpus": 2, "num_cpus": 0}


def test_gpu_requests_follow_the_catalog():
    docs = render({"models": CATALOG, "secrets": {"password": "pw"}})
    ray = find(docs, "RayService")[0]
    groups = {g["groupName"]: g for g in ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu4", "gpu1", "cpu"}
    for name, gpus, replicas in (("gpu4", 4, 2), ("gpu1", 1, 4), ("cpu", 0, 1)):
        container = groups[name]["template"]["spec"]["containers"][0]
        assert groups[name]["replicas"] == replicas
        assert groups[name]["maxReplicas"] >= (5 if name == "gpu4" else replicas)
        assert container["resources"]["limits"].get("nvidia.com/gpu", "0") == str(gpus)
    # "big" follows its queue up to 5 replicas: Ray's autoscaler may add worker pods for it.
    assert ray["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert "enableInTreeAutoscaling" not in find(render({"secrets": {"password": "pw"}}), "RayService")[0]["spec"][
        "rayClusterConfig"
    ]
    # The head schedules nothing and requests no GPU.
    head = ray["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    # One Serve application per model, named as the scheduler addresses it, built from the catalog.
    serve = yaml.safe_load(ray["spec"]["serveConfigV2"])
    from services.common.catalog import Catalog

    catalog = Catalog.model_validate(yaml.safe_load(find(docs, "ConfigMap", "-catalog")[0]["data"]["catalog.yaml"]))
    assert [a["name"] for a in serve["applications"]] == [m.deployment for m in catalog.models]
    assert {a["import_path"] for a in serve["applications"]} == {"services.worker.deployment:build_app"}
    from services.worker import deployment

    assert callable(deployment.build_app)


def test_probes_point_at_real_routes_and_env_matches_settings(tmp_path):
    from services.api.app import create_app
    from services.common.settings import Settings

    docs = render({"secrets": {"password": "pw"}})
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(find(docs, "ConfigMap", "-catalog")[0]["data"]["catalog.yaml"])
    routes = set(create_app(Settings(catalog=str(catalog))).openapi()["paths"])
    api = find(docs, "Deployment", "-api")[0]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz" and "/readyz" in routes
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz" and "/healthz" in routes

    fields = {f"NNFABRIC_{name.upper()}" for name in Settings.model_fields}
    containers = [c for d in find(docs, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]]
    ray = find(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    containers += ray["headGroupSpec"]["template"]["spec"]["containers"]
    containers += [c for g in ray["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    used = {e["name"] for c in containers for e in c["env"] if e["name"].startswith("NNFABRIC_")}
    assert used and used <= fields, used - fields
    assert {"NNFABRIC_REDIS_URL", "NNFABRIC_CATALOG"} <= used


def test_network_policies_and_pod_security():
    docs = render({"secrets": {"password": "pw"}})
    policies = {d["metadata"]["name"]: d["spec"] for d in find(docs, "NetworkPolicy")}
    deny = policies["fab-nnfabric-default-deny"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny  # everything denied by default
    api = policies["fab-nnfabric-api"]
    assert api["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
    redis_from = policies["fab-nnfabric-redis"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"]
    assert {"key": "app.kubernetes.io/instance", "operator": "In", "values": ["fab"]} in redis_from
    # No other policy opens a port to everyone.
    for name, spec in policies.items():
        if name != "fab-nnfabric-api":
            assert all(rule.get("from") for rule in spec.get("ingress", []))
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    ray = find(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    pods += [ray["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in ray["workerGroupSpecs"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["resources"]["requests"] and container["resources"]["limits"]
    secret = find(docs, "Secret")[0]
    assert secret["stringData"]["redis-url"] == "redis://:pw@fab-nnfabric-redis:6379/0"


def _env_names(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_the_chart_and_compose_describe_one_topology_with_ray_token_auth():
    """Chart and docker-compose agree: a head with no CPUs, the scheduler a Ray Client of the
    head on 10001, Ray's token authentication on for every Ray node and the scheduler (one
    token, from the Secret), and the api never holds it."""
    docs = render({"secrets": {"password": "pw"}})
    (service,) = find(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    ray_containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        group["template"]["spec"]["containers"][0] for group in cluster["workerGroupSpecs"]
    ]
    scheduler = find(docs, "Deployment", "-scheduler")[0]["spec"]["template"]["spec"]["containers"][0]
    api = find(docs, "Deployment", "-api")[0]["spec"]["template"]["spec"]["containers"][0]
    (secret,) = [d for d in find(docs, "Secret") if "ray-token" in d.get("stringData", {})]
    assert len(secret["stringData"]["ray-token"]) >= 32
    for container in [*ray_containers, scheduler]:
        env = _env_names(container)
        assert env["RAY_AUTH_MODE"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "ray-token"}}
    assert "RAY_AUTH_TOKEN" not in _env_names(api)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    chart_address = _env_names(scheduler)["NNFABRIC_RAY_ADDRESS"]

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("ray-head", "worker", "scheduler"):
        env = compose[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "NNFABRIC_RAY_TOKEN" in env["RAY_AUTH_TOKEN"], name
    assert "RAY_AUTH_TOKEN" not in compose["api"]["environment"]
    assert "--num-cpus=0" in compose["ray-head"]["command"]
    compose_address = compose["scheduler"]["environment"]["NNFABRIC_RAY_ADDRESS"]
    assert chart_address.startswith("ray://") and compose_address.startswith("ray://")
    assert chart_address.rsplit(":", 1)[1] == compose_address.rsplit(":", 1)[1] == "10001"
    assert "--ray-client-server-port=10001" in compose["ray-head"]["command"]


def test_a_staged_model_gets_pods_of_its_stage_shape_and_a_placement_group_per_replica():
    from ray.serve.schema import ServeDeploySchema

    from services.common.catalog import Catalog, ModelSpec
    from services.worker.deployment import replica_placement

    models = [
        {"name": "huge", "source": "/models/huge", "dtype": "bfloat16", "gpus": 1, "stages": 3, "replicas": 2,
         "placement_strategy": "STRICT_SPREAD"},
        {"name": "cpu-staged", "source": "/models/small", "stages": 2, "cpus": 2, "replicas": 1},
        {"name": "small", "source": "/models/small", "gpus": 1, "replicas": 1},
    ]
    docs = render({"models": models, "secrets": {"password": "pw"}})
    ray = find(docs, "RayService")[0]
    groups = {g["groupName"]: g for g in ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    # 3 stages x 2 replicas of 1-GPU pods, plus the one-stage model's pod; 2 CPU pods for 2 stages.
    assert groups["gpu1"]["replicas"] == 3 * 2 + 1 and groups["cpu"]["replicas"] == 2
    serve = yaml.safe_load(ray["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)  # Ray Serve's own schema for the config KubeRay applies
    apps = {a["name"]: a for a in serve["applications"]}
    assert "deployments" not in apps["model-small"]
    # The chart renders exactly what the code asks Serve for.
    catalog = Catalog.model_validate({"models": models})
    for name in ("huge", "cpu-staged"):
        spec = catalog.get(name)
        assert isinstance(spec, ModelSpec)
        (deployment,) = apps[f"model-{name}"]["deployments"]
        wanted = replica_placement(spec)
        assert deployment["name"] == spec.deployment
        assert deployment["placement_group_strategy"] == wanted["placement_group_strategy"]
        assert [{k: float(v) for k, v in b.items()} for b in deployment["placement_group_bundles"]] == wanted[
            "placement_group_bundles"
        ]


# The parts of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1) the chart
# writes, as its API reference describes them: kubernetes-validate has no schema for the CRD.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object",
                                                            "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchNames": {"type": "array", "items": {"type": "string"}},
                                                     "any": {"type": "boolean"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                   "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                                   "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}}}},
            },
        },
    },
}  # fmt: skip


def test_the_dashboard_ships_for_grafanas_sidecar_and_the_service_monitor_is_off_by_default():
    docs = render({"secrets": {"password": "pw"}})
    assert not find(docs, "ServiceMonitor")
    (dashboard,) = find(docs, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "research"
    (text,) = dashboard["data"].values()
    assert json.loads(text) == json.loads((CHART / "dashboards" / "nnfabric.json").read_text())
    # Configurable for other sidecar setups, and can be left out.
    custom = {"labels": {"dashboards": "nnfabric"}, "annotations": {"grafana_folder": "ml"}, "namespace": "grafana"}
    (moved,) = find(render({"secrets": {"password": "pw"}, "monitoring": {"grafanaDashboard": custom}}),
                    "ConfigMap", "-dashboard")  # fmt: skip
    assert moved["metadata"]["labels"]["dashboards"] == "nnfabric"
    assert moved["metadata"]["annotations"] == {"grafana_folder": "ml"} and moved["metadata"]["namespace"] == "grafana"
    off = render({"secrets": {"password": "pw"}, "monitoring": {"grafanaDashboard": {"enabled": False}}})
    assert not find(off, "ConfigMap", "-dashboard")


def test_the_service_monitor_scrapes_the_api_services_metrics(tmp_path):
    from services.api.app import create_app
    from services.common.settings import Settings

    values = {"secrets": {"password": "pw"},
              "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}}  # fmt: skip
    docs = render(values)
    (monitor,) = find(docs, "ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR)
    # Its metadata is ordinary ObjectMeta: validated as such.
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": monitor["metadata"]}, "1.37.0",
                                 strict=True)  # fmt: skip
    for doc in docs:
        if doc["kind"] == "RayService":
            rayservice_validator().validate(doc)
        elif doc["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(doc, "1.37.0", strict=True)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # It selects exactly the api's Service, in the release's namespace, on a port that Service has.
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in find(docs, "Service") if selector.items() <= d["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in services] == ["fab-nnfabric-api"]
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["research"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
    # ... whose path is the api's real metrics route.
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(find(docs, "ConfigMap", "-catalog")[0]["data"]["catalog.yaml"])
    routes = set(create_app(Settings(catalog=str(catalog))).openapi()["paths"])
    assert endpoint["path"] == "/metrics" and endpoint["path"] in routes
    # The Service's port reaches the api container's port named in the Deployment.
    api = find(docs, "Deployment", "-api")[0]["spec"]["template"]["spec"]["containers"][0]
    assert services[0]["spec"]["ports"][0]["targetPort"] in {p["name"] for p in api["ports"]}
