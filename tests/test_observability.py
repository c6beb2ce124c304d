"""Observability, live: a real Prometheus scraping a real server, the Grafana dashboard's
every query evaluated on what it scraped, and `/v1/report`, `/metrics` and `imdn bench`
agreeing after a known sequence of requests.

(`promtool check config` of docker/prometheus/prometheus.yml and the PromQL syntax of
the dashboard are checked statically in test_deploy_static.py.)
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models.quality.evaluate import read_rgb
from models.runtime.backend import MIXED, native_bf16
from service.cli import main
from service.report import REPORT_HEADER
from service.settings import Settings
from service.table6 import lr_from_hr
from tests.live import live_server
from tests.prometheus import has_finite_value, running_prometheus, series_value

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "imdn.json"

# Grafana's interval variables. With a 1 s scrape, a 30 s window spans this test's whole
# traffic (a few rounds over ~10-20 s) and always holds the two samples rate() needs.
GRAFANA_WINDOWS = {"$__rate_interval": "30s", "$__interval": "1s", "$__range": "1m"}


def png_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def sample_sum(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for lab, v in samples(text, name) if labels.items() <= lab.items())


# ------------------------------------------------------------------ the dashboard


@dataclass(frozen=True)
class DashboardQuery:
    row: str
    panel: str
    description: str
    expr: str

    def promql(self, instance: str, models: list[str]) -> str:
        """The query as Grafana sends it with these instances and models chosen (a
        multi-value variable becomes a regex alternation)."""
        expr = self.expr
        for variable, value in GRAFANA_WINDOWS.items():
            expr = expr.replace(variable, value)
        # a regex in a PromQL string: its backslashes escaped again, as Grafana does
        pattern = re.escape(instance).replace("\\", "\\\\")
        expr = expr.replace("$instance", pattern).replace("$model", "|".join(models))
        assert "$" not in expr, expr
        return expr

    @property
    def in_gpu_row(self) -> bool:
        """GPU rows: the service's CUDA figures and DCGM's, no data on a CPU."""
        return self.row.startswith("GPU")


def dashboard_queries() -> list[DashboardQuery]:
    """Every target of every panel, with the row it sits under (collapsed rows too)."""
    out: list[DashboardQuery] = []
    row = ""

    def add(panel: dict[str, Any]) -> None:
        for target in panel.get("targets", []):
            out.append(
                DashboardQuery(row, panel["title"], panel.get("description", ""), target["expr"])
            )

    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            for nested in panel.get("panels", []):
                add(nested)
        else:
            add(panel)
    return out


@dataclass
class Sent:
    scale: float
    body: bytes
    status: int = 0
    reason: str | None = None


def crop_requests(lr: np.ndarray) -> list[Sent]:
    """One round: four same-shape ×2 crops (to share a batch), two ×4, one IMDN_AS at
    ×2.5 (100×100 out: not a multiple of 4, so the four-crop ACS), two bad requests
    (undecodable bytes for ×2, an out-of-range scale) so the 4xx panels have data, and a
    36×36 ×4 image whose forward fails (FAILING_SIDE) so the 5xx panels have data."""
    x2 = [lr[y : y + 40, x : x + 40] for y in (0, 32) for x in (0, 32)]
    return [
        *(Sent(2, png_of(c)) for c in x2),
        Sent(4, png_of(lr[:32, :32])),
        Sent(4, png_of(lr[40:72, 40:72])),
        Sent(2.5, png_of(lr[16:56, 16:56])),
        Sent(2, b"not an image at all"),
        Sent(9, png_of(lr[:16, :16])),
        Sent(4, png_of(lr[:FAILING_SIDE, :FAILING_SIDE])),
    ]


FAILING_SIDE = 36


def send(client: httpx.Client, request: Sent) -> Sent:
    # a connection each: uvicorn closes the one whose request raised (the 500)
    r = client.post(
        "/v1/superres",
        params={"scale": request.scale},
        content=request.body,
        headers={"Connection": "close"},
    )
    request.status = r.status_code
    if r.status_code != 200:
        request.reason = r.json()["reason"]
    return request


def test_every_dashboard_query_has_data_from_a_real_prometheus(
    weights_dir: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    queries = dashboard_queries()
    gpu = {q.expr for q in queries if q.in_gpu_row}
    # the GPU panels, found by their row, are the ones whose description says so
    assert gpu and gpu == {
        q.expr for q in queries if "DCGM" in q.description or "CUDA only" in q.description
    }

    lr = read_rgb(datasets_dir / "Set5" / "LR_bicubic" / "x4" / "birdx4.bmp")  # 72×72
    models = ["x2", "x4", "AS"]
    settings = Settings(
        weights_dir=weights_dir,
        models=models,
        warmup=False,  # so every batch in the metrics is a request's
        max_batch_wait_ms=250,  # room for the concurrent ×2 crops to meet in one batch
        max_batch_seconds=3600,  # and a batch holds them whatever this CPU's speed
        request_timeout_s=120,
    )
    rounds = 3  # a series born in round 1 has a rate from rounds 2 and 3
    sent: list[Sent] = []
    with (
        live_server(settings) as server,
        running_prometheus([server.url.removeprefix("http://")], tmp_path) as prom,
        httpx.Client(base_url=server.url, timeout=120) as client,
        ThreadPoolExecutor(max_workers=10) as pool,
    ):
        x4 = server.app.state.engine.models["x4"]
        real = x4.forward

        def failing(x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] == FAILING_SIDE:
                raise RuntimeError("injected device fault")
            return real(x)

        x4.forward = failing
        prom.targets_up()
        from tests.video_clips import make_clip  # PyAV: the `video` extra

        clip, _ = make_clip(width=16, height=16, frames=4, audio=None, vfr=False)
        for _ in range(rounds):
            sent += pool.map(lambda r: send(client, r), crop_requests(lr))
            # a tiny video too, so that the video row has data (not in imdn_requests_total)
            video = client.post(
                "/v1/superres/video",
                params={"scale": 2},
                content=clip,
                headers={"Content-Type": "video/mp4"},
            )
            assert video.status_code == 200, video.text
            # every request of the round counted in a scrape before the next round
            prom.wait_for_value("sum(imdn_requests_total)", len(sent), timeout=20)
        at = time.time()
        instance = server.url.removeprefix("http://")
        results = {q.expr: prom.query(q.promql(instance, models), at=at) for q in queries}
        mean_batch = prom.query(
            'imdn_batch_size_sum{model="x2"} / imdn_batch_size_count{model="x2"}', at=at
        )
        # the model variable's options: label_values(imdn_model_parameters, model)
        model_options = prom.query("group by (model) (imdn_model_parameters)", at=at)
        everything = prom.query('{__name__=~"imdn_.+"}', at=at)
        live_metrics = client.get("/metrics").text

    statuses = [r.status for r in sent]  # in the order of crop_requests, round by round
    assert statuses == ([200] * 7 + [400, 422, 500]) * rounds, [(r.scale, r.status) for r in sent]
    without_data = {expr for expr, result in results.items() if not has_finite_value(result)}
    assert without_data == gpu, "\n".join(sorted(without_data ^ gpu))

    # every metric a service panel names is in the live exposition (the GPU figures are
    # checked against their collector in test_deploy_static.py)
    live_names = {s.name for f in text_string_to_metric_families(live_metrics) for s in f.samples}
    named = {n for q in queries if not q.in_gpu_row for n in re.findall(r"\bimdn_\w+", q.expr)}
    assert named and named <= live_names, sorted(named - live_names)

    # no series under a model that is not loaded; refused requests are "unrouted"
    assert {s["metric"]["model"] for s in model_options} == set(models)
    labelled = {s["metric"].get("model") for s in everything} - {None}
    assert labelled == {*models, "unrouted"}

    # Some values the panels show, against what the client saw.
    by_expr = {q.panel + "|" + q.expr: results[q.expr] for q in queries}

    def panel(title: str, contains: str = "") -> list[dict[str, Any]]:
        found = [v for k, v in by_expr.items() if k.startswith(title + "|") and contains in k]
        assert len(found) == 1, f"{title!r} {contains!r}: {len(found)} queries"
        return found[0]

    client_reasons = {r.reason for r in sent if r.reason}
    assert "internal_error" in client_reasons
    shown_reasons = {
        s["metric"]["reason"]
        for s in panel("Errors by reason", "imdn_errors_total")
        if series_value(s) > 0
    }
    assert shown_reasons == client_reasons
    server_errors = {
        s["metric"]["model"]: series_value(s) for s in panel("Server error ratio (5xx) by model")
    }
    # one ×4 request in three failed; the ×2 400s and the 422 are not server errors
    assert set(server_errors) == set(models)
    assert 0 < server_errors["x4"] < 1 and server_errors["x2"] == 0 and server_errors["AS"] == 0
    client_errors = {
        s["metric"]["model"]: series_value(s) for s in panel("Client error ratio (4xx) by model")
    }
    assert client_errors["unrouted"] == 1.0  # the out-of-range scale never reached a model
    assert 0 < client_errors["x2"] < 1 and client_errors["x4"] == 0 and client_errors["AS"] == 0
    outcomes = {s["metric"]["outcome"] for s in panel("Requests by outcome") if series_value(s)}
    assert outcomes == {"ok", "client_error", "error"}
    assert sum(series_value(s) for s in panel("Ready replicas", "sum")) == 1
    assert mean_batch and series_value(mean_batch[0]) > 1, "no ×2 batch held two requests"

    # Table 6: one row per model and scale, the paper's parameters, p50 <= p95, a peak
    table = "Table 6: parameters, time per image, peak memory"
    params = {
        (s["metric"]["model"], s["metric"]["scale"]): series_value(s)
        for s in panel(table, "imdn_model_parameters")
    }
    assert params == {("x2", "2"): 694_404, ("x4", "4"): 715_176, ("AS", "any"): 752_104}
    p50, p95 = (
        {(s["metric"]["model"], s["metric"]["scale"]): series_value(s) for s in panel(table, q)}
        for q in ("histogram_quantile(0.5,", "histogram_quantile(0.95,")
    )
    assert set(p50) == set(p95) == set(params)
    assert all(0 < p50[k] <= p95[k] for k in params)
    peaks = panel(table, "imdn_peak_memory_bytes")
    assert {(s["metric"]["model"], s["metric"]["scale"]) for s in peaks} == set(params)
    assert all(series_value(s) > 0 for s in peaks)


# ------------------------------------------------------------------ report, metrics, bench

X2_IMAGES = ("bird.bmp", "butterfly.bmp", "head.bmp")  # 3 requests at ×2
X4_IMAGES = ("bird.bmp", "butterfly.bmp")  # 2 requests at ×4
PARAMETERS = {"x2": 694_404, "x4": 715_176}  # the paper's 694K and 715K
DEPTH = 34


@dataclass
class KnownSequence:
    """What a fresh server answered after exactly X2_IMAGES at ×2 and X4_IMAGES at ×4."""

    input_pixels: dict[str, int]
    output_pixels: dict[str, int]
    latencies: dict[str, list[float]]  # client wall time per request
    inference: dict[str, list[float]]  # Server-Timing `inference`: device compute only
    transfers: dict[str, list[float]]  # Server-Timing `prepare` and `readback`, in seconds
    report: dict[str, Any]
    report_markdown: str
    markdown_type: str
    metrics: str


@pytest.fixture(scope="module")
def known_sequence(weights_dir: Path, datasets_dir: Path) -> KnownSequence:
    hr = datasets_dir / "Set5" / "HR"
    plan = [(2, name) for name in X2_IMAGES] + [(4, name) for name in X4_IMAGES]
    settings = Settings(weights_dir=weights_dir, models=["x2", "x4"], warmup=False)
    seq = KnownSequence({}, {}, {}, {}, {"prepare": [], "readback": []}, {}, "", "", "")
    with live_server(settings) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        for scale, name in plan:  # one at a time: each request is its own batch
            model = f"x{scale}"
            lr = lr_from_hr(read_rgb(hr / name), scale)
            started = time.perf_counter()
            r = c.post("/v1/superres", params={"scale": scale}, content=png_of(lr))
            seq.latencies.setdefault(model, []).append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
            assert r.headers["x-imdn-crops"] == "1"  # whole image, as the bench runs it
            timing = re.search(r"inference;dur=([\d.]+)", r.headers["server-timing"])
            assert timing
            seq.inference.setdefault(model, []).append(float(timing[1]) / 1000)
            for stage, times in seq.transfers.items():
                found = re.search(rf"{stage};dur=([\d.]+)", r.headers["server-timing"])
                assert found
                times.append(float(found[1]) / 1000)
            h, w = lr.shape[:2]
            seq.input_pixels[model] = seq.input_pixels.get(model, 0) + h * w
            seq.output_pixels[model] = seq.output_pixels.get(model, 0) + h * w * scale**2
        seq.report = c.get("/v1/report").json()
        md = c.get("/v1/report", headers={"Accept": "text/markdown"})
        seq.report_markdown, seq.markdown_type = md.text, md.headers["content-type"]
        seq.metrics = c.get("/metrics").text
    return seq


def markdown_rows(text: str) -> dict[str, list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert re.fullmatch(r"\|(---\|)+", lines[1])
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert all(len(r) == len(header) for r in rows)
    return {r[0]: r for r in rows} | {"header": header}


def test_report_counts_the_known_sequence_with_the_papers_model_facts(
    known_sequence: KnownSequence,
) -> None:
    seq = known_sequence
    assert (seq.report["device"], seq.report["device_name"]) == ("cpu", "cpu")
    # the default: OpenVINO mixed where this CPU has native bfloat16
    assert seq.report["precision"] == (MIXED if native_bf16() else "float32")
    measures = seq.report["measures"]
    assert {"forward_*_seconds", "request_*_seconds", "peak_memory_mib"} <= set(measures)
    assert "MiB" in measures["peak_memory_mib"] and "resident" in measures["peak_memory_mib"]
    rows = {(row["model"], row["scale"]): row for row in seq.report["models"]}
    assert set(rows) == {("x2", "2"), ("x4", "4")}
    for model, scale, count in (("x2", "2", len(X2_IMAGES)), ("x4", "4", len(X4_IMAGES))):
        row = rows[model, scale]
        assert row["requests"] == count
        assert row["parameters"] == PARAMETERS[model] and row["depth"] == DEPTH
        # the request time runs from arrival to encoded PNG: inside each client round trip
        assert 0 < row["request_p50_seconds"] <= row["request_p95_seconds"]
        assert row["request_p95_seconds"] <= max(seq.latencies[model])
        # the forward time is what Server-Timing's `inference` said (0.1 ms resolution)
        assert row["forward_mean_seconds"] == pytest.approx(
            float(np.mean(seq.inference[model])), abs=1e-4
        )
        # every image's forward is inside its request, so every quantile is too
        assert 0 < row["forward_p50_seconds"] <= row["request_p50_seconds"]
        assert row["forward_p95_seconds"] <= row["request_p95_seconds"]
        assert row["peak_memory_mib"] > 0

    assert seq.markdown_type.startswith("text/markdown")
    md = seq.report_markdown
    assert md.startswith(f"Device: cpu. Precision: {seq.report['precision']}.")
    assert "MB" not in md  # mebibytes, said so
    assert "- **forward**: per image: device compute" in md
    assert "- **peak MiB**: largest per-batch peak" in md
    table = markdown_rows(md)
    assert table["header"] == list(REPORT_HEADER)
    for model, scale in (("x2", "2"), ("x4", "4")):
        row = rows[model, scale]
        name, scale_cell, params, depth, requests, fwd50, fwd95, req50, req95, mib = table[model]
        assert (name, scale_cell, params, depth) == (model, scale, f"{PARAMETERS[model]:,}", "34")
        assert int(requests) == row["requests"]
        assert float(fwd50) == pytest.approx(row["forward_p50_seconds"], abs=1e-4)
        assert float(fwd95) == pytest.approx(row["forward_p95_seconds"], abs=1e-4)
        assert float(req50) == pytest.approx(row["request_p50_seconds"], abs=1e-4)
        assert float(req95) == pytest.approx(row["request_p95_seconds"], abs=1e-4)
        assert float(mib) == pytest.approx(row["peak_memory_mib"], rel=1e-3)


def test_metrics_agree_with_the_report_and_the_pixels_sent(known_sequence: KnownSequence) -> None:
    seq, text = known_sequence, known_sequence.metrics
    rows = {row["model"]: row for row in seq.report["models"]}
    for model in ("x2", "x4"):
        n = rows[model]["requests"]
        assert sample_sum(text, "imdn_requests_total", model=model, outcome="ok") == n
        assert sample_sum(text, "imdn_requests_total", model=model) == n  # nothing else
        assert sample_sum(text, "imdn_request_duration_seconds_count", model=model) == n
        assert sample_sum(text, "imdn_time_to_first_byte_seconds_count", model=model) == n
        # the histogram stops its clock after the report's (last byte vs encoded PNG)
        duration = sample_sum(text, "imdn_request_duration_seconds_sum", model=model)
        assert duration >= n * rows[model]["request_mean_seconds"]
        assert sample_sum(text, "imdn_input_pixels_total", model=model) == seq.input_pixels[model]
        assert sample_sum(text, "imdn_output_pixels_total", model=model) == seq.output_pixels[model]
        # one whole-image batch per request, and its compute is what Server-Timing said
        assert sample_sum(text, "imdn_batches_total", model=model) == n
        assert sample_sum(text, "imdn_compute_seconds_sum", model=model) == pytest.approx(
            sum(seq.inference[model]), abs=1e-3 * n
        )
        # one image per batch here: the per-image forward time is the batch's compute
        assert sample_sum(text, "imdn_image_forward_seconds_sum", model=model) == pytest.approx(
            sum(seq.inference[model]), abs=1e-3 * n
        )
        assert sample_sum(text, "imdn_model_parameters", model=model) == PARAMETERS[model]
    assert sample_sum(text, "imdn_decode_seconds_count") == sum(rows[m]["requests"] for m in rows)
    # the transfers are what Server-Timing's prepare and readback said, request by request
    for direction, stage in (("to_device", "prepare"), ("to_host", "readback")):
        times = seq.transfers[stage]
        assert sample_sum(text, "imdn_transfer_seconds_count", direction=direction) == len(times)
        assert sample_sum(text, "imdn_transfer_seconds_sum", direction=direction) == pytest.approx(
            sum(times), abs=1e-3 * len(times)
        )
    assert sample_sum(text, "imdn_errors_total") == 0


@pytest.fixture
def bench_folders(datasets_dir: Path, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """The known sequence's HR images, as two data set folders."""
    folders = {"x2": tmp_path / "three", "x4": tmp_path / "two"}
    for model, names in (("x2", X2_IMAGES), ("x4", X4_IMAGES)):
        folders[model].mkdir()
        for name in names:
            shutil.copy(datasets_dir / "Set5" / "HR" / name, folders[model] / name)
    yield folders


