"""Train IMDN or IMDN_AS with the paper's recipe, resumably.

Recipe (paper, Sec. 4.1, and the authors' `train_IMDN.py`): L1 loss; Adam with
β = (0.9, 0.999); learning rate 2e-4 halved every 2e5 iterations; batches of 16
HR patches of 192x192 (LR 192/s) with random flips and 90° rotations; LR made by
MATLAB bicubic. The authors' script runs 1000 epochs of 1000 iterations: 1e6.

A run writes to its output folder: `checkpoint.pt` (weights, optimizer,
scheduler, grad scaler, iteration, RNG state: what `resume` needs),
`last.pth` and, with validation, `best.pth` (plain state dicts with the
authors' key names, loadable by `models.networks.checkpoints.load_model`), `log.csv`
(iteration, loss, learning rate, validation PSNR) and `config.json`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim import Adam
from torch.optim.lr_scheduler import StepLR
from tqdm import tqdm

from models.networks.checkpoints import CheckpointError, atomic_write, load_model, save_state_dict
from models.networks.imdn import IMDN, architecture_for, build_model, describe_network
from models.quality.evaluate import evaluate
from models.runtime.device import precision_dtype, resolve_device
from models.training.data import PatchDataset, build_cache, make_loader

Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "fp16", "bf16")
CHECKPOINT_FORMAT = "imdn-train/1"
LOG_COLUMNS = ("iteration", "loss", "lr", "val_psnr")

# What a resumed run must keep: changing any of these would make it another run.
RECIPE_FIELDS = frozenset(
    {"scale", "batch_size", "patch_size", "learning_rate", "lr_step", "lr_gamma", "betas", "seed"}
    | {"as_factors"}
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; the defaults are the paper's recipe."""

    hr_dir: Path
    scale: int  # the network's factor: 2, 3, 4 for IMDN; 1 for IMDN_AS (same-size pairs)
    out_dir: Path
    lr_dir: Path | None = None  # default: LR made by MATLAB bicubic from HR
    val_hr_dir: Path | None = None
    val_lr_dir: Path | None = None  # default: LR made by MATLAB bicubic (needed for IMDN_AS)
    cache_dir: Path | None = None  # default: out_dir / "cache"
    init: Path | None = None  # weights only, e.g. an official checkpoint, for fine-tuning
    resume: Path | None = None  # a checkpoint.pt to continue; set by `configure(resume=...)`
    iterations: int = 1_000_000
    batch_size: int = 16
    patch_size: int = 192  # HR side; the LR patch is patch_size / scale
    learning_rate: float = 2e-4
    lr_step: int = 200_000
    lr_gamma: float = 0.5
    betas: tuple[float, float] = (0.9, 0.999)
    val_every: int = 5_000
    checkpoint_every: int = 5_000
    log_every: int = 100
    workers: int = 8
    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"
    deterministic: bool = False
    as_factors: tuple[int, ...] = (2, 3, 4)  # IMDN_AS without --lr: bicubic down/up by these

    def __post_init__(self) -> None:
        positive = {
            "iterations": self.iterations,
            "batch_size": self.batch_size,
            "patch_size": self.patch_size,
            "lr_step": self.lr_step,
            "val_every": self.val_every,
            "checkpoint_every": self.checkpoint_every,
            "log_every": self.log_every,
        }
        bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
        if bad:
            raise ValueError(f"must be positive: {', '.join(bad)}")
        if self.scale < 1:
            raise ValueError(f"scale must be 1 (IMDN_AS) or >= 2, got {self.scale}")
        if self.patch_size % self.scale:
            raise ValueError(
                f"patch size {self.patch_size} is not a multiple of scale {self.scale}"
            )
        if self.scale == 1 and self.patch_size % 4:
            raise ValueError(
                f"IMDN_AS needs a patch size that is a multiple of 4, not {self.patch_size}"
            )
        if self.learning_rate <= 0 or not 0 < self.lr_gamma <= 1:
            raise ValueError("learning_rate must be > 0 and lr_gamma in (0, 1]")
        if self.workers < 0 or self.seed < 0:
            raise ValueError("workers and seed must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.scale == 1 and self.val_hr_dir is not None and self.val_lr_dir is None:
            raise ValueError("IMDN_AS is validated on same-size pairs: give val_lr_dir too")

    @property
    def arch(self) -> str:
        return architecture_for(self.scale).architecture

    def to_json(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known:
                continue  # a field of an older or newer version; ignore it
            if name in {"betas", "as_factors"}:
                value = tuple(value)
            elif value is not None and (name.endswith("_dir") or name in {"init", "resume"}):
                value = Path(value)
            values[name] = value
        return cls(**values)


@dataclass
class TrainResult:
    out_dir: Path
    start_iteration: int
    iteration: int
    learning_rate: float  # the rate the next step would use
    losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, window mean)
    validations: list[tuple[int, float]] = field(default_factory=list)  # (iteration, PSNR)
    best_psnr: float | None = None
    best_iteration: int | None = None
    seconds: float = 0.0

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pth"

    @property
    def best(self) -> Path | None:
        return self.out_dir / "best.pth" if self.best_iteration is not None else None

    def summary(self) -> str:
        done = self.iteration - self.start_iteration
        rate = done / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"trained iterations {self.start_iteration}..{self.iteration} "
            f"({rate:.1f} it/s), next learning rate {self.learning_rate:.3g}",
            f"resume state: {self.checkpoint}",
            f"latest weights: {self.last}",
        ]
        if self.best is not None:
            lines.append(
                f"best weights: {self.best} "
                f"(PSNR {self.best_psnr:.3f} dB at iteration {self.best_iteration})"
            )
        return "\n".join(lines)


