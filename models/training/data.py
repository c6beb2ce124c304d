"""Training pairs for IMDN: LR/HR arrays cached once, and reproducible random patches.

LR images are made once with our MATLAB-compatible bicubic (`quality.imresize`,
antialiased, 1/s) or read once from an LR folder, and stored with their HR
images as `.npy` files in a cache folder. Data-loader workers memory-map them,
so a patch costs a slice, never a PNG decode or a resize, and the page cache
keeps the data set in memory across epochs and runs.

The patch for global sample number k is a pure function of (seed, k): a run
sees the same batches whatever the number of workers, and a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from models.networks.checkpoints import atomic_write
from models.quality.evaluate import list_images, match_lr, read_rgb
from models.quality.matlab import imresize, modcrop

CACHE_VERSION = 1  # bump when the way cached arrays are made changes

Image8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class CachedImage:
    """One training image: its HR array and one LR array per degradation, as `.npy` files.

    A fixed-scale network has one LR (HR / s); IMDN_AS trained on synthetic
    pairs has one same-size degraded image per training factor.
    """

    name: str
    hr: Path
    lr: tuple[Path, ...]


def bicubic_lr(hr: Image8, scale: int) -> Image8:
    """The paper's LR: MATLAB `imresize(hr, 1/s, 'bicubic')`, antialiased, uint8."""
    return imresize(hr, scale=1.0 / scale)


def bicubic_same_size(hr: Image8, factor: int) -> Image8:
    """IMDN_AS input: HR shrunk by `factor` and bicubic-enlarged back to HR's size."""
    small = imresize(hr, scale=1.0 / factor)
    return imresize(small, size=(hr.shape[0], hr.shape[1]))


