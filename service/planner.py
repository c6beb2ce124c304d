"""How a request's image becomes crops: which model, whole/ACS/tiles, and shape buckets.

Without buckets (the CPU default) a plan is the paper's: the whole image when it fits
the pixel budget and the network's size rule, the four-crop ACS for an unaligned image
that fits, a tile grid for anything larger; crops batch only with crops of the very
same shape. That keeps the authors' outputs bit for bit.

With buckets (`IMDN_SHAPE_BUCKETS`, on with CUDA by default), every crop runs at one of
at most four shapes per model, fixed at start: each side is padded up to the short or
the long bucket side (half the tile side, or the tile side). An image that fits in a
tile runs whole, padded; a larger one is cut into crops of exactly the tile side
(`acs.side_grid_plan`). Crops of any request and any image size then share batches,
and warm-up can run every (shape, batch size) pair before `/readyz`, so cuDNN tuning
or compilation never happens on a request. Batches run at a few fixed sizes too
(powers of two up to the largest), as vLLM pads to its captured sizes: padded up to
one, or split into several, whichever the warm-up's timings say costs less
(`batch_split`).
Frame buckets (`IMDN_FRAME_BUCKETS`, none by default) add whole-image shapes for the
frame sizes a deployment serves, at exactly those sizes (rounded up only to the
network's size rule): an image larger than a tile that fits one runs whole, at batch
size 1, instead of as tiles that redo their overlapping context.

Crops that fill their shape need no mask: a tile grid's crops (all exactly the tile
side) and a frame of its bucket's very size. `full_shapes` names those shapes; the
runner runs such batches through the plain network, which is cheaper on a GPU than the
masked forward and is what the compile backend compiles.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from models.networks.checkpoints import REGISTRY
from models.runtime import acs
from service.errors import ScaleNotServed

# the registry's fixed-scale models by their factor, and the one that serves any other
FIXED_SCALES = {s.model.scale: n for n, s in REGISTRY.items() if not s.model.any_scale}
ANY_SCALE = next(n for n, s in REGISTRY.items() if s.model.any_scale)
ACS_PADDING = 32  # the authors' p for the paper's four-crop ACS
BUCKET_GRANULARITY = 16  # bucket sides are multiples of this (and of the size rule)
# how much faster per crop a larger batch must be to be formed: within it a busy host's
# timings cannot tell, and a larger batch costs latency (a request waits for the others'
# crops) and memory for nothing
BATCH_GAIN = 0.05


def model_for_scale(scale: float) -> str:
    """The paper's fixed-scale network for 2, 3 and 4; IMDN_AS for any other scale."""
    fixed = FIXED_SCALES.get(int(scale)) if float(scale).is_integer() else None
    return fixed or ANY_SCALE


def check_served(scale: float, loaded: list[str]) -> str:
    """The model for `scale`, or `ScaleNotServed` when this server does not load it."""
    name = model_for_scale(scale)
    if name not in loaded:
        raise ScaleNotServed(
            f"scale {scale:g} needs model {name!r}, which this server does not load "
            f"(loaded: {', '.join(loaded) or 'none'})"
        )
    return name


@dataclass(frozen=True)
class Plan:
    """The crops of an image, and the shape each crop is padded to on the device."""

    crops: acs.CropPlan
    shape: tuple[int, int]  # (h, w) the crops run at; >= (crop_h, crop_w)

    @property
    def padded(self) -> bool:
        return self.shape != (self.crops.crop_h, self.crops.crop_w)


def padded_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a bucketed device runs: powers of two below `max_batch`, and it."""
    sizes = {1 << i for i in range(max(1, max_batch).bit_length()) if 1 << i < max_batch}
    return tuple(sorted(sizes | {max_batch}))


def padded_batch(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest of `sizes` that holds `n` crops (`n` itself beyond the largest)."""
    return next((s for s in sizes if s >= n), n)


def batch_split(n: int, seconds: Mapping[int, float]) -> list[int]:
    """The batch sizes to run `n` crops in, largest first, the last one padded: the
    split of least time, by the warm-up's `seconds` for each batch size of a shape.

    Padding 5 crops to a batch of 8 computes 3 crops for nothing. Where a batch's time
    grows with its size (large crops on a busy GPU, any CPU) 4 + 1 is cheaper; where a
    batch costs its launches whatever its size (small crops on a fast GPU), one padded
    batch is. The timings are fitted as `launch + size * per_crop` (least squares, one
    noisy timing does not decide), so a split is chosen only when the crops it saves
    cost more than the launches it adds; ties go to fewer batches.
    """
    if n < 1 or not seconds:
        raise ValueError("batch_split needs n >= 1 and some timed batch sizes")
    launch, per_crop = _line_fit(seconds)
    best: list[tuple[float, int, list[int]]] = [(0.0, 0, [])]  # k crops: (time, batches, split)
    for k in range(1, n + 1):
        options = []
        for b in seconds:
            rest_time, rest_batches, rest = best[max(0, k - b)]
            time = round(rest_time + launch + b * per_crop, 12)  # float noise is no saving
            options.append((time, rest_batches + 1, [b, *rest]))
        best.append(min(options))
    return sorted(best[n][2], reverse=True)


