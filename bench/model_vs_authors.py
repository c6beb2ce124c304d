"""Benchmark 2: time per image of our model path against the authors' plain eager forward of
the same weights, on Set5 and Set14 at ×2, ×3 and ×4 and IMDN_AS, with equal outputs.

    python -m bench.model_vs_authors [--rounds 2] [--backends auto channels_last]
                                     [--sets Set5 Set14] [--scales 2 3 4] [--as-scales 3]

`auto` is the service's default (`make serve`): openvino on the CPU where installed, mixed
(bfloat16 trunk) where the CPU has native bfloat16 (`IMDN_PRECISION=auto`); `openvino`
alone is its float32.
IMDN_AS rows (`--as-scales`): the LR bicubic-resized to the HR size, then the authors'
recipe (`acs.authors_forward`: the whole image when both sides are multiples of 4, else
their four ACS crops as one batch) against ours on the same crops one at a time, as the
service runs them on the CPU where warm-up measured batches slower per crop.

LR images are made from the HR ones by MATLAB-style bicubic (`models.quality.matlab.imresize`,
HR cropped to a multiple of the scale), the paper's protocol. The authors' path is their
test script's: `torch.no_grad()`, contiguous NCHW float32, `model(x)`. Ours is
`models.runtime.backend.prepare(model, backend, ...)`, the function the service's engine calls.
Each of our calls is timed between two calls of the authors' path on the same image
(bench.common.bracketed); the speed-up of a set is the geometric mean over its images of
the median ratio. Float32 outputs must agree within 1e-4 (max |difference|), mixed ones
hold the set's PSNR (Y, border = scale) within 0.01 dB; the PSNR is printed for both.

On a CUDA device (`--device cuda`, or found), the second half runs: the authors' float32
eager forward against ours in float16 (eager and channels_last), PSNR within 0.02 dB.
Without CUDA it says so and skips.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
from collections.abc import Callable

import numpy as np
import torch

from bench.common import bracketed, hr_images, machine, synchronizer, to_tensor, to_uint8
from models.networks.checkpoints import load_official
from models.networks.imdn import IMDN
from models.quality.matlab import imresize, imresize_tensor, modcrop, psnr, rgb_to_y
from models.runtime import acs
from models.runtime.backend import Forward, installed, mixed_precision, prepare, resolve_backend
from service.shared import WEIGHTS

CPU_TOLERANCE = 1e-4
GPU_PSNR_TOLERANCE_DB = 0.02
MIXED_PSNR_TOLERANCE_DB = 0.01  # the paper's Table 5 to two decimals


def _lr_hr(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    hr = modcrop(hr, scale)
    return imresize(hr, scale=1 / scale), hr


def _psnr(sr: torch.Tensor, hr: np.ndarray, scale: int) -> float:
    return psnr(rgb_to_y(to_uint8(sr)), rgb_to_y(hr), border=scale)


def _authors(model: IMDN, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y: torch.Tensor = model(x.contiguous())
            return y

    return forward


def _one_crop_at_a_time(forward: Forward) -> Forward:
    """IMDN_AS through `forward` as the service's CPU default runs it: the authors' plan,
    its crops one per call."""

    def run(x: torch.Tensor) -> torch.Tensor:
        plan = acs.authors_plan(*x.shape[-2:])
        if plan.is_whole:
            return forward(x)
        return acs.run_plan(forward, x, plan, scale=1, max_batch=1)

    return run


def _model_input(name: str, lr: np.ndarray, hr: np.ndarray) -> torch.Tensor:
    """The network's input: the LR itself, or for IMDN_AS its bicubic resize to the HR size."""
    x = to_tensor(lr)
    if name == "AS":
        x = imresize_tensor(x.double(), size=hr.shape[:2]).clamp(0, 1).float()
    return x