def _source_key(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _cache_path(cache_dir: Path, stem: str, role: str, key: list[Any]) -> Path:
    """A name that changes when the source file or the recipe changes, so stale files are unused."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, role, *key]).encode()).hexdigest()[:16]
    return cache_dir / f"{stem}.{role}.{digest}.npy"


def _save_npy(path: Path, array: Image8) -> None:
    """A reader never sees half an array: written through a temporary file and renamed."""
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array)))


def _cache_one(
    hr_path: Path,
    *,
    scale: int,
    cache_dir: Path,
    lr_files: Sequence[Path] | None,
    as_factors: Sequence[int],
) -> CachedImage:
    """Cache one image's HR and LR arrays (only the missing ones are computed)."""
    stem = hr_path.stem
    hr_key = _source_key(hr_path)
    if scale > 1:
        multiple = scale
    elif lr_files is None:
        multiple = math.lcm(*as_factors)
    else:
        multiple = 1
    hr_file = _cache_path(cache_dir, stem, f"hr-m{multiple}", hr_key)
    lr_path = None if lr_files is None else match_lr(hr_path, lr_files, scale)
    if lr_path is not None:
        lr_targets = [(_cache_path(cache_dir, stem, f"lr-file-x{scale}", _source_key(lr_path)), 0)]
    elif scale > 1:
        lr_targets = [(_cache_path(cache_dir, stem, f"lr-bicubic-x{scale}", hr_key), scale)]
    else:
        lr_targets = [(_cache_path(cache_dir, stem, f"lr-as-x{f}", hr_key), f) for f in as_factors]
    if hr_file.is_file() and all(p.is_file() for p, _ in lr_targets):
        return CachedImage(stem, hr_file, tuple(p for p, _ in lr_targets))

    hr = modcrop(read_rgb(hr_path), multiple)
    expected = (hr.shape[0] // scale, hr.shape[1] // scale)
    for target, factor in lr_targets:
        if target.is_file():
            continue
        if lr_path is not None:
            lr = read_rgb(lr_path)
            if lr.shape[:2] != expected:
                raise ValueError(
                    f"{lr_path.name}: LR is {lr.shape[1]}x{lr.shape[0]}, expected "
                    f"{expected[1]}x{expected[0]} (HR {hr_path.name} "
                    f"{hr.shape[1]}x{hr.shape[0]} / {scale})"
                )
        elif scale > 1:
            lr = bicubic_lr(hr, scale)
        else:
            lr = bicubic_same_size(hr, factor)
        _save_npy(target, lr)
    if not hr_file.is_file():
        _save_npy(hr_file, hr)
    return CachedImage(stem, hr_file, tuple(p for p, _ in lr_targets))


def build_cache(
    hr_dir: Path,
    *,
    scale: int,
    cache_dir: Path,
    lr_dir: Path | None = None,
    as_factors: Sequence[int] = (2, 3, 4),
    workers: int = 0,
    progress: bool = False,
) -> list[CachedImage]:
    """Cache every image of `hr_dir` for training at network factor `scale`.

    `scale` >= 2: HR cropped to a multiple of s; LR from `lr_dir` (same stem or
    stem + 'x<s>') or made by MATLAB bicubic. `scale` 1 (IMDN_AS): same-size
    pairs from `lr_dir`, or, without it, one bicubic down-and-up copy of HR per
    factor in `as_factors`. Work is spread over `workers` threads.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if scale == 1 and lr_dir is None and (not as_factors or min(as_factors) < 2):
        raise ValueError(f"IMDN_AS training factors must be integers >= 2, got {list(as_factors)}")
    hr_files = list_images(hr_dir)
    lr_files = list_images(lr_dir) if lr_dir is not None else None
    cache_dir.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> CachedImage:
        return _cache_one(
            path, scale=scale, cache_dir=cache_dir, lr_files=lr_files, as_factors=as_factors
        )

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        cached = list(
            tqdm(
                pool.map(one, hr_files),
                total=len(hr_files),
                desc=f"caching {hr_dir.name} x{scale}",
                unit="img",
                disable=not progress,
            )
        )
    return cached


def _npy_shape(path: Path) -> tuple[int, ...]:
    array = np.load(path, mmap_mode="r")
    shape: tuple[int, ...] = array.shape
    del array
    return shape


def augment(image: Image8, hflip: bool, vflip: bool, transpose: bool) -> Image8:
    """One of the eight flips/90° rotations of an HxWxC patch (the dihedral group)."""
    if hflip:
        image = image[:, ::-1]
    if vflip:
        image = image[::-1]
    if transpose:
        image = image.transpose(1, 0, 2)
    return image


def _to_chw(image: Image8) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class PatchDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Sample k is a random (LR, HR) uint8 CHW patch pair drawn from seed and k alone.

    Each sample picks an image uniformly, a degradation (IMDN_AS), a position,
    and one of the eight flips/rotations. Arrays are memory-mapped lazily in
    each process; only paths and shapes are pickled to workers.
    """

    def __init__(
        self,
        images: Sequence[CachedImage],
        *,
        scale: int,
        patch_size: int,
        seed: int,
        size_multiple: int = 1,
    ) -> None:
        if not images:
            raise ValueError("no training images")
        if patch_size % scale:
            raise ValueError(f"HR patch {patch_size} is not a multiple of the scale {scale}")
        lr_patch = patch_size // scale
        if lr_patch % size_multiple:
            raise ValueError(
                f"LR patch {lr_patch} is not a multiple of {size_multiple} (IMDN_AS needs it)"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.images = tuple(images)
        self.scale = scale
        self.lr_patch = lr_patch
        self.seed = seed
        self.lr_shapes: list[tuple[int, int]] = []
        too_small = []
        for image in self.images:
            hr_shape = _npy_shape(image.hr)
            shapes = {_npy_shape(p)[:2] for p in image.lr}
            if len(shapes) != 1:
                raise ValueError(f"{image.name}: LR arrays differ in size: {sorted(shapes)}")
            h, w = shapes.pop()
            if hr_shape[:2] != (h * scale, w * scale):
                raise ValueError(f"{image.name}: HR {hr_shape[:2]} is not LR {(h, w)} x {scale}")
            if min(h, w) < lr_patch:
                too_small.append(f"{image.name} ({w}x{h})")
            self.lr_shapes.append((h, w))
        if too_small:
            raise ValueError(
                f"LR images smaller than the {lr_patch}x{lr_patch} patch: {', '.join(too_small)}"
            )
        self._arrays: dict[Path, Image8] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # workers map the files themselves; never pickle the data
        return state

    def _array(self, path: Path) -> Image8:
        array = self._arrays.get(path)
        if array is None:
            array = np.load(path, mmap_mode="r")
            self._arrays[path] = array
        return array

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        i = int(rng.integers(len(self.images)))
        image = self.images[i]
        lr_file = image.lr[int(rng.integers(len(image.lr)))]
        h, w = self.lr_shapes[i]
        p, s = self.lr_patch, self.scale
        top = int(rng.integers(h - p + 1))
        left = int(rng.integers(w - p + 1))
        hflip, vflip, transpose = (bool(b) for b in rng.integers(2, size=3))
        lr = self._array(lr_file)[top : top + p, left : left + p]
        hr = self._array(image.hr)[top * s : (top + p) * s, left * s : (left + p) * s]
        return (
            _to_chw(augment(lr, hflip, vflip, transpose)),
            _to_chw(augment(hr, hflip, vflip, transpose)),
        )


class IterationBatches(Sampler[list[int]]):
    """Batch for iteration i (0-based) = sample numbers i*B .. i*B + B-1, for i in [start, stop)."""

    def __init__(self, *, start: int, stop: int, batch_size: int) -> None:
        super().__init__()
        self.start = start
        self.stop = stop
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for i in range(self.start, self.stop):
            yield list(range(i * b, (i + 1) * b))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def make_loader(
    dataset: PatchDataset,
    *,
    start: int,
    stop: int,
    batch_size: int,
    workers: int,
    pin_memory: bool,
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over iterations [start, stop): no epochs, so no per-epoch worker restarts."""
    return DataLoader(
        dataset,
        batch_sampler=IterationBatches(start=start, stop=stop, batch_size=batch_size),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