def batch_limit(seconds: Mapping[int, float]) -> int:
    """The largest timed batch size worth forming: the smallest is always; each larger one
    while its time per crop is below every smaller size's by BATCH_GAIN at least (the
    timings are of one crop shape, so per crop is per pixel). A size that does not pay
    stops the growth: the CPU's PyTorch batches, ~2x slower per crop than one at a time,
    and OpenVINO's, about as fast, choose 1; a GPU's, faster per crop up to the largest
    size, choose it."""
    if not seconds:
        raise ValueError("batch_limit needs some timed batch sizes")
    sizes = sorted(seconds)
    limit, best = sizes[0], seconds[sizes[0]] / sizes[0]
    for size in sizes[1:]:
        per_crop = seconds[size] / size
        if per_crop > best * (1 - BATCH_GAIN):
            break
        limit, best = size, per_crop
    return limit


def _line_fit(seconds: Mapping[int, float]) -> tuple[float, float]:
    """(intercept, slope) of seconds against batch size by least squares, neither below
    zero; a single timing is all slope."""
    if len(seconds) == 1:
        ((size, time),) = seconds.items()
        return 0.0, max(0.0, time / size)
    slope, intercept = statistics.linear_regression(list(seconds), list(seconds.values()))
    if slope < 0:  # time falling as batches grow is noise: a constant fits best
        return statistics.fmean(seconds.values()), 0.0
    return max(0.0, intercept), slope


class Planner:
    """Plans images for one server's settings; `buckets` fixes the crop shapes."""

    def __init__(
        self,
        *,
        tile_max_pixels: int,
        tile_padding: int,
        buckets: bool,
        max_batch: int,
        frames: tuple[tuple[int, int], ...] = (),
    ) -> None:
        self.tile_max_pixels = tile_max_pixels
        self.tile_padding = tile_padding
        self.buckets = buckets
        self.batch_sizes = padded_batch_sizes(max_batch) if buckets else ()
        self.frames = frames if buckets else ()

    def bucket_sides(self, multiple: int) -> tuple[int, int]:
        """(short, long) bucket sides for a network whose sides are multiples of
        `multiple`: the tile side from the pixel budget (which counts pixels at the
        network's inner resolution, a quarter of each side for IMDN_AS), and half of it."""
        grain = math.lcm(BUCKET_GRANULARITY, multiple)
        inner = max(BUCKET_GRANULARITY, math.isqrt(self.tile_max_pixels))
        long = max(grain, inner * multiple // grain * grain)
        short = max(grain, long // 2 // grain * grain)
        return short, long

    def shapes(self, multiple: int) -> list[tuple[int, int]]:
        """Every crop shape a bucketed model runs (empty without buckets): the tile
        buckets, then the frame buckets."""
        if not self.buckets:
            return []
        sides = sorted(set(self.bucket_sides(multiple)))
        tiles = [(h, w) for h in sides for w in sides]
        return tiles + [f for f in self.frame_shapes(multiple) if f not in tiles]

    def frame_shapes(self, multiple: int) -> list[tuple[int, int]]:
        """The frame buckets for a network of this size rule, each side rounded up to it
        only, so that a frame of the named size fills its bucket (no padding, no mask);
        they run at batch size 1 only (a frame fills the device)."""
        return sorted(
            {(acs.round_up(h, multiple), acs.round_up(w, multiple)) for h, w in self.frames}
        )

    def full_shapes(self, multiple: int) -> list[tuple[int, int]]:
        """The shapes whose crops usually fill them, which the runner warms for the plain
        forward too (empty without buckets): the tile grid's, and the frame buckets."""
        if not self.buckets:
            return []
        _, long = self.bucket_sides(multiple)
        return sorted({(long, long), *self.frame_shapes(multiple)})

    def plan(
        self, height: int, width: int, multiple: int, *, tile_max_pixels: int | None = None
    ) -> Plan:
        """The plan for an image of `height` x `width` (already at least `multiple` on
        each side) for a network whose sides must be multiples of `multiple`;
        `tile_max_pixels` replaces the server's tile budget (a video's frames), without
        shape buckets only (with them, frames whole are the frame buckets' business)."""
        if self.buckets:
            return self._bucketed(height, width, multiple)
        # the budget counts pixels at the network's inner resolution: IMDN_AS works at a
        # quarter of each side, so its crops may be 16x larger for the same memory
        budget = (tile_max_pixels or self.tile_max_pixels) * multiple * multiple
        if height * width <= budget:
            if height % multiple == 0 and width % multiple == 0:
                crops = acs.whole_plan(height, width)
            else:
                crops = acs.acs_plan(height, width, padding=ACS_PADDING, multiple=multiple)
        else:
            crops = acs.grid_plan(
                height, width, max_crop_pixels=budget, padding=self.tile_padding, multiple=multiple
            )
        return Plan(crops, (crops.crop_h, crops.crop_w))

    def _bucketed(self, height: int, width: int, multiple: int) -> Plan:
        short, long = self.bucket_sides(multiple)
        if height > long or width > long:  # tiles, unless a frame bucket holds it whole
            fits = [(h, w) for h, w in self.frame_shapes(multiple) if h >= height and w >= width]
            if fits:  # the smallest frame that holds it
                return Plan(acs.whole_plan(height, width), min(fits, key=lambda f: f[0] * f[1]))
        crops = acs.side_grid_plan(
            height, width, side=long, padding=self.tile_padding, multiple=multiple
        )

        def bucket(side: int) -> int:
            return short if side <= short else long

        return Plan(crops, (bucket(crops.crop_h), bucket(crops.crop_w)))
