"""Benchmark 1: achieved GFLOP/s of the ×4 model on a 256×256 input against a plain 64→64
3×3 convolution on the same size (the practical limit of this device), in one run.

    python -m bench.model_vs_machine [--rounds 16] [--levers] [--profile] [--batches]

Multiply-adds come from `models.networks.profile.mult_adds`; GFLOP/s = 2·MACs / seconds. The limit
is the faster of the convolution in contiguous and in channels_last memory format.
The machine is shared, so each model call is bracketed by two timings of the limit and
the figure kept is the median over rounds of the ratio to their mean: contention that
lasts longer than a call cancels out. Every installed backend (models/runtime/backend.py) is
measured. `--levers` adds what we tried and did not keep (TorchScript freeze +
optimize_for_inference, torch.compile with freezing, one intra-op thread), with their
preparation time. `--profile` prints where OpenVINO's and ONNX Runtime's time goes by
layer type (their own per-layer counters): what holds the network below the limit.
`--batches` prints the per-image time of each backend at batch 1, 4 and 8.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.common import Timing, bracketed, interleaved, machine, synchronizer
from models.networks.checkpoints import load_official
from models.networks.imdn import IMDN
from models.networks.profile import mult_adds
from models.runtime.backend import (
    BACKENDS,
    Forward,
    installed,
    onnxruntime_session,
    openvino_compiled,
    prepare,
    split_free,
)
from service.shared import WEIGHTS

SIDE = 256
CONV_REPEATS = 8  # a reference sample lasts a good part of a model call: fairer minimums


def _levers(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {}
    started = time.perf_counter()
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(model).eval(), x)  # type: ignore[no-untyped-call]
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        frozen(x)
    print(f"  TorchScript freeze + optimize_for_inference: {time.perf_counter() - started:.1f}s")
    out["torchscript_frozen"] = lambda: frozen(x)

    import torch._inductor.config as inductor

    inductor.freezing = True
    compiled = torch.compile(copy.deepcopy(model).eval())
    started = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    print(f"  torch.compile (freezing, first shape): {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    with torch.inference_mode():
        compiled(x[..., :200, :176])
    print(f"  torch.compile, a second input shape: {time.perf_counter() - started:.1f}s")

    def run_compiled() -> object:
        with torch.inference_mode():
            return compiled(x)

    out["torch_compile"] = run_compiled
    threads = torch.get_num_threads()

    def one_thread() -> object:
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                return model(x)
        finally:
            torch.set_num_threads(threads)

    out["eager_1_thread"] = one_thread
    return out


CONVOLUTIONS = ("Convolution", "Conv", "FusedConv")  # OpenVINO's and ONNX Runtime's names


def _print_profile(runtime: str, ms: dict[str, float], macs: int) -> None:
    """A runtime's time per call by layer kind, and what the convolutions alone achieve."""
    total = sum(ms.values())
    conv = sum(v for kind, v in ms.items() if kind.split(" ")[0] in CONVOLUTIONS)
    print(f"\n{runtime} per-layer profile: {total:.1f} ms a call")
    for kind, v in sorted(ms.items(), key=lambda kv: -kv[1]):
        if v >= 0.005 * total:
            print(f"  {kind:44s} {v:7.1f} ms {v / total:6.1%}")
    print(
        f"  convolutions alone: {2 * macs / (conv / 1000) / 1e9:.1f} GFLOP/s; "
        f"the other layers (no multiply-adds) take {1 - conv / total:.1%} of the time"
    )


def _openvino_profile(model: IMDN, x: torch.Tensor, macs: int, runs: int = 5) -> None:
    """OpenVINO's per-layer times, summed by (layer type, kernel), mean of `runs` calls."""
    network = split_free(model)  # as the openvino backend runs it
    request = openvino_compiled(network, x, {"PERF_COUNT": True}).create_infer_request()
    inputs = {0: x.numpy()}
    for _ in range(2):
        request.infer(inputs)
    ms: dict[str, float] = {}
    for _ in range(runs):
        request.infer(inputs)
        for layer in request.profiling_info:
            key = f"{layer.node_type} ({layer.exec_type})"
            ms[key] = ms.get(key, 0.0) + layer.real_time.total_seconds() * 1000 / runs
    _print_profile("OpenVINO", ms, macs)


def _onnxruntime_profile(model: IMDN, x: torch.Tensor, macs: int, runs: int = 5) -> None:
    """ONNX Runtime's per-node kernel times, summed by operator, mean of the last `runs`
    of `runs` + 2 calls (the first ones pick kernels and allocate)."""
    with tempfile.TemporaryDirectory() as folder:
        session = onnxruntime_session(split_free(model), x[..., :32, :32], f"{folder}/ort")
        for _ in range(runs + 2):
            session.run(None, {"image": x.numpy()})
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    ms: dict[str, float] = {}
    for e in events:
        if (
            e.get("cat") == "Node"
            and e["name"].endswith("_kernel_time")
            and e["ts"] >= starts[-runs]
        ):
            op = e["args"]["op_name"]
            ms[op] = ms.get(op, 0.0) + e["dur"] / 1000 / runs
    _print_profile("ONNX Runtime", ms, macs)


