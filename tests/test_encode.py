"""Output encoding: the parallel PNG encoder, JPEG and WebP, and the format chosen from Accept.

The PNG checks parse the file chunk by chunk (every CRC), inflate the joined IDAT
payload with zlib (which checks the Adler-32 the banded encoder combines), and decode
the pixels back: Pillow for 8-bit and 16-bit grey, `imaging.decode` (lossless 16-bit)
for 16-bit colour.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageCms

from service import imaging
from service.metrics import Metrics
from service.negotiation import NotAcceptable, choose_format
from service.settings import Settings
from tests.live import live_server


def photo_like(
    height: int, width: int, channels: int, dtype: type = np.uint8, *, noise_levels: int = 16
) -> np.ndarray:
    """Gradients plus noise (of 1/`noise_levels` of the range): compressible like a photo,
    with no two bands alike."""
    top = 65535 if dtype == np.uint16 else 255
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [(x * (c + 1) + y * (3 - c)) / (height + width) / 4 for c in range(channels)]
    base = np.stack(planes, -1) % 1.0 * top * 0.9
    rng = np.random.default_rng([height, width, channels])  # the same image in any order
    noise = rng.integers(0, top // noise_levels, (height, width, channels))
    return (base + noise).clip(0, top).astype(dtype)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk, checking the signature, lengths and CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        assert crc == zlib.crc32(payload, zlib.crc32(kind)), f"bad CRC in {kind!r}"
        chunks.append((kind, payload))
        pos += 12 + length
    assert pos == len(data) and chunks[-1] == (b"IEND", b"")
    return chunks


def inflated(data: bytes) -> bytes:
    """The filtered rows of a PNG: its IDAT payloads joined and inflated (Adler-32 checked)."""
    return zlib.decompress(b"".join(p for kind, p in png_chunks(data) if kind == b"IDAT"))


def pixels_of(data: bytes) -> np.ndarray:
    """HxWxC samples of a PNG: Pillow for 8 bits, `imaging.decode` (lossless) for 16."""
    if png_chunks(data)[0][1][8] == 8:  # IHDR bit depth
        arr = np.asarray(opened(data))
        return arr[..., None] if arr.ndim == 2 else arr
    decoded = imaging.decode(data, "image/png", max_pixels=1 << 26)
    colour = decoded.rgb[..., :1] if decoded.grey else decoded.rgb
    planes = [colour] + ([] if decoded.alpha is None else [decoded.alpha[..., None]])
    return np.rint(np.concatenate(planes, -1) * 65535).astype(np.uint16)


def opened(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def encode(pixels: np.ndarray, **kwargs: object) -> bytes:
    return b"".join(imaging.encode_png(pixels, **kwargs))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parallel PNG


def test_adler32_combine_matches_zlib_on_the_whole() -> None:
    data = (
        np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
        + b"\xff" * 70_000
    )
    for cuts in ([0, 1], [5, 65521], [100_000, 200_000, 369_999], [1000, 1000, 370_000]):
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        combined = zlib.adler32(b"")
        for part in parts:
            combined = imaging.adler32_combine(combined, zlib.adler32(part), len(part))
        assert combined == zlib.adler32(data)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_banded_png_has_the_same_pixels_and_rows_as_one_stream(dtype: type, channels: int) -> None:
    pixels = photo_like(67, 45, channels, dtype)  # odd sizes: the last band is short
    single = encode(pixels)
    rows = inflated(single)
    for threads, band_bytes in ((2, 1), (2, 1000), (3, 4096), (8, 777)):
        banded = encode(pixels, threads=threads, band_bytes=band_bytes)
        # more than one band: deflated on their own; else the one-stream path, unchanged
        assert (banded != single) == (pixels.nbytes > band_bytes)
        assert inflated(banded) == rows
        np.testing.assert_array_equal(pixels_of(banded), pixels)


@pytest.mark.parametrize("shape", [(1, 700, 3), (1, 5, 4), (900, 1, 1), (2, 2, 2)])
def test_banded_png_of_one_row_one_column_and_tiny_images(shape: tuple[int, int, int]) -> None:
    pixels = photo_like(*shape)
    for level in (0, 1, 9):
        banded = encode(pixels, threads=4, band_bytes=3, compress_level=level)
        assert inflated(banded) == inflated(encode(pixels, compress_level=level))
        np.testing.assert_array_equal(pixels_of(banded), pixels)


@pytest.mark.skipif(shutil.which("pngcheck") is None, reason="Debian's pngcheck is not installed")
def test_pngcheck_passes_banded_pngs(tmp_path: Path) -> None:
    """Chunk layout, CRCs and IHDR by an independent checker (it does not check Adler-32:
    `inflated` does)."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for channels in (1, 2, 3, 4):
        for dtype in (np.uint8, np.uint16):
            pixels = photo_like(61, 37, channels, dtype)
            icc = profile if channels >= 3 else None
            path = tmp_path / f"{channels}-{dtype.__name__}.png"
            path.write_bytes(encode(pixels, icc_profile=icc, threads=3, band_bytes=500))
            done = subprocess.run(["pngcheck", str(path)], capture_output=True, text=True)
            assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def test_banded_png_carries_the_icc_profile() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = photo_like(40, 64, 3)
    banded = encode(pixels, icc_profile=profile, threads=2, band_bytes=500)
    with Image.open(io.BytesIO(banded)) as im:
        assert im.info["icc_profile"] == profile
    assert [k for k, _ in png_chunks(banded)][:2] == [b"IHDR", b"iCCP"]


