"""Inference backends: the same network and weights, run by the engine that is fastest here.

`prepare(model, backend, device, dtype)` returns a function from an NCHW batch (on `device`,
of `dtype`) to the network's output, under inference mode. Every backend in float32
computes the same function within float32 rounding (tests hold them to 1e-4 of eager on
real images; OpenVINO's mixed precision, to the PSNR), and every one takes any batch
size and any height and width, as the service's crops vary:

- ``eager``: the module as written, contiguous NCHW (what the authors' test script does).
- ``channels_last``: the same module with NHWC weights and inputs; oneDNN's NHWC
  convolutions avoid reorders on the CPU (~1.3× here). No extra dependency.
- ``onnxruntime``: exported once through `torch.export` with dynamic batch, height and
  width, run by ONNX Runtime's CPU provider (fused conv + activation, NCHWc layout).
  Needs the ``onnx`` extra (onnxruntime, onnx, onnxscript).
- ``openvino``: converted once from the module with a dynamic input shape, compiled for
  the CPU. Needs the ``openvino`` extra (which `make setup` installs: on the CPU it is
  what ``auto`` picks). Converting takes 6-8 s per network on two cores, so with a
  `cache_dir` the converted network is kept there (OpenVINO IR, named by a hash of the
  weights and OpenVINO's version) and a restart reads it back in ~1 s. Two precisions:

  - float32: agrees with eager within 1e-4 (``IMDN_PRECISION=fp32``).
  - mixed (`prepare(..., mixed=True)`): the trunk in bfloat16, the head and the upsampling
    in float32, as three compiled networks. On a CPU with native bfloat16 (AVX512-BF16,
    AMX) ~1.6-1.9× float32's speed. The whole network in bfloat16 is ~2× but costs up to
    0.03 dB of PSNR: the [0, 1] input loses bits in bfloat16, and the last convolution
    its output's. With those two in float32 the PSNR is within 0.003 dB of float32 on
    Set5 and Set14 at every scale; single pixels move by up to ~0.03 (docs/benchmarks.md
    §10). What ``IMDN_PRECISION=auto`` runs where the CPU has native bfloat16
    (`mixed_precision`).

Both exported backends run `split_free(model)`: the same function, bit for bit, with each
distillation step as two convolutions instead of one and a channel split, which both
runtimes execute as a slow copy (~5 % of OpenVINO's time; ~9 % faster under ONNX Runtime).

- ``compile``: `torch.compile` of the module (static shapes; mode from `compile_mode`,
  by default ``max-autotune-no-cudagraphs``), channels-last on CUDA. Meant for CUDA with
  fixed shape buckets: the service compiles the plain forward of each full (shape, batch
  size) during warm-up, and runs padded crops and shapes it did not warm eager. On the
  CPU it works but compiles slowly (23-65 s per shape) and was not faster than
  OpenVINO (docs/benchmarks.md).

TorchScript freezing was measured and left out: slower than eager here.
The choice is the service's `IMDN_BACKEND`; ``auto`` resolves by `resolve_backend`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.networks.imdn import IMDN, LEAKY_SLOPE, InformationMultiDistillationBlock
from models.networks.masked import masked_forward

Forward = Callable[[torch.Tensor], torch.Tensor]
MaskedForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (crops, valid sizes)
BackendName = Literal["eager", "channels_last", "onnxruntime", "openvino", "compile"]
BACKENDS: tuple[BackendName, ...] = ("eager", "channels_last", "onnxruntime", "openvino", "compile")
CompileMode = Literal["max-autotune-no-cudagraphs", "max-autotune", "default", "reduce-overhead"]
# the Python module each optional backend needs, and the extra that installs it
_NEEDS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}
# the order `auto` tries on the CPU: fastest first (docs/benchmarks.md)
_CPU_PREFERENCE: tuple[BackendName, ...] = ("openvino", "onnxruntime", "channels_last")
# bump when what `split_free` or the conversion produce changes: old cached networks are
# then never read again
_CACHE_FORMAT = 1
# OpenVINO's mixed precision: the stages of `IMDN.forward` and the precision of each
_MIXED_STAGES: tuple[tuple[str, Literal["f32", "bf16"]], ...] = (
    ("head", "f32"),  # a [0, 1] input in bfloat16 loses ~0.01-0.03 dB
    ("trunk", "bf16"),  # ~95 % of the multiply-adds
    ("upsample", "f32"),  # the output's last bits
)
# how far a cached network read back may be from the module it was converted from, of
# the largest output value: float32's rounding, or bfloat16's (the trunks on the random
# sample: up to 0.034; another network's trunk: 0.8-1.1)
_TOLERANCE = {"f32": 1e-4, "bf16": 0.1}
MIXED = "bfloat16 trunk, float32 head and upsampling"  # how the service names it
RUNTIME_CACHE_SHAPES = 64  # OpenVINO's per-shape kernel cache (see `openvino_compiled`)

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """The backend cannot run here: its package is missing, or it does not fit the device."""


def installed(backend: str) -> bool:
    """Whether the package an optional backend needs can be imported."""
    need = _NEEDS.get(backend)
    return need is None or importlib.util.find_spec(need[0]) is not None


def resolve_backend(name: str, device: torch.device, *, padded: bool = False) -> BackendName:
    """`auto` becomes the fastest backend that runs here: on the CPU, OpenVINO or ONNX
    Runtime when installed, else channels_last; on other devices eager (the path the
    CUDA half of bench/model_vs_authors.py measures). With `padded` (padded crops, which
    only PyTorch's masked forward runs: shape buckets) the fastest PyTorch one. Any other
    name is checked."""
    if name == "auto":
        if device.type != "cpu":
            return "eager"
        if padded:
            return "channels_last"
        return next(b for b in _CPU_PREFERENCE if installed(b))
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected auto or one of {', '.join(BACKENDS)}")
    backend: BackendName = name
    if backend in _NEEDS:
        if device.type != "cpu":
            raise BackendUnavailable(f"backend {backend!r} runs on the CPU only, not {device}")
        if not installed(backend):
            module, extra = _NEEDS[backend]
            raise BackendUnavailable(
                f"backend {backend!r} needs the Python package {module!r}: "
                f"pip install 'imdn-serve[{extra}]'"
            )
    return backend


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as OpenVINO
    reports it; False without OpenVINO."""
    if not installed("openvino"):
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def mixed_precision(precision: str, backend: str) -> bool:
    """Whether a precision setting ('auto', 'fp32', 'bf16') runs `backend` (resolved)
    mixed: OpenVINO with a bfloat16 trunk, on 'bf16', and on 'auto' where the CPU computes
    bfloat16 natively (elsewhere OpenVINO would emulate it, slower than float32)."""
    if backend != "openvino":
        return False
    return precision == "bf16" or (precision == "auto" and native_bf16())


def prepare(
    model: IMDN,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    in_place: bool = False,
    compile_mode: CompileMode = "max-autotune-no-cudagraphs",
    cache_dir: Path | None = None,
    mixed: bool = False,
) -> Forward:
    """A forward function for `model` on `device` in `dtype`, run by `backend`.

    The model is copied unless `in_place` (the service's runner: one copy of each network
    on the device, moved and converted in place). Exported backends (ONNX Runtime,
    OpenVINO) run on the CPU, take and give float32 CPU tensors; `mixed` runs OpenVINO's
    trunk in bfloat16 (see the module's docstring). `cache_dir` keeps OpenVINO's converted
    networks across restarts (see `openvino_compiled`).
    """
    name = resolve_backend(backend, device)
    if mixed and name != "openvino":
        raise BackendUnavailable(f"mixed precision is OpenVINO's, not {name!r}'s")
    network = (model if in_place else copy.deepcopy(model)).to(device, dtype=dtype).eval()
    if name == "eager":
        return _module_forward(network, memory_format=torch.contiguous_format)
    if name == "channels_last":
        network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return _module_forward(network, memory_format=torch.channels_last)
    if name == "compile":
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        network = network.to(memory_format=fmt)  # type: ignore[call-overload]
        compiled = torch.compile(network, mode=compile_mode, dynamic=False)
        return _module_forward(compiled, memory_format=fmt)
    if dtype != torch.float32:
        raise BackendUnavailable(f"backend {name!r} runs in float32 only, not {dtype}")
    sample = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    network = split_free(network)  # same outputs; the runtimes copy channel splits slowly
    if name == "onnxruntime":
        return _onnxruntime_forward(network, sample)
    if mixed:
        return _openvino_mixed_forward(network, sample, cache_dir)
    return _openvino_forward(network, sample, cache_dir)


def prepare_masked(
    model: IMDN, backend: str, device: torch.device, dtype: torch.dtype
) -> MaskedForward:
    """`models.networks.masked.masked_forward` of `model` (moved to `device` and `dtype` in
    place), eager, in the layout of `backend` (eager or channels_last): what batches with
    padded crops run under shape buckets. It is not compiled: the compile backend compiles
    the plain forward of crops that fill their shape (tile grids, frames), where the time
    goes, and the masked one took minutes per model to compile on an H200."""
    name = resolve_backend(backend, device)
    if name not in ("eager", "channels_last"):
        raise BackendUnavailable(f"backend {name!r} cannot run padded crops (shape buckets)")
    fmt = torch.channels_last if name == "channels_last" else torch.contiguous_format
    network = model.to(device, dtype=dtype).eval().to(memory_format=fmt)  # type: ignore[call-overload]

    def forward(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return masked_forward(network, x.contiguous(memory_format=fmt), valid).contiguous()

    return forward


class SplitFreeBlock(nn.Module):
    """An IMDB whose distillation steps are two convolutions each (the kept channels and
    the rest) instead of one convolution and a channel split: the same function,
    bit for bit, without the split layers that exported runtimes copy slowly."""

    def __init__(self, block: InformationMultiDistillationBlock) -> None:
        super().__init__()
        convs, d = (block.c1, block.c2, block.c3), block.distilled
        self.keep = nn.ModuleList(_conv_rows(conv, 0, d) for conv in convs)
        self.refine = nn.ModuleList(_conv_rows(conv, d, conv.out_channels) for conv in convs)
        self.c4, self.cca, self.c5 = block.c4, block.cca, block.c5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept: list[torch.Tensor] = []
        rest = x
        for keep, refine in zip(self.keep, self.refine, strict=True):
            kept.append(F.leaky_relu(keep(rest), LEAKY_SLOPE))
            rest = F.leaky_relu(refine(rest), LEAKY_SLOPE)
        kept.append(self.c4(rest))
        out: torch.Tensor = self.c5(self.cca(torch.cat(kept, dim=1))) + x
        return out


def _conv_rows(conv: nn.Conv2d, start: int, stop: int) -> nn.Conv2d:
    """The convolution computing only output channels start:stop of `conv`."""
    part = copy.deepcopy(conv)
    part.weight = nn.Parameter(conv.weight[start:stop].detach().clone())
    if conv.bias is not None:
        part.bias = nn.Parameter(conv.bias[start:stop].detach().clone())
    part.out_channels = part.weight.shape[0]
    return part


def split_free(model: IMDN) -> IMDN:
    """A copy of `model` with every block a `SplitFreeBlock`: what the exported backends run."""
    copied = copy.deepcopy(model)
    copied.blocks = nn.ModuleList(SplitFreeBlock(b) for b in copied.blocks)  # type: ignore[arg-type]
    return copied


def _module_forward(
    network: Callable[[torch.Tensor], torch.Tensor], *, memory_format: torch.memory_format
) -> Forward:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            y: torch.Tensor = network(x.contiguous(memory_format=memory_format))
            return y.contiguous()

    return forward


def _threads() -> int:
    return torch.get_num_threads()


def _onnx_bytes(network: nn.Module, sample: torch.Tensor) -> bytes:
    """The network as an ONNX model with a dynamic batch, height and width."""
    dynamic = torch.export.Dim.DYNAMIC
    with _quiet("torch.onnx"):
        program: Any = torch.onnx.export(
            network,
            (sample,),
            dynamo=True,
            input_names=["image"],
            output_names=["output"],
            dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},),
            optimize=True,
            verbose=False,
        )
    data: bytes = program.model_proto.SerializeToString()
    return data


