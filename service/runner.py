"""The device runner: the only code that touches the device.

It loads each network once onto the device (one copy: the backend runs that very
module), warms every (shape, batch size) the planner will send when shape buckets are
on (so cuDNN's autotuning and `torch.compile` happen before `/readyz`, never on a
request), runs batches on its one device thread, and splits a batch that runs out of
memory (halves, then a grid of smaller tiles for a single crop). With buckets, a batch
whose crops all fill their shape (a tile grid, a frame of its bucket's size) runs the
plain network; a batch with padded crops runs the masked forward. Outputs stay on the
device: a batch's outputs are clamped and quantised once (per output form: RGB or grey,
8 or 16 bits), and each request's `paste` takes its slice, in the device thread. Every
torch call there waits for the GIL while other threads run Python, so its calls per
batch do not grow with the requests in it; only a tiled request adds one paste per crop
(`bench.device_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from models.networks.checkpoints import REGISTRY, fetch, load_model
from models.networks.descriptor import ModelDescriptor
from models.runtime import acs
from models.runtime.backend import (
    MIXED,
    BackendUnavailable,
    Forward,
    MaskedForward,
    mixed_precision,
    prepare,
    prepare_masked,
    resolve_backend,
)
from models.runtime.device import precision_dtype, resolve_device
from models.runtime.graphs import GraphedForward
from service import pixels
from service.batcher import BatchOutcome, Key, Slice
from service.errors import DeviceOutOfMemory
from service.metrics import Metrics, peak_memory_bytes, reset_peak_memory
from service.planner import (
    Planner,
    batch_limit,
    batch_split,
    padded_batch,
    padded_batch_sizes,
)
from service.settings import ModelName, Settings

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

log = logging.getLogger(__name__)

MEGACACHE_FILE = "imdn-megacache.bin"
# without shape buckets, the crop side (at the network's inner resolution) at which warm-up
# times each batch size, and how many pairs of timings decide each size
MEASURE_SIDE = 96
MEASURE_ROUNDS = 3


@dataclass
class LoadedModel:
    """A warm network on the device: its descriptor (with this dtype and device) and the
    forwards that run it."""

    descriptor: ModelDescriptor
    backend: str  # models.runtime.backend: how `forward` runs the network
    # the backend's plain forward of the one copy on the device: every batch without
    # buckets; with them, batches of crops that fill a warmed shape of `full_shapes`
    forward: Forward
    masked: MaskedForward | None  # with buckets: the forward of padded crops (graphed)
    masked_eager: MaskedForward | None  # the same, not graphed: for shapes not warmed
    full_shapes: frozenset[tuple[int, int]] = frozenset()  # (h, w) warmed for `forward` too
    frame_shapes: frozenset[tuple[int, int]] = frozenset()  # (h, w) run at batch size 1
    warm_shapes: set[tuple[int, ...]] = field(default_factory=set)  # masked, warmed
    warm_full: set[tuple[int, ...]] = field(default_factory=set)  # plain, warmed
    # (h, w): the largest batch worth forming, as warm-up measured (`choose_batch_limits`)
    batch_limits: dict[tuple[int, int], int] = field(default_factory=dict)
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0


@dataclass(eq=False)
class Job:
    """A request's crops on the device (a ticket's payload)."""

    crops: torch.Tensor  # (n, 3, H, W) float32 in [0, 1], padded to the plan's shape
    valid: torch.Tensor  # (n, 2) int64: each crop's real (h, w) inside its padded shape
    # (first crop, its outputs quantised in this job's form): into the request's canvas
    paste: Callable[[int, torch.Tensor], None]
    full: bool = False  # every crop fills (H, W): no padding, so no mask is needed
    grey: bool = False  # the output form `service.pixels.quantise` gives `paste`
    bits: int = 8


def activation_bytes(model: LoadedModel, shape: torch.Size | tuple[int, ...]) -> int:
    """A rough peak of a forward's activations: the six block outputs concatenated
    (384 channels) and a block's working set (~256) at the network's inner
    resolution (a quarter of each side for IMDN_AS), plus the output."""
    d = model.descriptor
    n, _, h, w = shape
    inner = (h // d.size_multiple) * (w // d.size_multiple)
    out = 3 * h * w * d.scale**2
    itemsize = torch.finfo(d.dtype or torch.float32).bits // 8
    return n * (640 * inner + 2 * out) * itemsize


class DeviceRunner:
    """Owns the device and its thread: load, warm, forward, split on OOM."""

    def __init__(self, settings: Settings, planner: Planner, metrics: Metrics) -> None:
        self.settings = settings
        self.planner = planner
        self.metrics = metrics
        self.device = resolve_device(settings.device)
        backend: str = settings.backend  # unresolvable: `load` reports it
        with contextlib.suppress(BackendUnavailable, ValueError):
            backend = resolve_backend(backend, self.device, padded=planner.buckets)
        # OpenVINO's mixed precision takes and gives float32 tensors
        self.mixed = mixed_precision(settings.precision, backend)
        precision = "fp32" if self.mixed else settings.precision
        self.dtype = precision_dtype(precision, self.device, prefer_bf16=False)
        self.precision = MIXED if self.mixed else str(self.dtype).removeprefix("torch.")
        self.models: dict[str, LoadedModel] = {}
        self.shapes_run: dict[str, set[tuple[int, int]]] = {}  # crop shapes per model
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imdn-device")
        self._busy_since: float | None = None
        self._graph_pool: _POOL_HANDLE | None = None  # one memory pool for every graph
        # (model, h, w): {batch size: seconds} of the warm-up's timed pass: the batcher's
        # throughput estimate and the runner's batch splitting both read it
        self.batch_seconds: dict[tuple[str, int, int], dict[int, float]] = {}
        self.clock = time.perf_counter  # what times the batch sizes (`choose_batch_limits`)

    # Life cycle (on the device thread)

    async def call(self, fn: Callable[..., object], *args: object) -> object:
        """Run `fn(*args)` on the device thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def configure(self) -> None:
        """Process-wide state for serving: torch threads, cuDNN tuning, the GIL switch
        interval, compile caches."""
        if self.settings.torch_threads and self.device.type == "cpu":
            # in the device thread, which runs every forward (it also becomes the default
            # of threads started later: torch's thread count is process-wide state)
            torch.set_num_threads(self.settings.torch_threads)
        if self.device.type == "cuda":
            # tuning per shape pays only when the shapes are few and warmed before traffic;
            # without buckets every new image size would be tuned on a request (~180 ms)
            torch.backends.cudnn.benchmark = self.planner.buckets
        interval = self.settings.switch_interval_s(self.device)
        if interval is not None:  # process-wide: the device thread waits less for the GIL
            sys.setswitchinterval(interval)
        if self.settings.backend == "compile":
            self._load_compile_cache()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)

    def load(self, name: ModelName) -> LoadedModel:
        started = time.perf_counter()
        spec = REGISTRY[name]
        own = name in self.settings.checkpoints  # the user's own file, e.g. from `imdn train`
        if self.settings.fetch_weights and not own:
            fetch(spec, self.settings.weights_dir, base_url=self.settings.weights_url)
        network = load_model(
            self.settings.checkpoint_path(name), expect=spec, verify_sha256=not own
        )
        # the file fits the registry's model exactly (architecture, scale, every shape)
        descriptor = spec.model.loaded(dtype=self.dtype, device=self.device)
        backend = resolve_backend(self.settings.backend, self.device, padded=self.planner.buckets)
        # one copy on the device: every forward below runs `network` itself, moved and
        # converted in place (exported backends keep their own runtime copy instead)
        forward = prepare(
            network,
            backend,
            self.device,
            self.dtype,
            in_place=True,
            compile_mode=self.settings.compile_mode,
            cache_dir=self.settings.backend_cache_dir,
            mixed=self.mixed,
        )
        masked = masked_eager = None
        multiple = descriptor.size_multiple
        if self.planner.buckets:
            # padded crops run the masked forward eager: the compile backend compiles only
            # the plain forward of full crops (the masked one took minutes per model)
            layout = backend
            if backend == "compile":
                layout = "channels_last" if self.device.type == "cuda" else "eager"
            masked = masked_eager = prepare_masked(network, layout, self.device, self.dtype)
            if self.settings.graphs_on(self.device):  # warm-up captures each shape
                masked = self._graphed(masked)
                if backend != "compile":  # compiled kernels run as they are
                    forward = self._graphed(forward)
        del network
        loaded = LoadedModel(
            descriptor=descriptor,
            backend=backend,
            forward=forward,
            masked=masked,
            masked_eager=masked_eager,
            full_shapes=frozenset(self.planner.full_shapes(multiple)),
            frame_shapes=frozenset(self.planner.frame_shapes(multiple)),
            load_seconds=time.perf_counter() - started,
        )
        if self.settings.warmup:
            started = time.perf_counter()
            self._warm(loaded)
            if self.settings.batch_limit == "measured":
                self.choose_batch_limits(loaded)
            loaded.warmup_seconds = time.perf_counter() - started
        self.models[name] = loaded
        return loaded

    def _graphed(self, forward: Callable[..., torch.Tensor]) -> GraphedForward:
        """`forward` replayed as CUDA graphs of the shapes warm-up captures; every graph
        of this runner shares one memory pool (one replay at a time, outputs copied)."""
        graphed = GraphedForward(forward, self.device, self._graph_pool)
        self._graph_pool = graphed.pool
        return graphed

    def warm_batches(self, model: LoadedModel) -> list[tuple[int, int, int]]:
        """(batch, h, w) the warm-up runs: with buckets, every shape at every padded batch
        size (frames at 1 only); without, a small square at batch 1 and 4 (first-call
        costs only). With buckets the full shapes also warm the plain forward."""
        shapes = self.planner.shapes(model.descriptor.size_multiple)
        if shapes:
            return [
                (b, h, w)
                for h, w in shapes
                for b in ((1,) if (h, w) in model.frame_shapes else self.planner.batch_sizes)
            ]
        side = min(64, math.isqrt(self.settings.tile_max_pixels)) // 4 * 4
        return [(1, side, side), (4, side, side)]

    def _warm(self, model: LoadedModel) -> None:
        """Run each warm-up batch through each forward that will run it (the first call
        may tune, compile or capture), then once more, timed: that second pass of the
        masked forward (the slower) is the measured throughput (`batch_seconds`)."""
        name = model.descriptor.name
        batches = self.warm_batches(model)
        if model.backend == "compile":
            # one compiled code object serves every model: count all their graphs
            graphs = sum((h, w) in model.full_shapes for _, h, w in batches)
            _allow_recompiles(graphs * len(self.settings.models))
        for batch, h, w in batches:
            shape = (batch, 3, h, w)
            valid = torch.tensor([[h, w]] * batch, device=self.device)
            paths = [False, True] if (h, w) in model.full_shapes else [False]
            for full in paths:
                first = time.perf_counter()
                try:
                    self._prepare_shape(model, shape, valid, full=full)
                except DeviceOutOfMemory:  # requests will split such a batch: nothing to warm
                    log.warning("warm-up: a batch of %s does not fit the device; skipped", shape)
                    break
                if full and model.backend == "compile":
                    log.info(
                        "compiled %s for %s in %.1fs",
                        name,
                        shape,
                        time.perf_counter() - first,
                    )
            if shape not in model.warm_shapes:
                continue
            started = time.perf_counter()
            self._forward(model, torch.rand(shape, device=self.device), valid, full=False)
            self._synchronise()
            seconds = time.perf_counter() - started
            self.batch_seconds.setdefault((name, h, w), {})[batch] = seconds
        if model.backend == "compile":
            self._save_compile_cache()

    def choose_batch_limits(self, model: LoadedModel) -> None:
        """Time the batch sizes the batcher may form and keep, per crop shape, the largest
        worth forming (`planner.batch_limit` of the time per crop by batch size). With
        buckets the warm-up timed every (shape, batch size) already. Without, crops of
        MEASURE_SIDE (inner) run at 1, 2, 4, ... up to `max_batch_size`: each size is
        timed beside the size below it, MEASURE_ROUNDS pairs, and the median of their
        ratios of time per crop counts (a busy host slows both of a pair alike); the
        growth stops at the first size slower per crop than a smaller one, or that does
        not fit the device."""
        name = model.descriptor.name
        relative: dict[int, float] = {}  # without buckets: see below
        if self.planner.buckets:
            for (owner, h, w), seconds in self.batch_seconds.items():
                if owner == name and (h, w) not in model.frame_shapes:
                    model.batch_limits[h, w] = batch_limit(seconds)
        else:
            multiple = model.descriptor.size_multiple
            side = min(MEASURE_SIDE, math.isqrt(self.settings.tile_max_pixels)) // 4 * 4
            side *= multiple
            sizes = padded_batch_sizes(self.settings.max_batch_size)
            # a batch's time relative to one batch of the smallest size
            relative[sizes[0]] = 1.0
            seconds = self.batch_seconds.setdefault((name, side, side), {})
            for smaller, size in itertools.pairwise(sizes):
                ratios = []  # time per crop at `size` over that at `smaller`
                try:
                    for round_ in range(MEASURE_ROUNDS + 1):  # the first pair untimed
                        small = self._time_batch(model, (smaller, 3, side, side))
                        large = self._time_batch(model, (size, 3, side, side))
                        if round_:
                            ratios.append(large / size / (small / smaller))
                            seconds[smaller] = min(small, seconds.get(smaller, small))
                            seconds[size] = min(large, seconds.get(size, large))
                except DeviceOutOfMemory:  # a batch that does not fit is not worth forming
                    log.warning("warm-up: a batch of %d %dx%d crops does not fit", size, side, side)
                    break
                relative[size] = relative[smaller] / smaller * size * statistics.median(ratios)
                if batch_limit(relative) < size:
                    break
            model.batch_limits[side, side] = batch_limit(relative)
        for (h, w), limit in sorted(model.batch_limits.items()):
            timed = relative or self.batch_seconds[name, h, w]
            one = timed[min(timed)] / min(timed)
            log.info(
                "model %s: batches of at most %d crops of %dx%d (time per crop by batch "
                "size, relative to the smallest: %s)",
                name,
                limit,
                h,
                w,
                ", ".join(f"{b}: {t / b / one:.2f}" for b, t in sorted(timed.items())),
            )

    def _time_batch(self, model: LoadedModel, shape: tuple[int, int, int, int]) -> float:
        """Seconds of one forward of random crops of `shape`."""
        crops = torch.rand(shape, device=self.device)
        valid = torch.tensor([list(shape[2:])] * shape[0], device=self.device)
        started = self.clock()
        self._forward(model, crops, valid, full=False)
        self._synchronise()
        return self.clock() - started

    def warm_timings(self, name: str) -> list[tuple[int, int, int, float]]:
        """(batch, h, w, seconds) of each batch of model `name` the warm-up timed."""
        return [
            (batch, h, w, seconds)
            for (model, h, w), by_batch in self.batch_seconds.items()
            if model == name
            for batch, seconds in by_batch.items()
        ]

    def _prepare_shape(
        self, model: LoadedModel, shape: tuple[int, ...], valid: torch.Tensor, *, full: bool
    ) -> None:
        """Run one forward path at `shape` (tuning, compiling), capture its graph where it
        has one, and mark the shape warmed for that path."""
        self._forward(model, torch.rand(shape, device=self.device), valid, full=full, warm=True)
        graphed = model.forward if full else model.masked
        if isinstance(graphed, GraphedForward):
            with torch.inference_mode():
                crops = torch.rand(shape, device=self.device, dtype=model.descriptor.dtype)
                if full:
                    graphed.capture(crops)
                else:
                    graphed.capture(crops, valid)
        (model.warm_full if full else model.warm_shapes).add(shape)

    # Batches (on the device thread)

    def busy_since(self) -> float | None:
        """time.monotonic() at which the device call in flight started; None when idle."""
        return self._busy_since

    def run_batch(self, key: Key, slices: list[Slice]) -> BatchOutcome:
        """Concatenate the slices' crops, run them as warmed batch sizes (split or padded,
        whichever the warm-up timed cheaper), each through the plain network when all its
        crops fill their shape, and hand each request its outputs (quantised, on the
        device)."""
        self._busy_since = time.monotonic()
        try:
            model = self.models[key[0]]
            jobs = [cast(Job, s.ticket.payload) for s in slices]
            pieces = [(j, s.start, s.stop) for j, s in zip(jobs, slices, strict=True)]
            if len(pieces) == 1:  # one request's crops (a frame): no copy of them
                j, a, z = pieces[0]
                x, valid = j.crops[a:z], j.valid[a:z]
            else:
                x = torch.cat([j.crops[a:z] for j, a, z in pieces])
                valid = torch.cat([j.valid[a:z] for j, a, z in pieces])
            fills = [j.full for j, a, z in pieces for _ in range(a, z)]
            n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
            self.shapes_run.setdefault(model.descriptor.name, set()).add((h, w))
            reset_peak_memory(self.device)
            started = time.perf_counter()
            outputs, start = [], 0
            for size in self._batch_sizes(model, h, w, n):
                stop = min(start + size, n)
                outputs.append(
                    self._forward_padded(
                        model, x[start:stop], valid[start:stop], size, all(fills[start:stop])
                    )
                )
                start = stop
            y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            # the batch quantised once per output form; in place when it has only one
            wanted = {(job.grey, job.bits) for job in jobs}
            with torch.inference_mode():  # as the forward made y
                forms = {
                    (grey, bits): pixels.quantise(
                        y, grey=grey, bits=bits, overwrite=len(wanted) == 1
                    )
                    for grey, bits in wanted
                }
                offset = 0
                for j, a, z in pieces:
                    j.paste(a, forms[j.grey, j.bits][offset : offset + z - a])
                    offset += z - a
            self._synchronise()
            seconds = time.perf_counter() - started
            peak = peak_memory_bytes(self.device)
            self.metrics.observe_batch(model.descriptor.name, n, seconds, peak, self.device.type)
            return BatchOutcome(seconds, peak)
        finally:
            self._busy_since = None

    def batch_limit(self, key: Key) -> int:
        """The most crops of `key` one batch should hold (the batcher's limit): a frame
        fills the device and only batch size 1 is warmed, so frames run one to a batch
        (several would hold each request until the others' frames are done); a shape
        warm-up measured, its measured limit; any other shape of a measured model the
        model's smallest (without buckets one shape stands for all); else
        `max_batch_size`."""
        name, h, w = key
        model = self.models.get(name)
        if model is None:
            return self.settings.max_batch_size
        if (h, w) in model.frame_shapes:
            return 1
        limits = model.batch_limits
        if (h, w) in limits:
            return limits[h, w]
        return min(limits.values(), default=self.settings.max_batch_size)

    def _batch_sizes(self, model: LoadedModel, h: int, w: int, n: int) -> list[int]:
        """The batches `n` crops of shape (h, w) run as, in order; their sizes add up to
        `n` or more (the last one padded). Without buckets one batch of `n`; a frame one
        crop at a time (`batch_limit`); else the warmed batch sizes of least total time by
        the warm-up's timings (`batch_split`), or, without timings, the smallest warmed
        size that holds them all."""
        if self.batch_limit((model.descriptor.name, h, w)) == 1:
            return [1] * n
        if not self.planner.batch_sizes:
            return [n]
        seconds = self.batch_seconds.get((model.descriptor.name, h, w))
        if not seconds:
            return [padded_batch(n, self.planner.batch_sizes)]
        return batch_split(n, seconds)

    def _forward_padded(
        self, model: LoadedModel, crops: torch.Tensor, valid: torch.Tensor, size: int, full: bool
    ) -> torch.Tensor:
        """The crops' outputs, run as a batch of `size`: padded with blank crops, which
        count as wholly valid (no empty statistics in the masked forward)."""
        count = crops.shape[0]
        if size > count:
            crops = torch.cat([crops, crops.new_zeros((size - count, *crops.shape[1:]))])
            valid = torch.cat([valid, valid[:1].expand(size - count, 2)])
        return self._forward_splitting(model, crops, valid, full)[:count]

    def _synchronise(self) -> None:
        """Wait for this thread's stream (the batch and its pastes), not for the request
        threads' side streams (models.runtime.device.side_stream) beside it."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _forward_splitting(
        self, model: LoadedModel, crops: torch.Tensor, valid: torch.Tensor, full: bool
    ) -> torch.Tensor:
        """Forward a batch; when the device runs out of memory, retry smaller.

        A batch is split in halves; a single crop that still does not fit is cut
        into a grid of smaller overlapping crops of its valid region (the ACS
        generalisation) and stitched back, so the client still gets its full image.
        """
        try:
            return self._forward(model, crops, valid, full=full)
        except DeviceOutOfMemory:
            n, _, h, w = crops.shape
            self.metrics.count_error("device_oom_retry")
            if n > 1:
                log.warning("out of memory on a batch of %d %dx%d crops: halving", n, h, w)
                half = n // 2
                return torch.cat(
                    [
                        self._forward_splitting(model, crops[:half], valid[:half], full),
                        self._forward_splitting(model, crops[half:], valid[half:], full),
                    ]
                )
            vh, vw = (int(v) for v in valid[0])
            smallest = (2 * self.settings.tile_padding + 4 * model.descriptor.size_multiple) ** 2
            if vh * vw // 2 < smallest:
                raise
            log.warning("out of memory on one %dx%d crop: tiling it", vh, vw)
            plan = acs.grid_plan(
                vh,
                vw,
                max_crop_pixels=vh * vw // 2,
                padding=self.settings.tile_padding,
                multiple=model.descriptor.size_multiple,
            )
            pieces = acs.extract(crops[:, :, :vh, :vw], plan)
            full_piece = torch.tensor([[plan.crop_h, plan.crop_w]], device=crops.device)
            outputs = torch.cat(
                [
                    self._forward_splitting(model, pieces[i : i + 1], full_piece, True)
                    for i in range(len(pieces))
                ]
            )
            s = model.descriptor.scale
            stitched = acs.stitch(outputs, plan, scale=s)
            return F.pad(stitched, (0, (w - vw) * s, 0, (h - vh) * s))

    def _forward(
        self,
        model: LoadedModel,
        crops: torch.Tensor,
        valid: torch.Tensor,
        *,
        full: bool,
        warm: bool = False,
    ) -> torch.Tensor:
        """The network's clamped output in its dtype, on the device. Without buckets the
        backend's plain forward; with them, for a shape warmed (or while warming) the plain
        forward when every crop fills it (`full`) and the masked forward otherwise, and
        the masked forward, not graphed, for any other shape."""
        budget = self.settings.device_memory_budget_bytes
        if budget and activation_bytes(model, crops.shape) > budget:
            raise DeviceOutOfMemory(
                f"a batch of {tuple(crops.shape)} needs ~{activation_bytes(model, crops.shape)} "
                f"bytes; the budget is {budget}"
            )
        x = crops.to(self.device, dtype=model.descriptor.dtype)
        shape = tuple(crops.shape)
        try:
            with torch.inference_mode():
                if model.masked is None or model.masked_eager is None:
                    y: torch.Tensor = model.forward(x)
                elif full and (warm or shape in model.warm_full):
                    y = model.forward(x)
                elif warm or shape in model.warm_shapes:
                    y = model.masked(x, valid)
                else:
                    y = model.masked_eager(x, valid)
                return y.clamp_(0, 1)
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory(str(exc)) from exc

    # torch.compile's caches

    def _load_compile_cache(self) -> None:
        """Point inductor's on-disk cache at the configured folder and load the Mega-Cache
        saved by an earlier run, so a restart skips compiling the same shapes. A cache
        never stops the service: one it cannot read is compiled afresh and rewritten."""
        folder = self.settings.compile_cache_dir
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
        saved = folder / MEGACACHE_FILE
        if not saved.is_file():
            return
        started = time.perf_counter()
        try:
            # None (with PyTorch's own warning) for bytes it cannot read back
            loaded = torch.compiler.load_cache_artifacts(saved.read_bytes())
        except OSError as exc:
            loaded, why = None, str(exc)
        else:
            why = "damaged, or saved by another PyTorch"
        if loaded is None:
            log.warning(
                "compile cache %s not loaded (%s): compiling afresh; warm-up rewrites it",
                saved,
                why,
            )
        else:
            log.info("loaded compile cache %s in %.1fs", saved, time.perf_counter() - started)

    def _save_compile_cache(self) -> None:
        """Write the Mega-Cache whole or not at all (a temporary file renamed over the old
        one): a process killed while writing, or pods sharing the volume, leave either
        cache complete. A folder that cannot be written costs the next start its compile
        time, not this start its service."""
        folder = self.settings.compile_cache_dir
        if folder is None:
            return
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        artifacts, _ = saved
        target = folder / MEGACACHE_FILE
        partial = folder / f".{MEGACACHE_FILE}.{os.getpid()}.partial"
        try:
            partial.write_bytes(artifacts)
            os.replace(partial, target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            log.warning("compile cache %s not saved: %s", target, exc)
            return
        log.info("saved compile cache %s (%d bytes)", target, len(artifacts))


def _allow_recompiles(graphs: int) -> None:
    """Let dynamo keep one graph per warmed (shape, batch size) of a module (its default
    limit, 8, would send later shapes back to eager silently)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(int(getattr(config, name)), graphs + 8))
