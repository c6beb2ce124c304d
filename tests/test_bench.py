"""The benchmark scripts still run and print their figures (a short run, not a measurement)."""

from __future__ import annotations

import asyncio
import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import (
    batch_split,
    common,
    device_thread,
    gil_convoy,
    gpu_targets,
    model_vs_machine,
    overload,
    server_overhead,
)
from bench.common import http_load_spread
from models.quality.evaluate import read_rgb
from service.settings import Settings
from tests.live import live_server


def test_model_vs_machine_prints_a_row_per_backend_and_their_outputs_agree(
    weights_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table has the six columns, one row per backend it prepared (eager and
    channels_last at least), eager at 1.00x of itself, and every backend's output within
    1e-4 of eager's on the same input: a backend that computes something else fails."""
    model_vs_machine.main(["--rounds", "1"])
    out = capsys.readouterr().out
    assert "46.52 G multiply-adds" in out
    prepared = re.findall(r"^  (\w+): prepared in ", out, re.M)
    assert {"eager", "channels_last"} <= set(prepared), out
    errors = dict(re.findall(r"^  (\w+): max \|output - eager\| = (\S+)$", out, re.M))
    assert set(errors) == set(prepared), out
    assert float(errors["eager"]) == 0.0
    assert all(float(e) <= 1e-4 for e in errors.values()), errors

    table = out[out.index("candidate ") :].split("\n\n")[0].splitlines()
    assert table[0].split() == [
        "candidate",
        "min",
        "ms",
        "median",
        "ms",
        "GFLOP/s",
        "of",
        "limit",
        "vs",
        "eager",
    ]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert list(rows) == prepared, table  # no lever rows without --levers
    for name, cells in rows.items():
        assert len(cells) == 5, (name, cells)
        assert all(float(c) > 0 for c in cells[:4]), (name, cells)
        assert cells[4].endswith("x") and float(cells[4][:-1]) > 0, (name, cells)
    assert rows["eager"][4] == "1.00x"


def test_encode_prints_every_format_for_4k_and_1024(
    weights_dir: Path, datasets_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import encode

    encode.main(["--images", "0", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "3840x2160 RGB" in out and "1024x1024 RGB" in out, out
    for table in out.split("\n\n")[1:]:
        rows = [line for line in table.splitlines() if line[:4] in ("PNG ", "WebP", "JPEG")]
        sizes = {line[:32].strip(): float(line.split()[-1]) for line in rows}  # name: MB
        expected = {"PNG zlib, one stream", "PNG ISA-L, bands, 1 thread", "WebP q90", "JPEG q90"}
        assert expected <= set(sizes), table
        png = [mb for name, mb in sizes.items() if name.startswith("PNG")]
        assert len(png) >= 6 and max(png) < 1.1 * min(png), table  # one picture, one level
        assert sizes["WebP q90"] < min(png) and sizes["JPEG q90"] < min(png), table


def test_gpu_targets_quick_run_prints_every_target(
    weights_dir: Path, datasets_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m bench.gpu_targets --quick` on the CPU: every row of the issue's targets,
    each with a positive figure (a smoke run of the harness the GPU run uses)."""
    rows = gpu_targets.main(["--quick"])
    out = capsys.readouterr().out
    assert "not a measurement" in out
    whats = [r.what for r in rows]
    assert any("forward, eager" in w for w in whats)
    assert any("sizes never seen" in w for w in whats) and any("seen before" in w for w in whats)
    assert any("HTTP / in-process" in w for w in whats)
    assert any("JPEG x2 -> PNG, one at a time" in w for w in whats)
    assert any("forward, channels_last" in w for w in whats)
    assert len(rows) == 11 and all(r.figure > 0 for r in rows), rows
    assert all(r.line() in out for r in rows)


def test_gpu_targets_times_the_split_free_forward_beside_the_others(
    weights_dir: Path, datasets_dir: Path
) -> None:
    """`--forward-only --split-free`: the channels-last forward a second time without
    channel splits, after the rows it is compared with."""
    rows = gpu_targets.main(["--quick", "--forward-only", "--split-free"])
    names = [r.what.split("forward, ")[1].split(" (")[0] for r in rows]
    assert names == ["eager", "channels_last", "channels_last split-free"]
    assert all(r.figure > 0 for r in rows)


def test_gil_convoy_times_small_calls_beside_busy_threads() -> None:
    times = gil_convoy.time_calls(ops=5, busy=1, rounds=3)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert not any("python_work" in t.name for t in threading.enumerate())  # stopped


def test_the_device_thread_makes_as_many_torch_calls_for_eight_requests_as_for_two(
    weights_dir: Path, datasets_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each torch call of the device thread waits for the GIL when other threads run
    Python: a batch is quantised once per form and a one-crop request keeps its slice,
    so its calls do not grow with the requests in it (they grew by six a request)."""
    two = asyncio.run(device_thread.measure(2, [], 1, 0.5))
    eight = asyncio.run(device_thread.measure(8, [1], 2, 0.5))
    assert 0 < eight == two < 30
    out = capsys.readouterr().out
    assert "a batch of 8 one-crop requests" in out
    assert "1 busy Python threads" in out and "ms per batch" in out


def test_gpu_targets_takes_inductor_settings_by_name() -> None:
    assert gpu_targets.inductor_setting("freezing=true") == ("freezing", True)
    assert gpu_targets.inductor_setting("coordinate_descent_tuning=False")[1] is False
    assert gpu_targets.inductor_setting("max_autotune_conv_backends=ATEN,TRITON") == (
        "max_autotune_conv_backends",
        "ATEN,TRITON",
    )
    for bad in ("freezing", "no_such_setting=1"):
        with pytest.raises(SystemExit, match="inductor setting"):
            gpu_targets.inductor_setting(bad)


def test_gpu_targets_frames_only_measures_the_4k_target_alone(
    weights_dir: Path, datasets_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--frames-only`: the JPEG -> PNG rows alone (from a server of x2 only, which is all
    a compiled backend then compiles), nothing of the forward or Set14 parts."""
    rows = gpu_targets.main(["--quick", "--frames-only"])
    assert [r.unit for r in rows] == ["ms", "requests/s"], rows
    assert all("JPEG x2 -> PNG" in r.what and r.figure > 0 for r in rows)
    assert "forward, eager" not in capsys.readouterr().out


def test_server_overhead_measures_the_server_without_its_network(
    weights_dir: Path, datasets_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m bench.server_overhead`: a real server whose x3 network is nearest-
    neighbour upsampling answers every request at the x3 size; its CPU time per request
    is measured (the GIL sampling needs py-spy and ptrace: not asserted here)."""
    load, cpu, gil = server_overhead.measure(clients=2, rounds=1, gil=False)
    assert len(load.latencies) == 14 and load.images_per_second > 0
    assert all("inference" in t for t in load.server_timings)
    assert 0 < cpu < 10 and gil is None
    assert server_overhead.nearest(3)(torch.zeros(1, 3, 5, 7)).shape == (1, 3, 15, 21)


@pytest.mark.parametrize("processes", [2, 1])
def test_the_load_generator_spreads_clients_over_processes(
    weights_dir: Path, datasets_dir: Path, processes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients and requests split over processes that start together, none of them this
    one (the server under test runs here; `http_load` fails in this process): every
    request is answered once, each answer's latency and Server-Timing come back."""
    lr = read_rgb(datasets_dir / "Set5" / "LR_bicubic" / "x4" / "birdx4.bmp")[:24, :20]
    body = io.BytesIO()
    Image.fromarray(lr).save(body, format="PNG")
    settings = Settings(device="cpu", weights_dir=weights_dir, models=["x2"])

    def not_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("the load ran in the server's process")

    monkeypatch.setattr(common, "http_load", not_here)
    with live_server(settings) as srv:
        load = http_load_spread(
            srv.url,
            [body.getvalue()],
            scale=2,
            clients=3,
            total=7,
            processes=processes,
            separate=True,
        )
    assert len(load.latencies) == len(load.first_bytes) == len(load.server_timings) == 7
    assert all(0 < t <= load.seconds for t in load.latencies)
    assert all("inference" in t for t in load.server_timings)
    assert load.images_per_second == 7 / load.seconds


def test_batch_split_bench_serves_both_modes_side_by_side(weights_dir: Path) -> None:
    """`python -m bench.batch_split`'s measurement on small buckets: both modes serve
    every image each round, and the device never computes fewer crops than were asked
    (padding adds some, splitting none)."""
    settings = Settings(
        device="cpu",
        weights_dir=weights_dir,
        models=["x3"],
        shape_buckets="on",
        tile_max_pixels=32 * 32,
        tile_padding=8,
        max_batch_size=4,
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (12 + i, 14, 3), dtype=np.uint8) for i in range(3)]
    figures = asyncio.run(batch_split.measure(settings, images, 3, clients=3, rounds=2))
    assert figures.keys() == {"split", "padded"}
    for rates, crops in figures.values():
        assert len(rates) == 2 and all(r > 0 for r in rates)
        assert crops >= 1.0


def test_overload_bench_prints_every_level_and_the_small_request_beside_large_ones(
    weights_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A short run (one level, a few seconds of arrivals): the capacity, the level's line
    with its status shares, and the small request's p99 alone and beside large ones."""
    overload.main(["--seconds", "3", "--levels", "1", "--processes", "1", "--timeout", "30"])
    out = capsys.readouterr().out
    assert re.search(r"measured capacity: [\d.]+ requests/s", out), out
    assert re.search(r"1x +offered +[\d.]+/s +sent +\d+ +goodput .* 200: +[\d.]+%", out), out
    assert "goodput / goodput at 1x: 1x 1.00" in out
    assert re.search(r"small request p99: alone [\d.]+ s, beside large ones", out), out
