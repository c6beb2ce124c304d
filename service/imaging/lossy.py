"""JPEG and WebP output, written whole by Pillow (8 bits; JPEG never with alpha)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.imaging.png import pixel_array

# --------------------------------------------------------------------------- JPEG and WebP

LOSSY_FORMATS = ("JPEG", "WEBP")
"""Pillow names of the other output formats `encode_lossy` writes."""
LOSSLESS_WEBP_QUALITY = 100
"""WebP at this quality is written lossless: the exact 8-bit pixels, alpha included."""
WEBP_METHOD = 2
"""libwebp's effort for lossy WebP (0..6; Pillow's default is 4): measured on a 1024²
photo at quality 90, 2 takes half the time of 4 for 1.3 % more bytes."""
WEBP_LOSSLESS_EFFORT = 0
"""Effort (Pillow's `quality` and `method` when lossless) for lossless WebP: the fastest,
measured on a 1024² photo at 0.65× the time of our level-1 PNG and 0.85× its size."""
JPEG_FULL_CHROMA_QUALITY = 90
"""JPEG at this quality and above keeps full-resolution colour (4:4:4); below, 4:2:0."""


def encode_lossy(
    image: np.ndarray, fmt: str, *, quality: int, icc_profile: bytes | None = None
) -> bytes:
    """The whole JPEG or WebP file (Pillow writes these at once, so they are not streamed).

    `image` is `compose`'s output. 16-bit samples are rounded to 8 bits, as both formats
    hold 8. Grey stays grey in JPEG; WebP has no grey, so it gets three equal planes and
    a grey ICC profile is dropped (it cannot describe RGB). JPEG has no alpha: an image
    with alpha raises ValueError (the HTTP layer never asks). WebP at quality 100 is
    lossless (`LOSSLESS_WEBP_QUALITY`), keeping even the colour under transparent pixels.
    """
    if fmt not in LOSSY_FORMATS:
        raise ValueError(f"format must be one of {LOSSY_FORMATS}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1..100, got {quality}")
    pixels = pixel_array(image)
    if pixels.dtype == np.uint16:  # round to nearest: v·255/65535
        wide = pixels.astype(np.uint32) * 255 + 32767
        pixels = (wide // 65535).astype(np.uint8)
    grey, alpha = pixels.shape[2] in (1, 2), pixels.shape[2] in (2, 4)
    if fmt == "JPEG" and alpha:
        raise ValueError("JPEG cannot carry alpha; encode this image as PNG or WebP")
    im = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    options: dict[str, object] = {"quality": quality}
    if fmt == "JPEG":  # no Huffman optimisation: 2.5× the time for 4 % fewer bytes
        full_chroma = quality >= JPEG_FULL_CHROMA_QUALITY
        options["subsampling"] = 0 if full_chroma else 2
    else:
        if grey:
            im = im.convert("RGBA" if alpha else "RGB")
            icc_profile = None
        if quality >= LOSSLESS_WEBP_QUALITY:
            effort = WEBP_LOSSLESS_EFFORT
            options.update(lossless=True, exact=True, quality=effort, method=effort)
        else:
            options["method"] = WEBP_METHOD
    if icc_profile:
        options["icc_profile"] = icc_profile
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()