# Devices, precision, seeds


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, None for fp32. 'auto': bf16 on CUDA where supported, else fp16."""
    dtype = precision_dtype(precision, device, prefer_bf16=True)
    return None if dtype == torch.float32 else dtype


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN autotuning for speed (patches have one shape), or deterministic kernels."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    """Every global RNG, as tensors and plain values (loadable with `weights_only`)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "state": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["state"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_tuples(value: Any) -> Any:
    """`random.setstate` wants tuples; a checkpoint may give lists back."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value


# Checkpoints


def _atomic_save(obj: object, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_training_state(path: Path) -> dict[str, Any]:
    """A `checkpoint.pt` written by `train`, read with `weights_only` (tensors and plain data)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; report them all as one
        raise CheckpointError(f"{path}: not a readable training checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a training checkpoint ({CHECKPOINT_FORMAT}); for plain weights "
            "(an official .pth, best.pth) use --init instead"
        )
    return cast(dict[str, Any], state)


def configure(options: Mapping[str, Any], *, resume: Path | None = None) -> TrainConfig:
    """The run's config: `options` alone, or a resumed run's saved recipe plus `options`.

    On resume, options outside `RECIPE_FIELDS` (iterations, validation, workers,
    device, folders) may change; a recipe option that differs is an error.
    """
    if resume is None:
        return TrainConfig(**options)
    if options.get("init") is not None:
        raise ValueError("--init and --resume exclude each other: a resumed run has its weights")
    saved = TrainConfig.from_json(load_training_state(resume)["config"])
    options = {k: v for k, v in options.items() if k not in {"init", "resume"}}
    _check_recipe(saved, options)
    return dataclasses.replace(saved, init=None, resume=resume, **options)


def _check_recipe(saved: TrainConfig, options: Mapping[str, Any]) -> None:
    changed = [
        f"{k} {v!r} (checkpoint: {getattr(saved, k)!r})"
        for k, v in sorted(options.items())
        if k in RECIPE_FIELDS and v != getattr(saved, k)
    ]
    if changed:
        raise ValueError(
            "a resumed run keeps its recipe; these differ from the checkpoint: "
            + "; ".join(changed)
        )


# The CSV log


class TrainingLog:
    """`log.csv`: one row per log window and per validation; flushed as it goes."""

    def __init__(self, path: Path, *, keep_until: int | None) -> None:
        """Start a new log, or (resuming) keep the rows up to `keep_until` and append."""
        kept: list[dict[str, str]] = []
        if keep_until is not None and path.is_file():
            with path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["iteration"]) <= keep_until]
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=LOG_COLUMNS)
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._file.flush()

    def write(self, iteration: int, loss: float | None, lr: float, val_psnr: float | None) -> None:
        self._writer.writerow(
            {
                "iteration": iteration,
                "loss": "" if loss is None else f"{loss:.6f}",
                "lr": f"{lr:.6g}",
                "val_psnr": "" if val_psnr is None else f"{val_psnr:.4f}",
            }
        )
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# Training