def _batching(
    forwards: dict[str, Forward], x: torch.Tensor, rounds: int, sync: Callable[[], None]
) -> None:
    """Per-image time at batch 1, 4 and 8 of the same 256×256 input, per backend: whether
    batching crops across requests (the engine does, for same-shape crops) pays here."""
    sizes = (1, 4, 8)
    batches = {n: x.expand(n, -1, -1, -1).contiguous() for n in sizes}
    print(f"\nper-image seconds by batch size (median of {rounds} interleaved rounds)")
    print(f"{'backend':16s}" + "".join(f"{'batch ' + str(n):>10s}" for n in sizes))
    for name, forward in forwards.items():
        runs = {str(n): (lambda f=forward, b=batches[n]: f(b)) for n in sizes}
        timings = interleaved(runs, rounds=rounds, sync=sync)
        per_image = [timings[str(n)].median / n for n in sizes]
        print(f"{name:16s}" + "".join(f"{t:10.3f}" for t in per_image))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--levers", action="store_true", help="also the levers we rejected")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="OpenVINO's and ONNX Runtime's time by layer type (CPU)",
    )
    parser.add_argument(
        "--batches", action="store_true", help="per-image time at batch 1, 4, 8 per backend"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = synchronizer(device)
    print(machine(device))

    model = load_official("x4", WEIGHTS).eval()
    macs = mult_adds(model, SIDE, SIDE)
    x = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0)).to(device)

    candidates: dict[str, Callable[[], object]] = {}
    forwards: dict[str, Forward] = {}
    for backend in BACKENDS:
        if not installed(backend) or (
            backend in ("onnxruntime", "openvino") and device.type != "cpu"
        ):
            print(f"  {backend}: not installed here, skipped")
            continue
        started = time.perf_counter()
        forward = prepare(model, backend, device, torch.float32)
        forwards[backend] = forward
        print(f"  {backend}: prepared in {time.perf_counter() - started:.1f}s")
        candidates[backend] = lambda f=forward: f(x)  # type: ignore[misc]
    if args.levers:
        candidates.update(_levers(model.to(device), x))

    conv = nn.Conv2d(64, 64, 3, padding=1).to(device).eval()
    features = torch.rand(1, 64, SIDE, SIDE, device=device)
    conv_nhwc = copy.deepcopy(conv).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    features_nhwc = features.contiguous(memory_format=torch.channels_last)
    conv_macs = conv.in_channels * conv.out_channels * 9 * SIDE * SIDE

    def conv_run(c: nn.Module, f: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                for _ in range(CONV_REPEATS):
                    c(f)
            return None

        return run

    reference = forwards["eager"](x)
    for name, forward in forwards.items():
        err = (forward(x) - reference).abs().max().item()
        print(f"  {name}: max |output - eager| = {err:.1e}")

    # Which memory format is the limit: a short interleaved run of the two.
    formats = interleaved(
        {
            "contiguous": conv_run(conv, features),
            "channels_last": conv_run(conv_nhwc, features_nhwc),
        },
        rounds=6,
        sync=sync,
    )
    print(f"\nx4 model, 1x3x{SIDE}x{SIDE}: {macs / 1e9:.2f} G multiply-adds")
    for k, t in formats.items():
        per_conv = t.best / CONV_REPEATS
        print(
            f"conv 64->64 3x3 {k:14s} {per_conv * 1000:7.1f} ms (min)  "
            f"{2 * conv_macs / per_conv / 1e9:6.1f} GFLOP/s"
        )
    limit_format = min(formats, key=lambda k: formats[k].best)
    limit_run = (
        conv_run(conv_nhwc, features_nhwc)
        if limit_format == "channels_last"
        else conv_run(conv, features)
    )
    print(f"limit: the {limit_format} convolution\n")

    print(
        f"timing {len(candidates)} candidates x {args.rounds} rounds, each bracketed by the limit"
    )
    ratios, _ = bracketed(candidates, limit_run, rounds=args.rounds, sync=sync)
    print(
        f"{'candidate':22s} {'min ms':>8s} {'median ms':>9s} {'GFLOP/s':>8s} "
        f"{'of limit':>8s} {'vs eager':>8s}"
    )
    eager = statistics.median(ratios["eager"].ratios)
    for name, r in ratios.items():
        t = Timing(r.seconds)
        efficiency = statistics.median(r.ratios) * (macs / conv_macs) / CONV_REPEATS
        print(
            f"{name:22s} {t.best * 1000:8.1f} {t.median * 1000:9.1f} "
            f"{2 * macs / t.best / 1e9:8.1f} {efficiency:8.2f} "
            f"{statistics.median(r.ratios) / eager:7.2f}x"
        )
    print(
        "\nof limit: median over rounds of (model GFLOP/s) / (limit GFLOP/s), the limit timed "
        "just before and after each model call; vs eager: the same, relative to eager"
    )
    if args.profile and "openvino" in forwards:
        _openvino_profile(model, x, macs)
    if args.profile and "onnxruntime" in forwards:
        _onnxruntime_profile(model, x, macs)
    if args.batches:
        _batching(forwards, x, max(3, args.rounds // 4), sync)


if __name__ == "__main__":
    main()