@pytest.fixture
def band_tops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first row of every band the encoder starts, in the order it starts them."""
    started: list[int] = []
    real = imaging.png._deflate_band

    def counted(job: imaging.png._BandJob, top: int, stop: int) -> imaging.png._Band:
        started.append(top)
        return real(job, top, stop)

    monkeypatch.setattr(imaging.png, "_deflate_band", counted)
    return started


def test_banded_png_streams_in_order_with_a_bounded_window(band_tops: list[int]) -> None:
    started = band_tops
    pixels = photo_like(256, 128, 3)  # 384 bytes a row, 8 rows a band: 32 bands
    stream = imaging.encode_png(pixels, threads=2, band_bytes=8 * 384, chunk_bytes=1000)
    head = next(stream)
    assert started == [] and head.startswith(b"\x89PNG")  # the header before any work
    first_idat = next(stream)
    assert first_idat[4:8] == b"IDAT"
    assert 1 <= len(started) <= 4  # 2 threads: at most 4 bands in flight
    rest = list(stream)
    assert sorted(started) == list(range(0, 256, 8))
    data = head + first_idat + b"".join(rest)
    assert all(len(p) <= 1000 for k, p in png_chunks(data) if k == b"IDAT")
    np.testing.assert_array_equal(pixels_of(data), pixels)

    stream = imaging.encode_png(pixels, threads=2, band_bytes=8 * 384)
    next(stream), next(stream)
    stream.close()  # a client that left: no error, the queued bands dropped


def test_bands_grow_with_the_image_to_two_a_thread(band_tops: list[int]) -> None:
    """Each band costs the server time under the GIL: by default a large image is cut into
    BANDS_PER_THREAD bands a thread, never below PNG_BAND_BYTES; the same pixels."""
    tops = band_tops
    pixels = photo_like(1200, 1000, 3)  # 3.6 MB of rows
    for threads, bands in ((2, 2 * imaging.png.BANDS_PER_THREAD), (8, 14)):
        tops.clear()
        data = encode(pixels, threads=threads)
        assert len(tops) == bands, (threads, len(tops))
        np.testing.assert_array_equal(pixels_of(data), pixels)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_isal_and_zlib_write_the_same_rows(level: int) -> None:
    pixels = photo_like(120, 90, 3)
    rows = inflated(encode(pixels, compress_level=level, deflate="zlib"))
    for threads in (1, 3):
        for deflate in ("isal", "auto"):
            data = encode(pixels, compress_level=level, deflate=deflate, threads=threads)
            assert inflated(data) == rows
            uses_isal = deflate == "isal" or level in imaging.ISAL_LEVELS
            assert (
                data == encode(pixels, compress_level=level, deflate="zlib", threads=threads)
            ) != uses_isal
    with pytest.raises(ValueError, match="ISA-L"):
        imaging.encode_png(pixels, compress_level=0, deflate="isal")


def test_one_thread_is_one_stream_whatever_the_band() -> None:
    pixels = photo_like(300, 200, 3)
    assert encode(pixels, threads=1, band_bytes=100) == encode(pixels)
    assert encode(pixels, threads=2, band_bytes=100) != encode(pixels)
    with pytest.raises(ValueError, match="threads"):
        imaging.encode_png(pixels, threads=0)


# --------------------------------------------------------------------------- JPEG and WebP


def test_jpeg_and_webp_keep_size_grey_and_icc_and_quality_trades_bytes() -> None:
    rgb = photo_like(96, 128, 3, noise_levels=64)
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for fmt in imaging.LOSSY_FORMATS:
        high = imaging.encode_lossy(rgb, fmt, quality=95, icc_profile=profile)
        low = imaging.encode_lossy(rgb, fmt, quality=20, icc_profile=profile)
        assert len(low) < len(high) * 0.7
        im = opened(high)
        assert (im.format, im.size, im.mode) == (fmt, (128, 96), "RGB")
        assert im.info["icc_profile"] == profile
        high_error, low_error = (
            np.abs(np.asarray(opened(data), np.float64) - rgb).mean() for data in (high, low)
        )
        assert high_error < min(1.5, 0.8 * low_error)  # of 255 levels: faithful at 95
    grey = photo_like(50, 70, 1)
    grey_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    im = opened(imaging.encode_lossy(grey, "JPEG", quality=90, icc_profile=grey_profile))
    assert im.mode == "L" and im.info["icc_profile"] == grey_profile  # grey stays grey
    im = opened(imaging.encode_lossy(grey, "WEBP", quality=90, icc_profile=grey_profile))
    assert im.mode == "RGB" and "icc_profile" not in im.info  # WebP has no grey


def test_lossless_webp_alpha_and_sixteen_bits() -> None:
    rgba = photo_like(33, 47, 4)
    im = opened(imaging.encode_lossy(rgba, "WEBP", quality=100))
    assert im.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(im), rgba)  # exact, colour under alpha too
    lossy = opened(imaging.encode_lossy(rgba, "WEBP", quality=90))
    assert lossy.mode == "RGBA" and np.abs(np.asarray(lossy)[..., 3] - rgba[..., 3]).max() < 40
    with pytest.raises(ValueError, match="alpha"):
        imaging.encode_lossy(rgba, "JPEG", quality=90)
    wide = np.array([[[0, 128, 257], [65535, 32896, 32895]]], np.uint16)  # 1x2x3
    im = opened(imaging.encode_lossy(wide, "WEBP", quality=100))
    np.testing.assert_array_equal(np.asarray(im), [[[0, 0, 1], [255, 128, 128]]])
    with pytest.raises(ValueError, match="quality"):
        imaging.encode_lossy(rgba[..., :3], "JPEG", quality=0)


# --------------------------------------------------------------------------- negotiation


@pytest.mark.parametrize(
    ("accept", "alpha", "expected"),
    [
        (None, False, "PNG"),
        ("", False, "PNG"),
        ("*/*", False, "PNG"),
        ("image/*", False, "PNG"),
        ("garbage", False, "PNG"),
        ("image/webp", False, "WEBP"),
        ("IMAGE/JPEG", False, "JPEG"),
        ("image/webp, */*", False, "WEBP"),  # named beats a wildcard at equal q
        ("image/png;q=0.5, image/jpeg;q=0.8", False, "JPEG"),
        ("image/jpeg;q=0.8, image/*;q=0.9", False, "PNG"),
        ("image/*;q=0.9, image/png;q=0", False, "WEBP"),
        ("image/jpeg, image/png;q=0.1", True, "PNG"),  # alpha: never JPEG
        ("image/jpeg, image/webp;q=0.2, image/png;q=0.1", True, "WEBP"),
        ("image/webp;q=abc, image/jpeg", False, "JPEG"),  # a bad q skips that range
        ("image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8", False, "WEBP"),
    ],
)
def test_choose_format(accept: str | None, alpha: bool, expected: str) -> None:
    assert choose_format(accept, alpha=alpha) == expected


@pytest.mark.parametrize(
    ("accept", "alpha"),
    [("text/html", False), ("image/*;q=0", False), ("*/*;q=0", False), ("image/jpeg", True)],
)
def test_choose_format_refuses(accept: str, alpha: bool) -> None:
    with pytest.raises(NotAcceptable, match="image/png"):
        choose_format(accept, alpha=alpha)


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def client(weights_dir: Path) -> Iterator[httpx.Client]:
    settings = Settings(weights_dir=weights_dir, models=["x2"], encode_threads=2)
    with live_server(settings) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def upscale(
    client: httpx.Client, body: bytes, accept: str | None, query: str = ""
) -> httpx.Response:
    headers = {} if accept is None else {"Accept": accept}
    return client.post(f"/v1/superres?scale=2{query}", content=body, headers=headers)


def encodes(client: httpx.Client, fmt: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'imdn_encode_seconds_count{{format="{fmt}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no encode count for {fmt}")


def test_accept_chooses_webp_or_jpeg_of_the_exact_size(client: httpx.Client) -> None:
    lr = photo_like(30, 41, 3)
    png = upscale(client, png_bytes(lr), None)
    assert png.headers["content-type"] == "image/png" and png.headers["vary"] == "Accept"
    assert png.headers["transfer-encoding"] == "chunked"
    reference = np.asarray(opened(png.content))
    assert reference.shape == (60, 82, 3)
    for accept, fmt in (("image/webp", "WEBP"), ("image/jpeg", "JPEG")):
        before = encodes(client, fmt.lower())
        r = upscale(client, png_bytes(lr), accept)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == accept and r.headers["vary"] == "Accept"
        assert int(r.headers["content-length"]) == len(r.content)
        assert "encode;dur=" in r.headers["server-timing"]
        im = opened(r.content)
        assert (im.format, im.size, im.mode) == (fmt, (82, 60), "RGB")
        assert np.abs(np.asarray(im, np.float64) - reference).mean() < 4.0  # the same picture
        assert encodes(client, fmt.lower()) == before + 1
    r = upscale(client, png_bytes(lr), "image/png;q=0.5, image/jpeg;q=0.8, image/webp;q=0.1")
    assert r.headers["content-type"] == "image/jpeg"
    same = upscale(client, png_bytes(lr), "image/png, image/*;q=0.9")
    assert same.headers["content-type"] == "image/png" and same.content == png.content


def test_quality_changes_the_size_and_webp_100_is_lossless(client: httpx.Client) -> None:
    body = png_bytes(photo_like(40, 40, 3))
    sizes = [len(upscale(client, body, "image/jpeg", f"&quality={q}").content) for q in (20, 95)]
    assert sizes[0] < sizes[1] * 0.7
    default = upscale(client, body, "image/jpeg").content
    assert len(default) == len(upscale(client, body, "image/jpeg", "&quality=90").content)
    png = np.asarray(opened(upscale(client, body, None).content))
    webp = opened(upscale(client, body, "image/webp", "&quality=100").content)
    np.testing.assert_array_equal(np.asarray(webp), png)
    for bad in ("0", "101", "high"):
        r = upscale(client, body, "image/jpeg", f"&quality={bad}")
        assert r.status_code == 422 and r.json()["reason"] == "invalid_request"


def test_not_acceptable_is_a_406_problem(client: httpx.Client) -> None:
    body = png_bytes(photo_like(20, 20, 3))
    for accept in ("text/html", "image/png;q=0, image/webp;q=0, image/jpeg;q=0"):
        r = upscale(client, body, accept)
        assert r.status_code == 406
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["reason"] == "not_acceptable" and r.headers["vary"] == "Accept"


def test_alpha_is_never_flattened_into_jpeg(client: httpx.Client) -> None:
    body = png_bytes(photo_like(24, 32, 4))
    r = upscale(client, body, "image/jpeg")
    assert r.status_code == 406 and "transparency" in r.json()["detail"]
    r = upscale(client, body, "image/jpeg, image/png;q=0.1")
    assert r.headers["content-type"] == "image/png"
    assert opened(r.content).mode == "RGBA"
    r = upscale(client, body, "image/jpeg, image/webp;q=0.5")
    im = opened(r.content)
    assert (im.format, im.mode, im.size) == ("WEBP", "RGBA", (64, 48))


def test_sixteen_bits_stay_in_png_and_become_eight_in_webp(client: httpx.Client) -> None:
    wide = photo_like(20, 24, 3, np.uint16)
    body = b"".join(imaging.encode_png(wide))
    png = upscale(client, body, None).content
    assert png_chunks(png)[0][1][8] == 16  # IHDR bit depth
    webp = opened(upscale(client, body, "image/webp", "&quality=100").content)
    expected = (pixels_of(png).astype(np.uint32) * 255 + 32767) // 65535
    np.testing.assert_array_equal(np.asarray(webp), expected)


def test_the_openapi_200_lists_the_three_formats(client: httpx.Client) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v1/superres"]["post"]
    assert set(op["responses"]["200"]["content"]) == {"image/png", "image/webp", "image/jpeg"}
    assert "406" in op["responses"]
    quality = next(p for p in op["parameters"] if p["name"] == "quality")
    assert quality["schema"]["minimum"] == 1 and quality["schema"]["maximum"] == 100


def test_the_encode_histogram_is_by_format() -> None:
    m = Metrics()
    value = m.registry.get_sample_value
    for fmt in ("png", "webp", "jpeg"):  # every series from the start
        assert value("imdn_encode_seconds_count", {"format": fmt}) == 0
    m.observe_encode(0.02)  # the old call: PNG
    m.observe_encode(0.5, format="webp")
    assert value("imdn_encode_seconds_sum", {"format": "png"}) == pytest.approx(0.02)
    assert value("imdn_encode_seconds_sum", {"format": "webp"}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gif"):
        m.observe_encode(0.1, format="gif")