def _initial_weights(model: IMDN, path: Path) -> None:
    """Copy weights (only) from any IMDN state dict of the same architecture and scale."""
    source = load_model(path, verify_sha256=False)
    if type(source) is not type(model) or source.scale != model.scale:
        got = describe_network(source.architecture, source.scale)
        want = describe_network(model.architecture, model.scale)
        raise ValueError(f"{path}: holds {got}, but this run trains {want}")
    model.load_state_dict(source.state_dict())


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train (or, with `config.resume`, continue) until `config.iterations`.

    See the module docstring for the recipe and what the output folder holds.
    """
    resume = config.resume
    started = time.perf_counter()
    device = resolve_device(config.device)
    amp_dtype = autocast_dtype(config.precision, device)
    seed_everything(config.seed)
    _configure_backends(device, config.deterministic)

    model = build_model(config.arch, config.scale)
    if config.init is not None:
        _initial_weights(model, config.init)
    model.to(device).train()
    optimizer = Adam(
        model.parameters(),
        lr=config.learning_rate,
        betas=config.betas,
        fused=device.type == "cuda",
    )
    scheduler = StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    out = config.out_dir
    checkpoint = out / "checkpoint.pt"
    start = 0
    best_psnr: float | None = None
    best_iteration: int | None = None
    if resume is not None:
        state = load_training_state(resume)
        _check_recipe(
            TrainConfig.from_json(state["config"]),
            {k: getattr(config, k) for k in RECIPE_FIELDS},
        )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the saved run may have used another device
            group["fused"] = device.type == "cuda"
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        best_psnr, best_iteration = state["best_psnr"], state["best_iteration"]
        set_rng_state(state["rng"])
        earlier_best = resume.parent / "best.pth"
        if best_iteration is not None and earlier_best.is_file() and resume.parent != out:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(earlier_best, out / "best.pth")
    elif checkpoint.exists():
        raise ValueError(
            f"{out} already holds a training run ({checkpoint.name}): resume it with "
            f"--resume {checkpoint}, or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")

    result = TrainResult(
        out_dir=out,
        start_iteration=start,
        iteration=start,
        learning_rate=_current_lr(optimizer),
        best_psnr=best_psnr,
        best_iteration=best_iteration,
    )
    if start >= config.iterations:
        result.seconds = time.perf_counter() - started
        return result

    images = build_cache(
        config.hr_dir,
        scale=config.scale,
        cache_dir=config.cache_dir or out / "cache",
        lr_dir=config.lr_dir,
        as_factors=config.as_factors,
        workers=config.workers,
        progress=progress,
    )
    dataset = PatchDataset(
        images,
        scale=config.scale,
        patch_size=config.patch_size,
        seed=config.seed,
        size_multiple=model.size_multiple,
    )
    loader = make_loader(
        dataset,
        start=start,
        stop=config.iterations,
        batch_size=config.batch_size,
        workers=config.workers,
        pin_memory=device.type == "cuda",
    )
    log = TrainingLog(out / "log.csv", keep_until=start if resume is not None else None)

    def save(iteration: int) -> None:
        save_state_dict(model, result.last)
        _atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "iteration": iteration,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "best_psnr": result.best_psnr,
                "best_iteration": result.best_iteration,
                "rng": rng_state(),
                "config": config.to_json(),
            },
            checkpoint,
        )

    def validate(iteration: int) -> float:
        assert config.val_hr_dir is not None
        report = evaluate(
            model, config.val_hr_dir, lr_dir=config.val_lr_dir, scale=model.scale, device=device
        )
        result.validations.append((iteration, report.psnr))
        if result.best_psnr is None or report.psnr > result.best_psnr:
            result.best_psnr, result.best_iteration = report.psnr, iteration
            save_state_dict(model, out / "best.pth")
        if progress:
            tqdm.write(
                f"iteration {iteration}: {report.dataset} PSNR {report.psnr:.3f} dB "
                f"(best {result.best_psnr:.3f} at {result.best_iteration})"
            )
        return report.psnr

    bar = tqdm(
        total=config.iterations,
        initial=start,
        unit="it",
        desc=f"{config.arch} x{config.scale}",
        disable=not progress,
        dynamic_ncols=True,
    )
    window_sum = torch.zeros((), device=device)
    window_count = 0
    iteration = start
    try:
        for lr_batch, hr_batch in loader:
            lr_images = lr_batch.to(device, non_blocking=True).float().div_(255.0)
            hr_images = hr_batch.to(device, non_blocking=True).float().div_(255.0)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                sr = model(lr_images)
            loss = F.l1_loss(sr.float(), hr_images)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.step(optimizer)
            scaler.update()
            step_lr = _current_lr(optimizer)
            scheduler.step()
            iteration += 1
            window_sum += loss.detach()
            window_count += 1
            bar.update(1)

            validating = config.val_hr_dir is not None and (
                iteration % config.val_every == 0 or iteration == config.iterations
            )
            if iteration % config.log_every == 0 or validating or iteration == config.iterations:
                mean_loss = window_sum.item() / window_count
                result.losses.append((iteration, mean_loss))
                window_sum.zero_()
                window_count = 0
                val_psnr = validate(iteration) if validating else None
                log.write(iteration, mean_loss, step_lr, val_psnr)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{step_lr:.2e}", refresh=False)
            if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
                save(iteration)
    finally:
        bar.close()
        log.close()
    result.iteration = iteration
    result.learning_rate = _current_lr(optimizer)
    result.seconds = time.perf_counter() - started
    return result


# Command line (the `imdn train` subcommand's options)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `imdn train`; unset recipe options keep a resumed run's values."""
    d = TrainConfig.__dataclass_fields__
    a = parser.add_argument
    a("--hr", type=Path, help="folder of HR training images (DIV2K_train_HR)")
    a("--scale", type=int, help="2, 3, 4 (IMDN), or 1 (IMDN_AS, same-size pairs)")
    a("--out", type=Path, help="output folder: checkpoint.pt, best.pth, last.pth, log.csv")
    a("--lr", type=Path, help="folder of LR images (same stem or stem + 'x<s>'); default: bicubic")
    a("--val", type=Path, help="HR folder to validate on (Y PSNR, shave s), e.g. Set5/HR")
    a("--val-lr", type=Path, help="LR folder for --val; default: made by MATLAB bicubic")
    a("--resume", type=Path, help="checkpoint.pt to continue (same iterations and schedule)")
    a("--init", type=Path, help="weights to start from (e.g. the official IMDN_x4.pth)")
    a("--cache-dir", type=Path, help="where LR/HR arrays are cached (default: OUT/cache)")
    for flag, kind in (
        ("--iterations", int),
        ("--batch-size", int),
        ("--patch-size", int),
        ("--learning-rate", float),
        ("--lr-step", int),
        ("--val-every", int),
        ("--checkpoint-every", int),
        ("--log-every", int),
        ("--workers", int),
        ("--seed", int),
    ):
        default = d[flag[2:].replace("-", "_")].default
        a(flag, type=kind, help=f"default {default}")
    a("--device", help="auto (CUDA when available), cpu, cuda, cuda:N")
    a("--precision", choices=PRECISIONS, help="mixed precision on CUDA; default auto (bf16/fp16)")
    a("--deterministic", action="store_true", default=None, help="deterministic CUDA kernels")
    a("--as-factors", type=int, nargs="+", help="IMDN_AS without --lr: factors (default 2 3 4)")


_ARG_TO_FIELD = {
    "hr": "hr_dir",
    "out": "out_dir",
    "lr": "lr_dir",
    "val": "val_hr_dir",
    "val_lr": "val_lr_dir",
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config for parsed `imdn train` options (resumed runs fill in what is unset)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"resume"}
    options: dict[str, Any] = {}
    for name, value in vars(args).items():
        key = _ARG_TO_FIELD.get(name, name)
        if key in fields and value is not None:
            options[key] = tuple(value) if key == "as_factors" else value
    if args.resume is None:
        missing = [f"--{n}" for n in ("hr", "scale", "out") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} required (unless --resume)")
    return configure(options, resume=args.resume)