def test_bench_on_the_same_images_agrees_with_the_report(
    known_sequence: KnownSequence,
    bench_folders: dict[str, Path],
    weights_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`imdn bench` times `Engine.upscale` (LR array in, SR array out: planning, queue,
    device compute and stitching, no HTTP, no decode or encode); the service's
    Server-Timing `inference` is the device compute of the request's batch alone.
    The two must be close; the bench's model facts must be the report's."""
    rows = {row["model"]: row for row in known_sequence.report["models"]}
    table = tmp_path / "table6.md"
    for model, scale in (("x2", "2"), ("x4", "4")):
        args = ["bench", "--hr", str(bench_folders[model]), "--scale", scale]
        args += ["--weights-dir", str(weights_dir), "--device", "cpu", "--json"]
        assert main([*args, "--output", str(table)]) == 0
        figures = json.loads(capsys.readouterr().out)

        [facts] = figures["models"]
        assert (facts["model"], facts["parameters"], facts["depth"]) == (
            model,
            rows[model]["parameters"],
            rows[model]["depth"],
        )
        [cell] = figures["results"]
        assert cell["images"] == rows[model]["requests"]
        compute = float(np.mean(known_sequence.inference[model]))
        ratio = cell["seconds_per_image"] / compute
        assert 0.2 <= ratio <= 5, (
            f"{model}: bench {cell['seconds_per_image']:.3f}s vs {compute:.3f}s"
        )
        assert cell["peak_memory_mb"] > 0 and math.isfinite(cell["peak_memory_mb"])
        assert figures["machine"]["device"] == "cpu"

        written = markdown_rows(table.read_text())
        assert written["header"][4] == f"{bench_folders[model].name}: peak MB / s per image"
        mb, seconds = written[model][4].split(" / ")
        assert written[model][:4] == [model, f"×{scale}", f"{PARAMETERS[model]:,}", str(DEPTH)]
        assert float(seconds) == pytest.approx(cell["seconds_per_image"], abs=1e-3)
        assert float(mb) == pytest.approx(cell["peak_memory_mb"], abs=0.5)


def test_bench_refuses_a_missing_folder_and_a_scale_of_one(
    weights_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--weights-dir", str(weights_dir)]
    assert main(["bench", "--hr", str(tmp_path / "nowhere"), "--scale", "2", *common]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["bench", "--hr", str(tmp_path), "--scale", "1", *common]) == 2
    assert "scales must be above 1" in capsys.readouterr().err