def run(
    device: torch.device,
    sets: list[str],
    scales: list[int],
    ours: dict[str, tuple[str, torch.dtype, bool]],  # label -> (backend, dtype, mixed)
    rounds: int,
    as_scales: list[int] | None = None,
) -> bool:
    """Print a table for `device`; True when every output agrees with the authors'."""
    sync = synchronizer(device)
    ok = True
    header = f"{'set':6s} {'model':>5s} {'authors ms':>10s} "
    header += " ".join(f"{label + ' ms':>18s} {'speed-up':>8s}" for label in ours)
    header += f" {'PSNR authors':>12s} " + " ".join(f"{'PSNR ' + label:>18s}" for label in ours)
    header += f" {'max |diff|':>10s}"
    print(header)
    cases = [(f"x{s}", s) for s in scales] + [("AS", s) for s in as_scales or []]
    for name, scale in cases:
        reference = load_official(name, WEIGHTS).to(device).eval()
        authors = _authors(reference, device)
        forwards = {
            label: prepare(reference, backend, device, dtype, mixed=mixed)
            for label, (backend, dtype, mixed) in ours.items()
        }
        if name == "AS":
            authors = functools.partial(acs.authors_forward, reference)
            forwards = {label: _one_crop_at_a_time(f) for label, f in forwards.items()}
        for dataset in sets:
            own_ms: dict[str, list[float]] = {label: [] for label in ours}
            log_speedups: dict[str, list[float]] = {label: [] for label in ours}
            psnrs: dict[str, list[float]] = {"authors": [], **{label: [] for label in ours}}
            authors_ms: list[float] = []
            worst = 0.0
            for _name, hr_full in hr_images(dataset):
                lr, hr = _lr_hr(hr_full, scale)
                x = _model_input(name, lr, hr).to(device)
                expected = authors(x).float()
                psnrs["authors"].append(_psnr(expected, hr, scale))
                candidates: dict[str, Callable[[], object]] = {}
                for label, forward in forwards.items():
                    dtype = ours[label][1]
                    got = forward(x.to(dtype)).float()
                    psnrs[label].append(_psnr(got, hr, scale))
                    if dtype == torch.float32 and not ours[label][2]:
                        worst = max(worst, (got - expected).abs().max().item())
                    candidates[label] = functools.partial(forward, x.to(dtype))
                figures, ref = bracketed(
                    candidates, functools.partial(authors, x), rounds=rounds, warmup=0, sync=sync
                )
                authors_ms.append(ref.best * 1000)
                for label, fig in figures.items():
                    own_ms[label].append(min(fig.seconds) * 1000)
                    log_speedups[label].append(math.log(statistics.median(fig.ratios)))
            model = name if name != "AS" else f"AS×{scale}"
            row = f"{dataset:6s} {model:>5s} {statistics.mean(authors_ms):10.1f} "
            row += " ".join(
                f"{statistics.mean(own_ms[label]):18.1f} "
                f"{math.exp(statistics.mean(log_speedups[label])):7.2f}x"
                for label in ours
            )
            authors_psnr = statistics.mean(psnrs["authors"])
            row += f" {authors_psnr:12.3f} " + " ".join(
                f"{statistics.mean(psnrs[label]):18.3f}" for label in ours
            )
            row += f" {worst:10.1e}" if worst else f" {'-':>10s}"
            print(row, flush=True)
            ok &= worst <= CPU_TOLERANCE
            for label, (_, dtype, mixed) in ours.items():
                gap = abs(statistics.mean(psnrs[label]) - authors_psnr)
                if dtype != torch.float32:
                    ok &= gap <= GPU_PSNR_TOLERANCE_DB
                elif mixed:
                    ok &= gap <= MIXED_PSNR_TOLERANCE_DB
    print(
        "times: mean over the set of each image's fastest call; speed-up: geometric mean "
        "over images of the median (authors' time / ours), timed side by side"
    )
    return ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=["Set5", "Set14"])
    parser.add_argument("--scales", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["channels_last"] + (["openvino"] if installed("openvino") else []),
        help="backends to time; `auto` is the service's default",
    )
    parser.add_argument("--as-scales", nargs="*", type=int, default=[3])
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto: both when CUDA is")
    args = parser.parse_args(argv)
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device in ("auto", "cuda"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        else:
            print("no CUDA device here: the GPU half (float16 vs the authors' float32) is skipped")
    ok = True
    for device in devices:
        print(f"\n{machine(device)}\ndevice {device}")
        if device.type == "cpu":
            ours = {}
            for b in filter(installed, args.backends):
                resolved = resolve_backend(b, device)
                mixed = b == "auto" and mixed_precision("auto", resolved)
                label = b if b != "auto" else f"auto={resolved}{'+bf16' if mixed else ''}"
                ours[label] = (b, torch.float32, mixed)
        else:
            ours = {f"{b}_fp16": (b, torch.float16, False) for b in ("eager", "channels_last")}
        ok &= run(device, args.sets, args.scales, ours, args.rounds, args.as_scales)
    print("outputs agree" if ok else "OUTPUTS DIFFER beyond tolerance")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
