"""Hostile and odd inputs over real HTTP, built in code: each gets its documented status
(docs/images.md), the valid odd ones a correct image, and the server keeps
serving. Cases already in tests/test_service.py (empty, garbage, truncated PNG, text type,
GIF bytes, multipart without the field, scale as text/NaN/negative/0/1/1e9) are not repeated.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.live import live_server
from tests.load import png_bytes, png_size


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares width×height (8-bit RGB), with the given IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def bomb_png(side: int) -> bytes:
    """side×side black RGB pixels: a few hundred KB that decode to side²·3 bytes."""
    raw = (b"\0" + b"\0" * (3 * side)) * side
    return png_declaring(side, side, zlib.compress(raw, 9))


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def lr(datasets_dir: Path) -> np.ndarray:
    return np.asarray(
        Image.open(datasets_dir / "Set5" / "LR_bicubic" / "x4" / "babyx4.bmp").convert("RGB")
    )[:24, :32]


@pytest.fixture(scope="module")
def client(weights_dir: Path) -> Iterator[httpx.Client]:
    with (
        live_server(Settings(weights_dir=weights_dir, models=["x2"])) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        yield c


def _refused(lr: np.ndarray) -> list[tuple[str, bytes, str, int, str]]:
    rgb = Image.fromarray(lr)
    jpeg = encoded(rgb, "JPEG", quality=90)
    frames = [Image.fromarray(np.roll(lr, k, axis=1)) for k in range(3)]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    webp = encoded(
        frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True
    )
    # over twice Pillow's MAX_IMAGE_PIXELS, Pillow refuses at open: 413 decompression_bomb
    return [
        ("truncated JPEG", jpeg[: len(jpeg) // 2], "image/jpeg", 400, "undecodable"),
        ("JPEG of only its header", jpeg[:300], "image/jpeg", 400, "undecodable"),
        (
            "PNG declaring 100000x100000",
            png_declaring(100_000, 100_000),
            "image/png",
            413,
            "decompression_bomb",
        ),
        ("PNG declaring 0x0", png_declaring(0, 0), "image/png", 400, "undecodable"),
        ("decompression bomb, 6000x6000", bomb_png(6000), "image/png", 413, "too_many_pixels"),
        ("animated GIF", gif, "image/gif", 415, "unsupported_type"),
        ("animated GIF sent as PNG", gif, "image/png", 415, "unsupported_type"),
        ("animated WebP", webp, "image/webp", 415, "animated"),
        (
            "PNG sent as application/json",
            png_bytes(lr),
            "application/json",
            415,
            "unsupported_type",
        ),
    ]


def test_hostile_bodies_get_their_documented_status(client: httpx.Client, lr: np.ndarray) -> None:
    for what, body, content_type, status, reason in _refused(lr):
        r = client.post(
            "/v1/superres?scale=2", content=body, headers={"Content-Type": content_type}
        )
        assert r.status_code == status, f"{what}: {r.status_code} {r.text}"
        assert r.headers["content-type"] == "application/problem+json", what
        assert r.json()["reason"] == reason, f"{what}: {r.json()}"
    assert client.get("/healthz").status_code == 200
    ok = client.post("/v1/superres?scale=2", content=png_bytes(lr))
    assert ok.status_code == 200 and png_size(ok.content) == (64, 48)


@pytest.mark.parametrize("scale", ["inf", "-inf", "1e309", "", "2,5", "0x2", "nan%00"])
def test_more_bad_scales_are_422(client: httpx.Client, lr: np.ndarray, scale: str) -> None:
    r = client.post(f"/v1/superres?scale={scale}", content=png_bytes(lr))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"


def test_odd_but_valid_images_are_served(client: httpx.Client, lr: np.ndarray) -> None:
    """CMYK JPEG, 16-bit and palette PNGs, a JPEG with a near-64 KB EXIF: all served at the
    right size; 16-bit stays 16-bit, colour stays colour."""
    rgb = Image.fromarray(lr)
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: a near-maximal APP1 segment
    wide = (lr.astype(np.uint16) * 257).astype(">u2").tobytes()
    ihdr16 = struct.pack(">IIBBBBB", 32, 24, 16, 2, 0, 0, 0)
    rows16 = b"".join(b"\0" + wide[i * 32 * 6 : (i + 1) * 32 * 6] for i in range(24))
    png16 = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr16)
        + _chunk(b"IDAT", zlib.compress(rows16))
        + _chunk(b"IEND", b"")
    )
    cases = [
        ("CMYK JPEG", encoded(rgb.convert("CMYK"), "JPEG", quality=95), "RGB", 8),
        ("16-bit RGB PNG", png16, "RGB", 16),
        ("palette PNG", png_bytes(rgb.quantize(64)), "RGB", 8),
        ("JPEG with a 60 KB EXIF", encoded(rgb, "JPEG", exif=exif.tobytes()), "RGB", 8),
    ]
    for what, body, mode, depth in cases:
        r = client.post("/v1/superres?scale=2", content=body)
        assert r.status_code == 200, f"{what}: {r.text}"
        assert png_size(r.content) == (64, 48), what
        assert r.content[24] == depth, what  # IHDR bit depth
        out = Image.open(io.BytesIO(r.content))
        assert out.mode.startswith(mode) or (depth == 16 and out.mode in ("RGB", "I;16")), what
        assert r.content[25] in (2, 6), f"{what}: colour type {r.content[25]}"  # RGB(A)
