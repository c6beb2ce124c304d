"""The paper's benchmark protocol (Table 5), and IMDN_AS on same-size real pairs.

Fixed-scale IMDN (x2, x3, x4): HR cropped to a multiple of s; LR from the given
folder or made by MATLAB bicubic (`quality.imresize`, 1/s, antialiased); the
output rounded to uint8; PSNR and SSIM on BT.601 Y kept as float, s pixels
shaved. IMDN_AS: LR and HR of the same size, the authors' forward (whole image
when both sides are multiples of 4, else the 4-crop ACS), PSNR and SSIM on RGB
with nothing shaved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from tqdm import tqdm

from models.networks.imdn import IMDN
from models.quality.matlab import imresize, modcrop, psnr, rgb_to_y, ssim
from models.runtime.acs import authors_forward

IMAGE_SUFFIXES = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"})
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA"})

Image8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class ImageScore:
    name: str
    psnr: float
    ssim: float
    seconds: float  # the network's forward (ACS included) for this image


@dataclass
class EvalReport:
    dataset: str
    scale: int  # the network's factor; 1 for IMDN_AS on same-size pairs
    protocol: str
    rows: list[ImageScore] = field(default_factory=list)

    @property
    def images(self) -> int:
        return len(self.rows)

    @property
    def psnr(self) -> float:
        return float(np.mean([r.psnr for r in self.rows]))

    @property
    def ssim(self) -> float:
        return float(np.mean([r.ssim for r in self.rows]))

    @property
    def seconds_per_image(self) -> float:
        return float(np.mean([r.seconds for r in self.rows]))

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "scale": self.scale,
            "protocol": self.protocol,
            "images": self.images,
            "psnr": self.psnr,
            "ssim": self.ssim,
            "seconds_per_image": self.seconds_per_image,
            "rows": [asdict(r) for r in self.rows],
        }


def read_rgb(path: Path) -> Image8:
    """An 8-bit image file as HxWx3 uint8 RGB (greyscale replicated, alpha dropped)."""
    with Image.open(path) as img:
        if img.mode not in _EIGHT_BIT_MODES:
            raise ValueError(f"{path}: pixel mode {img.mode} is not 8-bit; benchmarks are 8-bit")
        return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy


def dataset_name(folder: Path) -> str:
    """`Set5/HR` (or `RealSR/GT`) is 'Set5'; any other folder is its own name."""
    named_by_parent = folder.name.upper() in {"HR", "GT"} and folder.parent.name
    return folder.parent.name if named_by_parent else folder.name


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder, sorted; an error if there are none or two share a stem."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise FileNotFoundError(f"no images in {folder}")
    stems = [p.stem for p in found]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise ValueError(f"{folder}: several files share the stems {twice[:5]}")
    return found


def match_lr(hr: Path, lr_files: Sequence[Path], scale: int) -> Path:
    """The LR file of an HR file: same stem, or stem + 'x<s>' (Set5's `babyx2.bmp`)."""
    stems = {hr.stem, f"{hr.stem}x{scale}"}
    matches = [p for p in lr_files if p.stem in stems]
    if len(matches) != 1:
        what = "no" if not matches else str(len(matches))
        where = lr_files[0].parent if lr_files else "the LR folder"
        raise FileNotFoundError(
            f"{what} LR file for {hr.name} (looked for stems {sorted(stems)}) in {where}"
        )
    return matches[0]


def _forward(model: IMDN, lr: Image8, device: torch.device) -> tuple[Image8, float]:
    """Run the network on one uint8 image: (uint8 output, seconds of forward).

    Output rounded as the authors' `tensor2np` does: clamp to [0, 1], x255, round.
    """
    dtype = next(model.parameters()).dtype
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].to(device=device, dtype=dtype) / 255.0
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = authors_forward(model, x) if model.scale == 1 else model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        image = (out[0].float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return image.permute(1, 2, 0).cpu().numpy(), seconds


def _pairs(
    hr_paths: list[Path], lr_dir: Path | None, scale: int, round_each_pass: bool
) -> Iterator[tuple[str, Image8, Image8]]:
    """(name, HR, LR) per HR file, read one at a time: HR cropped to a multiple of `scale`."""
    lr_files = list_images(lr_dir) if lr_dir is not None else []
    for hr_path in hr_paths:
        hr = modcrop(read_rgb(hr_path), scale)
        if lr_dir is None:
            lr = imresize(hr, scale=1.0 / scale, round_each_pass=round_each_pass)
        else:
            lr = read_rgb(match_lr(hr_path, lr_files, scale))
        expected = (hr.shape[0] // scale, hr.shape[1] // scale)
        if lr.shape[:2] != expected:
            raise ValueError(
                f"{hr_path.name}: LR is {lr.shape[1]}x{lr.shape[0]}, expected "
                f"{expected[1]}x{expected[0]} (HR {hr.shape[1]}x{hr.shape[0]} / {scale})"
            )
        yield hr_path.stem, hr, lr


def _score(sr: Image8, hr: Image8, scale: int) -> tuple[float, float]:
    """Fixed scale: Y as float, `scale` pixels shaved. Same-size: RGB, nothing shaved."""
    if scale == 1:
        return psnr(sr, hr), ssim(sr, hr)
    y_sr, y_hr = rgb_to_y(sr), rgb_to_y(hr)
    return psnr(y_sr, y_hr, border=scale), ssim(y_sr, y_hr, border=scale)


def evaluate(
    model: IMDN,
    hr_dir: Path,
    *,
    lr_dir: Path | None,
    scale: int | None,
    progress: bool = False,
    on_image: Callable[[ImageScore], None] | None = None,
    device: torch.device | str = "cpu",
    lr_round_each_pass: bool = True,
) -> EvalReport:
    """Score `model` on the images of `hr_dir` with the paper's protocol.

    `scale` is None or the network's own factor (1 for IMDN_AS, which needs
    `lr_dir` with same-size pairs); anything else is refused rather than guessed.
    The model runs in eval mode on `device` (moved there if needed) in its own dtype.
    `lr_round_each_pass` is passed to `imresize` when LR images are made here:
    True is MATLAB's own rounding (the paper's Table 5 to its last digit), False
    the round-once Python port behind the README's Set14 reference figures.
    """
    net_scale = model.scale
    if scale is not None and scale != net_scale:
        raise ValueError(f"scale {scale} does not match the network's factor {net_scale}")
    if net_scale == 1 and lr_dir is None:
        raise ValueError("IMDN_AS is scored on same-size (LR, HR) pairs: give lr_dir")
    dev = torch.device(device)
    protocol = (
        "RGB, no shave; whole image, or ACS when a side is not a multiple of 4"
        if net_scale == 1
        else f"Y (BT.601, float), shave {net_scale}"
    )
    dataset = dataset_name(hr_dir)
    report = EvalReport(dataset=dataset, scale=net_scale, protocol=protocol)
    was_training = model.training
    model.eval().to(dev)
    try:
        hr_paths = list_images(hr_dir)
        pairs = _pairs(hr_paths, lr_dir, net_scale, lr_round_each_pass)
        bar = tqdm(
            pairs,
            total=len(hr_paths),
            desc=f"{dataset} x{net_scale}",
            unit="img",
            disable=not progress,
        )
        for name, hr, lr in bar:
            sr, seconds = _forward(model, lr, dev)
            if sr.shape != hr.shape:
                raise ValueError(f"{name}: output {sr.shape} does not match HR {hr.shape}")
            p, s = _score(sr, hr, net_scale)
            row = ImageScore(name=name, psnr=p, ssim=s, seconds=seconds)
            report.rows.append(row)
            if progress:
                tqdm.write(f"{name:<14} PSNR {p:7.3f} dB  SSIM {s:.4f}  {seconds:6.2f} s")
                bar.set_postfix(psnr=f"{report.psnr:.3f}", ssim=f"{report.ssim:.4f}")
            if on_image is not None:
                on_image(row)
    finally:
        model.train(was_training)
    return report