def onnxruntime_session(
    network: nn.Module, sample: torch.Tensor, profile_prefix: str | None = None
) -> Any:
    """`network` exported with a dynamic N, H, W, in an ONNX Runtime CPU session; with
    `profile_prefix`, the session records per-node times (bench/model_vs_machine.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = _threads()
    options.log_severity_level = 3  # errors only: shape-inference notes are not news
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(
        _onnx_bytes(network, sample), options, providers=["CPUExecutionProvider"]
    )


def _onnxruntime_forward(network: nn.Module, sample: torch.Tensor) -> Forward:
    session = onnxruntime_session(network, sample)

    def forward(x: torch.Tensor) -> torch.Tensor:
        (y,) = session.run(["output"], {"image": _numpy(x)})
        return torch.from_numpy(y)

    return forward


def openvino_compiled(
    network: nn.Module,
    sample: torch.Tensor,
    extra_config: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    *,
    precision: Literal["f32", "bf16"] = "f32",
    stage: str = "",
) -> Any:
    """`network` converted with a dynamic N, H, W and compiled for the CPU in `precision`
    (pinned: OpenVINO's own default is bfloat16 on CPUs that have it); `extra_config`
    adds OpenVINO CPU properties (bench/model_vs_machine.py: PERF_COUNT). `stage` names
    a part of a network converted on its own (its cache file).

    With `cache_dir`, a network converted before (same weights, same OpenVINO) is read
    from there instead of converted; it must still compute `network`'s output on `sample`
    (within 1e-4, or bfloat16's rounding), or it is converted afresh. A cache never stops
    the network from running: one that cannot be read or written only costs the
    conversion."""
    import openvino as ov

    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": _threads(),
        # kernels kept per input shape: OpenVINO's 5000 grew a server that sees every
        # image size by ~0.35 MB a shape; the service's recent shapes fit in 64
        "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_SHAPES,
        **(extra_config or {}),
    }
    core = ov.Core()
    cached = _openvino_cache_file(network, cache_dir, stage)
    if cached is not None and cached.is_file():
        try:
            compiled = core.compile_model(core.read_model(cached), "CPU", config)
        except Exception as exc:  # a damaged file, whatever OpenVINO raises for it
            log.warning("OpenVINO cache %s not read (%s): converting afresh", cached, exc)
        else:
            if _agrees(compiled, network, sample, _TOLERANCE[precision]):
                return compiled
            log.warning("OpenVINO cache %s computes something else: converting afresh", cached)
    channels = sample.shape[1]
    with _quiet("torch.jit"):
        converted = ov.convert_model(
            network, example_input=sample, input=[ov.PartialShape([-1, channels, -1, -1])]
        )
    if cached is not None:
        _save_openvino(converted, cached)
    return core.compile_model(converted, "CPU", config)


def _openvino_cache_file(network: nn.Module, cache_dir: Path | None, stage: str) -> Path | None:
    """Where the converted `network` is kept in `cache_dir`: named by a hash of its
    weights (names, shapes, bytes), OpenVINO's version and `_CACHE_FORMAT`, and the
    `stage`. None without a cache, or when the folder is not this user's own (another
    user could plant a file)."""
    if cache_dir is None:
        return None
    import openvino as ov

    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = cache_dir.stat().st_uid
    except OSError as exc:
        log.warning("OpenVINO cache folder %s unusable (%s): converting each start", cache_dir, exc)
        return None
    if hasattr(os, "getuid") and owner != os.getuid():
        log.warning("OpenVINO cache folder %s belongs to another user: not used", cache_dir)
        return None
    digest = hashlib.sha256(f"{_CACHE_FORMAT} {ov.__version__}".encode())
    for key, value in network.state_dict().items():
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes())
    suffix = f"-{stage}" if stage else ""
    return cache_dir / f"openvino-{digest.hexdigest()[:32]}{suffix}.xml"


def _save_openvino(converted: Any, target: Path) -> None:
    """Write the IR (.xml and its .bin, float32 weights) under temporary names, then rename
    the .bin and last the .xml into place: a reader sees a whole pair or none."""
    import openvino as ov

    partial = target.with_name(f".{target.stem}.{os.getpid()}.partial.xml")
    try:
        ov.save_model(converted, partial, compress_to_fp16=False)
        os.replace(partial.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(partial, target)
    except (OSError, RuntimeError) as exc:
        partial.unlink(missing_ok=True)
        partial.with_suffix(".bin").unlink(missing_ok=True)
        log.warning("OpenVINO cache %s not saved: %s", target, exc)


def _agrees(compiled: Any, network: nn.Module, sample: torch.Tensor, tolerance: float) -> bool:
    """Whether `compiled` computes `network` on `sample` within `tolerance` of the
    largest output value (at least 1)."""
    with torch.inference_mode():
        expected = network(sample).numpy()
    got = compiled.create_infer_request().infer({0: _numpy(sample)})[0]
    bound = tolerance * max(1.0, float(np.abs(expected).max()))
    return bool(got.shape == expected.shape and np.abs(got - expected).max() <= bound)


def _openvino_forward(network: nn.Module, sample: torch.Tensor, cache_dir: Path | None) -> Forward:
    request = openvino_compiled(network, sample, cache_dir=cache_dir).create_infer_request()

    def forward(x: torch.Tensor) -> torch.Tensor:
        result = request.infer({0: _numpy(x)}, share_inputs=True)  # outputs are copies
        return torch.from_numpy(result[0])

    return forward


class _Stage(nn.Module):
    """One stage of an IMDN's forward (`head`, `trunk` or `upsample`), to convert alone."""

    def __init__(self, network: IMDN, stage: str) -> None:
        super().__init__()
        self.network, self.stage = network, stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = getattr(self.network, self.stage)(x)
        return y


def _openvino_mixed_forward(network: IMDN, sample: torch.Tensor, cache_dir: Path | None) -> Forward:
    """The network as three OpenVINO networks: head (float32), trunk (bfloat16) and
    upsampling (float32), each fed the one before's output in place."""
    requests = []
    x = sample
    for stage, precision in _MIXED_STAGES:
        part = _Stage(network, stage)
        compiled = openvino_compiled(part, x, cache_dir=cache_dir, precision=precision, stage=stage)
        requests.append(compiled.create_infer_request())
        with torch.no_grad():  # the next stage's sample (an inference tensor would not trace)
            x = part(x)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = _numpy(x)
        for request in requests:
            # each output stays the request's own until its next run, after the next
            # stage has read it: no copies between stages
            y = request.infer({0: y}, share_inputs=True, share_outputs=True)[0]
        return torch.from_numpy(y.copy())

    return forward


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Hide a converter's warnings about its own internals (tracer notes, optional
    torchvision ops it skips); errors still raise."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _numpy(x: torch.Tensor) -> np.ndarray:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise BackendUnavailable(f"exported backends take float32 CPU tensors, got {x.dtype}")
    return x.detach().contiguous().numpy()
