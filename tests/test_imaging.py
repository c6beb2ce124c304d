"""service/imaging/: every input built here in code (Pillow, or PNG/TIFF bytes by hand)."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, ImageOps, _webp

from service.imaging import (
    PNG_PIECE_BYTES,
    REASONS,
    DecodedImage,
    ImageError,
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImageType,
    check_output_pixels,
    compose,
    decode,
    encode_png,
    output_size,
    sniff_format,
)

LIMIT = 10**6


# --------------------------------------------------------------------------- builders


def _rgb(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth gradient with noise, H != W so that a transposition shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **params)
    return out.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


# Adam7 passes: (first row, first column, row step, column step)
_ADAM7 = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2)]
_ADAM7.append((1, 0, 2, 1))


def _png_by_hand(
    pixels: np.ndarray, colour_type: int, *, interlace: bool = False, trns: bytes = b""
) -> bytes:
    """A PNG written without Pillow (which cannot write 16-bit colour): filter 0 rows."""
    height, width = pixels.shape[:2]
    depth = 16 if pixels.dtype == np.uint16 else 8
    big_endian = pixels.astype(">u2") if depth == 16 else pixels
    passes = [big_endian[y::dy, x::dx] for y, x, dy, dx in _ADAM7] if interlace else [big_endian]
    raw = b"".join(
        b"\x00" + row.tobytes() for sub in passes if sub.shape[0] and sub.shape[1] for row in sub
    )
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, int(interlace))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + (_png_chunk(b"tRNS", trns) if trns else b"")
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _tiff_by_hand(pixels: np.ndarray, *, big_endian: bool, deflate: bool) -> bytes:
    """A one-strip 16-bit RGB(A) TIFF (Pillow cannot write one)."""
    e = ">" if big_endian else "<"
    height, width, channels = pixels.shape
    data = pixels.astype(e + "u2").tobytes()
    if deflate:
        data = zlib.compress(data)
    bits_at, data_at = 8, 8 + 2 * channels
    ifd_at = data_at + len(data) + (data_at + len(data)) % 2
    short, long_ = 3, 4
    tags = [
        (256, short, 1, width),
        (257, short, 1, height),
        (258, short, channels, bits_at),
        (259, short, 1, 8 if deflate else 1),  # compression: deflate or none
        (262, short, 1, 2),  # photometric: RGB
        (273, long_, 1, data_at),
        (277, short, 1, channels),
        (278, short, 1, height),
        (279, long_, 1, len(data)),
        (284, short, 1, 1),  # planar configuration: chunky
    ]
    if channels == 4:
        tags.append((338, short, 1, 2))  # extra sample: unassociated alpha
    ifd = struct.pack(e + "H", len(tags))
    for tag, kind, count, value in sorted(tags):
        if kind == short and count == 1:
            ifd += struct.pack(e + "HHIHH", tag, kind, count, value, 0)
        else:
            ifd += struct.pack(e + "HHII", tag, kind, count, value)
    body = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", ifd_at)
    body += struct.pack(e + "H" * channels, *[16] * channels) + data
    tail: bytes = b"\x00" * (ifd_at - len(body)) + ifd + struct.pack(e + "I", 0)
    return body + tail


def _as_ints(unit: np.ndarray, bits: int) -> np.ndarray:
    top = 65535 if bits == 16 else 255
    ints: np.ndarray = np.rint(unit * top).astype(np.uint16 if bits == 16 else np.uint8)
    return ints


def _png_out(decoded: DecodedImage, rgb_out: np.ndarray, level: int = 1) -> bytes:
    pixels = compose(decoded, rgb_out)
    return b"".join(encode_png(pixels, icc_profile=decoded.icc_profile, compress_level=level))


def _refused(data: bytes, content_type: str | None, **kw: int) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode(data, content_type, max_pixels=kw.get("max_pixels", LIMIT))
    assert caught.value.reason in REASONS
    return caught.value


# --------------------------------------------------------------------------- formats

LOSSLESS_PARAMS: dict[str, dict[str, object]] = {
    "PNG": {},
    "BMP": {},
    "TIFF": {"compression": "tiff_lzw"},
    "WEBP": {"lossless": True},
    "JPEG": {"quality": 95, "subsampling": 0},
}
CONTENT_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


@pytest.mark.parametrize("fmt", list(CONTENT_TYPES))
@pytest.mark.parametrize("declared", ["exact", None, "application/octet-stream"])
def test_each_allowed_format_round_trips(fmt: str, declared: str | None) -> None:
    pixels = _rgb()
    data = _save(Image.fromarray(pixels), fmt, **LOSSLESS_PARAMS[fmt])
    content_type = CONTENT_TYPES[fmt] if declared == "exact" else declared
    decoded = decode(data, content_type, max_pixels=LIMIT)

    assert (decoded.format, decoded.bits, decoded.grey, decoded.alpha) == (fmt, 8, False, None)
    assert decoded.rgb.dtype == np.float32 and decoded.rgb.shape == (24, 32, 3)
    assert decoded.rgb.flags.c_contiguous and 0.0 <= decoded.rgb.min() <= decoded.rgb.max() <= 1
    values = _as_ints(decoded.rgb, 8)
    if fmt == "JPEG":  # lossy: exactly what libjpeg gives, and close to what was sent
        with Image.open(io.BytesIO(data)) as im:
            np.testing.assert_array_equal(values, np.asarray(im))
        assert np.abs(values.astype(int) - pixels).mean() < 4
    else:
        np.testing.assert_array_equal(values, pixels)

    with Image.open(io.BytesIO(_png_out(decoded, decoded.rgb))) as out:
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), values)


def test_mislabelled_allowed_format_is_decoded_as_its_bytes() -> None:
    data = _save(Image.fromarray(_rgb()), "PNG")
    assert decode(data, "image/jpeg", max_pixels=LIMIT).format == "PNG"
    assert decode(data, "IMAGE/PNG; charset=binary", max_pixels=LIMIT).format == "PNG"
    assert decode(data, "image/jpg", max_pixels=LIMIT).format == "PNG"


@pytest.mark.parametrize("content_type", ["image/gif", None, "image/png"])
def test_gif_is_refused_with_415(content_type: str | None) -> None:
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    error = _refused(data, content_type)
    assert isinstance(error, UnsupportedImageType)
    assert (error.status, error.reason) == (415, "unsupported_type")


def test_content_type_outside_the_allow_list_is_415_whatever_the_bytes() -> None:
    data = _save(Image.fromarray(_rgb()), "PNG")
    for content_type in ("text/plain", "image/svg+xml", "application/json"):
        error = _refused(data, content_type)
        assert (error.status, error.reason) == (415, "unsupported_type")


def test_text_sent_as_png_is_400_undecodable() -> None:
    error = _refused(b"hello, this is not a picture\n" * 10, "image/png")
    assert isinstance(error, UndecodableImage)
    assert (error.status, error.reason) == (400, "undecodable")


def test_sniff_format_names_refused_formats() -> None:
    assert sniff_format(_save(Image.new("RGB", (4, 4)), "GIF")) == "GIF"
    assert sniff_format(_save(Image.new("RGB", (4, 4)), "JPEG2000")) == "JPEG 2000"
    assert sniff_format(b"\x00\x00\x00\x1cftypavif") == "AVIF/HEIF"
    assert sniff_format(b"random bytes") is None


def test_animated_webp_and_apng_are_refused_but_single_frames_pass() -> None:
    frames = [Image.fromarray(_rgb(seed=i)) for i in range(3)]
    for fmt in ("WEBP", "PNG"):
        animated = _save(frames[0], fmt, save_all=True, append_images=frames[1:])
        error = _refused(animated, None)
        assert (error.status, error.reason) == (415, "animated")
        single = _save(frames[0], fmt, save_all=True, append_images=[])
        assert decode(single, None, max_pixels=LIMIT).rgb.shape == (24, 32, 3)


def test_jpeg_mpo_and_multipage_tiff_use_their_first_image() -> None:
    for fmt in ("MPO", "TIFF"):
        # Fresh images for each save: Pillow 13 leaks MPO encoder state into a later save.
        red, blue = Image.new("RGB", (16, 12), (255, 0, 0)), Image.new("RGB", (16, 12), (0, 0, 255))
        data = _save(red, fmt, save_all=True, append_images=[blue])
        with Image.open(io.BytesIO(data)) as im:
            assert getattr(im, "n_frames", 1) == 2
        decoded = decode(data, None, max_pixels=LIMIT)
        assert decoded.format == ("JPEG" if fmt == "MPO" else fmt)
        np.testing.assert_allclose(decoded.rgb.mean(axis=(0, 1)), [1, 0, 0], atol=0.02)


# --------------------------------------------------------------------------- damage


def test_empty_body_is_400() -> None:
    error = _refused(b"", "image/png")
    assert (error.status, error.reason) == (400, "empty")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_truncated_images_are_400_never_half_grey(fmt: str) -> None:
    data = _save(Image.fromarray(_rgb(64, 64)), fmt, **LOSSLESS_PARAMS[fmt])
    error = _refused(data[: len(data) // 2], None)
    assert isinstance(error, UndecodableImage) and error.status == 400


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_garbage_after_a_valid_signature_is_400() -> None:
    rng = np.random.default_rng(7)
    for magic in (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00"):
        error = _refused(magic + rng.bytes(300), None)
        assert (error.status, error.reason) == (400, "undecodable")
    assert _refused(rng.bytes(300), None).status == 400


def test_header_that_lies_about_the_size_is_400() -> None:
    small = _png_by_hand(_rgb(8, 8), 2)
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    lying = small[:8] + _png_chunk(b"IHDR", ihdr) + small[8 + 25 :]
    assert _refused(lying, "image/png").status == 400


def _jpeg_scan(data: bytes) -> tuple[int, int]:
    """(start, end) of the entropy-coded data of a JPEG's first scan, end before EOI."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + struct.unpack_from(">H", data, sos + 2)[0]
    return start, data.rindex(b"\xff\xd9")


@pytest.mark.parametrize(
    "params",
    [
        {"quality": 90},
        {"quality": 90, "progressive": True},
        {"quality": 75, "subsampling": 0},
        {"quality": 90, "restart_marker_blocks": 2},
    ],
    ids=["baseline", "progressive", "4:4:4", "restart-markers"],
)
def test_jpeg_scan_cut_short_with_its_end_marker_put_back_is_400(params: dict[str, object]) -> None:
    """libjpeg fills what is missing with grey and only warns: Pillow would serve it."""
    whole = _save(Image.fromarray(_rgb(64, 64)), "JPEG", **params)
    assert decode(whole, None, max_pixels=LIMIT).height == 64
    assert ("restart_marker_blocks" in params) == (b"\xff\xd0" in whole)
    start, end = _jpeg_scan(whole)
    for cut in (start + (end - start) // 2, end - 40):
        error = _refused(whole[:cut] + b"\xff\xd9", "image/jpeg")
        assert (error.status, error.reason) == (400, "undecodable"), cut
        assert "premature end of data segment" in error.detail


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_corrupt_jpeg_data_that_makes_libjpeg_warn_is_400(progressive: bool) -> None:
    """Flipped bits in the scan that libjpeg notices (a bad Huffman code, a marker where
    data should be) only make it warn: Pillow serves the garbled picture; we refuse it.
    Flips that still decode to valid codes are undetectable by any decoder, and served."""
    whole = _save(Image.fromarray(_rgb(128, 128)), "JPEG", quality=90, progressive=progressive)
    start, end = _jpeg_scan(whole)
    rng = np.random.default_rng(14)
    refused = 0
    for _ in range(40):
        bad = bytearray(whole)
        bad[int(rng.integers(start, end))] ^= 1 << int(rng.integers(8))
        with Image.open(io.BytesIO(bytes(bad))) as im:
            try:
                im.load()  # what Pillow alone does with it
            except OSError:
                continue  # Pillow refuses this one too
        try:
            decode(bytes(bad), "image/jpeg", max_pixels=LIMIT)
        except UndecodableImage as error:
            assert "libjpeg says Corrupt JPEG data" in error.detail
            refused += 1
    assert refused >= 5, refused


def test_jpeg_header_declaring_more_than_its_scan_can_code_is_400_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 996-byte JPEG of issue 14: 48x48 of scan data under a 4000x4000 frame header."""
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", loads.append)
    for progressive, sof in ((False, b"\xff\xc0"), (True, b"\xff\xc2")):
        small = bytearray(_save(Image.fromarray(_rgb(48, 48)), "JPEG", progressive=progressive))
        struct.pack_into(">HH", small, small.index(sof) + 5, 4000, 4000)
        error = _refused(bytes(small), "image/jpeg", max_pixels=4096 * 4096)
        assert (error.status, error.reason) == (400, "undecodable")
        assert "too short for the 4000x4000" in error.detail
    assert loads == []  # refused from the markers: no pixel decoded


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_scan_size_floor_never_refuses_a_real_file(mode: str) -> None:
    """Flat images with optimised Huffman tables spend the floor itself (2 bits a block,
    sequential): they are served."""
    flat = Image.new(mode, (800, 600), (128,) * len(mode) if mode != "L" else 128)
    for params in ({"optimize": True}, {"optimize": True, "subsampling": 0}, {"progressive": True}):
        decoded = decode(_save(flat, "JPEG", **params), None, max_pixels=LIMIT)
        assert (decoded.height, decoded.width) == (600, 800)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_pixels_from_the_strict_decode_are_pillows(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grey and colour JPEGs take their pixels from the strict check's own full decode
    (one decode instead of two): the same pixels as Pillow's, for every subsampling,
    progressive and optimised files alike."""
    rng = np.random.default_rng(5)
    base = np.kron(rng.integers(0, 256, (24, 31, 3), dtype=np.uint8), np.ones((5, 5, 1), np.uint8))
    picture = Image.fromarray(
        np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
    )
    picture = picture.convert(mode)
    variants: list[dict[str, object]] = [
        {},
        {"progressive": True},
        {"subsampling": 0},
        {"subsampling": 1, "quality": 60},
        {"optimize": True, "quality": 97},
    ]
    files = [_save(picture, "JPEG", **params) for params in variants]
    pillow = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in files]
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", loads.append)
    for data, expected, params in zip(files, pillow, variants, strict=True):
        decoded = decode(data, "image/jpeg", max_pixels=LIMIT)
        assert decoded.grey == (mode == "L")
        assert np.array_equal(decoded.pixels, expected), params
    assert loads == []  # Pillow read the headers only


def test_png_chunk_failing_its_crc_is_400() -> None:
    good = _png_by_hand(_rgb(16, 16), 2)
    idat = good.index(b"IDAT")
    crc_at = idat + 4 + struct.unpack_from(">I", good, idat - 4)[0]
    for where in (idat + 10, crc_at):  # a flipped data bit, or a wrong CRC
        bad = bytearray(good)
        bad[where] ^= 0x01
        error = _refused(bytes(bad), "image/png")
        assert (error.status, error.reason) == (400, "undecodable")
        assert "IDAT chunk fails its CRC" in error.detail


@pytest.mark.parametrize("interlace", [False, True])
def test_png_whose_data_holds_fewer_rows_than_its_header_is_400(interlace: bool) -> None:
    """A complete zlib stream of 9 rows under a 16-row header: Pillow leaves 7 black rows."""
    pixels = _rgb(16, 13)
    whole = _png_by_hand(pixels, 2, interlace=interlace)
    assert np.array_equal(_as_ints(decode(whole, None, max_pixels=LIMIT).rgb, 8), pixels)
    short = _png_by_hand(pixels[:9], 2, interlace=interlace)
    ihdr = struct.pack(">IIBBBBB", 13, 16, 8, 2, 0, 0, int(interlace))
    lying = short[:8] + _png_chunk(b"IHDR", ihdr) + short[8 + 25 :]
    error = _refused(lying, "image/png")
    assert (error.status, error.reason) == (400, "undecodable")


@pytest.mark.parametrize(("height", "width"), [(1, 1), (7, 13), (16, 9)])
@pytest.mark.parametrize("colour_type", [0, 2, 6])
def test_interlaced_pngs_decode_whole(height: int, width: int, colour_type: int) -> None:
    """The row count the data is checked against holds for Adam7's seven passes."""
    channels = {0: 1, 2: 3, 6: 4}[colour_type]
    for dtype in (np.uint8, np.uint16):
        top = np.iinfo(dtype).max
        drawn = np.random.default_rng(height).integers(0, top, (height, width, channels))
        pixels: np.ndarray = drawn.astype(dtype)
        if channels == 1:
            pixels = pixels[..., 0]
        decoded = decode(_png_by_hand(pixels, colour_type, interlace=True), None, max_pixels=LIMIT)
        bits = 16 if dtype == np.uint16 else 8
        assert (decoded.height, decoded.width, decoded.bits) == (height, width, bits)
        colour = pixels if channels != 4 else pixels[..., :3]
        got = _as_ints(decoded.rgb if channels > 1 else decoded.rgb[..., 0], bits)
        assert np.array_equal(got, colour)


def test_load_truncated_images_must_stay_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode(_save(Image.fromarray(_rgb()), "PNG"), None, max_pixels=LIMIT)


# --------------------------------------------------------------------------- size limits


def _declared_png(width: int, height: int) -> bytes:
    """A few dozen bytes: a PNG header declaring width x height grey pixels, one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image's pixels are loaded."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_declared_100000_squared_png_is_refused_from_the_header() -> None:
    data = _declared_png(100_000, 100_000)
    assert len(data) < 200
    start = time.perf_counter()
    error = _refused(data, "image/png", max_pixels=4096 * 4096)
    assert isinstance(error, ImageTooLarge) and error.status == 413
    # 10^10 pixels is past twice Pillow's MAX_IMAGE_PIXELS: its guard speaks first.
    assert error.reason == "decompression_bomb"
    assert time.perf_counter() - start < 0.5


@pytest.mark.usefixtures("no_pixel_decoding")
def test_over_our_limit_is_too_many_pixels_before_decoding() -> None:
    error = _refused(_declared_png(2000, 1000), None, max_pixels=1999 * 1000)
    assert (error.status, error.reason) == (413, "too_many_pixels")
    assert "2000x1000" in error.detail


@pytest.mark.parametrize("kind", ["lossy", "lossless", "extended"])
def test_webp_size_is_checked_before_libwebp_allocates_the_canvas(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    params: dict[str, object] = {"quality": 80}
    if kind == "lossless":
        params = {"lossless": True}
    elif kind == "extended":  # a profile makes Pillow write the extended VP8X header
        params = {"icc_profile": _srgb_profile()}
    data = _save(Image.fromarray(_rgb(30, 50)), "WEBP", **params)
    assert data[12:16] == {"lossy": b"VP8 ", "lossless": b"VP8L", "extended": b"VP8X"}[kind]
    assert decode(data, None, max_pixels=50 * 30).rgb.shape == (30, 50, 3)

    def refuse(*args: object) -> None:
        raise AssertionError("libwebp's decoder was created")

    monkeypatch.setattr(_webp, "WebPAnimDecoder", refuse)
    error = _refused(data, None, max_pixels=50 * 30 - 1)
    assert (error.status, error.reason) == (413, "too_many_pixels")
    # A VP8X header alone, declaring a 16384 x 16384 canvas.
    header = b"RIFF" + struct.pack("<I", 22) + b"WEBPVP8X" + struct.pack("<I", 10) + bytes(4)
    header += (16383).to_bytes(3, "little") * 2
    error = _refused(header, "image/webp", max_pixels=4096 * 4096)
    assert (error.status, error.reason) == (413, "too_many_pixels")


@pytest.fixture(scope="module")
def solid_bomb() -> bytes:
    """A complete, valid PNG of a 10000 x 10000 black image, about 100 KB."""
    side = 10_000
    compressor = zlib.compressobj(9)
    rows = bytes((side + 1) * 500)  # 500 rows of (filter byte + pixels), all zero
    idat = b"".join(compressor.compress(rows) for _ in range(side // 500)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_413(solid_bomb: bytes) -> None:
    assert len(solid_bomb) < 200_000
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow's, from Image.open
        error = _refused(solid_bomb, "image/png", max_pixels=4096 * 4096)
    assert (error.status, error.reason) == (413, "too_many_pixels")
    # With our limit out of the way, Pillow's bomb guard (warning range: 1e8 pixels is over
    # MAX_IMAGE_PIXELS but under twice it) still refuses it rather than decoding 100 MB.
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS < 10**8 < 2 * Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning):
        error = _refused(solid_bomb, "image/png", max_pixels=10**12)
    assert (error.status, error.reason) == (413, "decompression_bomb")


def test_pillow_decompression_bomb_error_becomes_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _save(Image.fromarray(_rgb(50, 50)), "PNG")  # 2500 > 2 x 1000: Pillow raises
    error = _refused(data, None, max_pixels=10**9)
    assert (error.status, error.reason) == (413, "decompression_bomb")


def test_output_size_rounds_halves_up() -> None:
    assert output_size(3, 5, 1.5) == (5, 8)  # 4.5 -> 5 and 7.5 -> 8 (banker's: 4 and 8)
    assert output_size(1, 5, 2.5) == (3, 13)  # 2.5 -> 3 (banker's: 2)
    assert output_size(25, 10, 2.3) == (58, 23)  # 57.5 -> 58, though 2.3 * 25 < 57.5 in floats
    assert output_size(24, 31, 4) == (96, 124)
    assert output_size(7, 9, 1.1) == (8, 10)  # 7.7 -> 8, 9.9 -> 10
    for bad in ((0, 5, 2.0), (5, 5, 0.0), (5, 5, -1.0), (5, 5, float("nan")), (1, 1, 0.2)):
        with pytest.raises(ValueError):
            output_size(*bad)


def test_check_output_pixels() -> None:
    check_output_pixels(100, 100, 10_000)
    with pytest.raises(ImageTooLarge) as caught:
        check_output_pixels(100, 101, 10_000)
    assert (caught.value.status, caught.value.reason) == (413, "output_too_large")


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(orientation: int) -> None:
    im = Image.fromarray(_rgb())
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode(_save(im, "PNG", exif=exif), None, max_pixels=LIMIT)
    im.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(_as_ints(decoded.rgb, 8), expected)
    assert decoded.rgb.flags.c_contiguous


def test_jpeg_orientation_6_gives_the_transposed_upright_image() -> None:
    pixels = _rgb(24, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(Image.fromarray(pixels), "JPEG", quality=95, subsampling=0, exif=exif)
    decoded = decode(data, "image/jpeg", max_pixels=LIMIT)
    assert (decoded.height, decoded.width) == (32, 24)
    with Image.open(io.BytesIO(data)) as im:
        stored = np.asarray(im)
    # Orientation 6: the stored image must be turned 90 degrees clockwise to stand upright.
    np.testing.assert_array_equal(_as_ints(decoded.rgb, 8), np.rot90(stored, -1))
    assert np.abs(_as_ints(decoded.rgb, 8).astype(int) - np.rot90(pixels, -1)).mean() < 4
    with Image.open(io.BytesIO(_png_out(decoded, decoded.rgb))) as out:
        assert out.size == (24, 32) and not out.getexif()


# --------------------------------------------------------------------------- grey and alpha


def _twice(decoded: DecodedImage) -> np.ndarray:
    """A stand-in network output: each pixel repeated 2 x 2."""
    return np.repeat(np.repeat(decoded.rgb, 2, axis=0), 2, axis=1)


def test_grey_stays_grey() -> None:
    grey = _rgb()[..., 0]
    for mode_image in (Image.fromarray(grey), Image.fromarray(grey > 128)):
        decoded = decode(_save(mode_image, "PNG"), None, max_pixels=LIMIT)
        assert decoded.grey and decoded.bits == 8 and decoded.rgb.shape == (24, 32, 3)
        np.testing.assert_array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])
        pixels = compose(decoded, _twice(decoded))
        assert pixels.shape == (48, 64, 1) and pixels.dtype == np.uint8
        with Image.open(io.BytesIO(b"".join(encode_png(pixels)))) as out:
            assert out.mode == "L" and out.size == (64, 48)
            expected = np.repeat(np.repeat(np.asarray(mode_image.convert("L")), 2, 0), 2, 1)
            np.testing.assert_array_equal(np.asarray(out), expected)


def test_grey_output_is_bt601_luma() -> None:
    decoded = decode(_save(Image.new("L", (4, 4), 0), "PNG"), None, max_pixels=LIMIT)
    rgb_out = np.zeros((4, 4, 3), np.float32)
    rgb_out[0, :] = (1, 0, 0)
    rgb_out[1, :] = (0, 1, 0)
    rgb_out[2, :] = (0, 0, 1)
    rgb_out[3, :] = (0.2, 0.6, 0.9)
    luma = compose(decoded, rgb_out)[:, 0, 0]
    expected = [round(255 * w) for w in (0.299, 0.587, 0.114, 0.299 * 0.2 + 0.587 * 0.6 + 0.1026)]
    np.testing.assert_array_equal(luma, expected)


def _alpha_ramp(height: int = 24, width: int = 32) -> np.ndarray:
    alpha = np.zeros((height, width), np.uint8)
    alpha[:, width // 2 :] = 255
    alpha[: height // 4] = 128
    return alpha


@pytest.mark.parametrize("kind", ["LA", "RGBA", "P", "RGB-key"])
def test_alpha_is_kept_and_resized(kind: str) -> None:
    pixels, alpha = _rgb(), _alpha_ramp()
    if kind == "LA":
        im = Image.fromarray(np.stack([pixels[..., 0], alpha], -1))
    elif kind == "RGBA":
        im = Image.fromarray(np.concatenate([pixels, alpha[..., None]], -1))
    elif kind == "P":  # palette index 0 transparent, the rest opaque
        im = Image.fromarray(np.where(alpha == 255, 200, 0).astype(np.uint8), "L").convert("P")
        im.info["transparency"] = 0
        alpha = np.where(alpha == 255, 255, 0).astype(np.uint8)
    else:  # an RGB PNG whose tRNS colour key marks the transparent pixels
        pixels = pixels.copy()
        pixels[alpha != 255] = (1, 2, 3)
        im = Image.fromarray(pixels)
        im.info["transparency"] = (1, 2, 3)
        alpha = np.where(alpha == 255, 255, 0).astype(np.uint8)
    data = (
        _save(im, "PNG", transparency=im.info["transparency"])
        if kind in ("P", "RGB-key")
        else (_save(im, "PNG"))
    )
    decoded = decode(data, None, max_pixels=LIMIT)
    assert decoded.alpha is not None and decoded.alpha.shape == (24, 32)
    np.testing.assert_array_equal(_as_ints(decoded.alpha, 8), alpha)
    assert decoded.grey == (kind == "LA")

    out = compose(decoded, _twice(decoded))
    assert out.shape == (48, 64, 2 if kind == "LA" else 4)
    out_alpha = out[..., -1].astype(int)
    # Far from the edges the alpha is exactly what it was; across them it is bicubic, clipped.
    nearest = np.repeat(np.repeat(alpha, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(out_alpha[20:, :28], nearest[20:, :28])
    np.testing.assert_array_equal(out_alpha[20:, 36:], 255)
    assert len(np.unique(out_alpha[30, 28:36])) > 2  # a ramp, not nearest-neighbour
    with Image.open(io.BytesIO(b"".join(encode_png(out)))) as png:
        assert png.mode == ("LA" if kind == "LA" else "RGBA") and png.size == (64, 48)
        np.testing.assert_array_equal(np.asarray(png), out.reshape(48, 64, -1).squeeze())


# --------------------------------------------------------------------------- 16 bits


def _words(shape: tuple[int, ...], seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, size=shape, dtype=np.uint16)


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize(
    ("colour_type", "channels"), [(0, 1), (4, 2), (2, 3), (6, 4)], ids=["L", "LA", "RGB", "RGBA"]
)
def test_16bit_png_is_lossless(colour_type: int, channels: int, interlace: bool) -> None:
    words = _words((19, 23, channels))
    data = _png_by_hand(words, colour_type, interlace=interlace)
    decoded = decode(data, "image/png", max_pixels=LIMIT)
    assert decoded.bits == 16 and decoded.grey == (channels <= 2)
    colour_planes = 1 if channels <= 2 else 3
    np.testing.assert_array_equal(
        _as_ints(decoded.rgb[..., :colour_planes], 16), words[..., :colour_planes]
    )
    has_alpha = channels in (2, 4)
    assert (decoded.alpha is not None) == has_alpha
    if decoded.alpha is not None:
        np.testing.assert_array_equal(_as_ints(decoded.alpha, 16), words[..., -1])

    png = _png_out(decoded, decoded.rgb)
    assert png[24:26] == bytes([16, colour_type])  # IHDR bit depth and colour type
    again = decode(png, "image/png", max_pixels=LIMIT)
    np.testing.assert_array_equal(again.rgb, decoded.rgb)
    if decoded.alpha is not None:
        assert again.alpha is not None
        np.testing.assert_array_equal(again.alpha, decoded.alpha)
    # An independent reader: Pillow keeps 16-bit grey, and the high bytes of 16-bit colour.
    with Image.open(io.BytesIO(png)) as pillow:
        pillow_values = np.asarray(pillow)
        if channels == 1:
            np.testing.assert_array_equal(pillow_values, words[..., 0])
        elif channels >= 3:
            np.testing.assert_array_equal(pillow_values, (words >> 8).astype(np.uint8))


def test_16bit_rgb_png_colour_key_becomes_alpha() -> None:
    words = _words((6, 10, 3))
    key = np.array([1000, 2000, 65000], np.uint16)
    words[::2, ::3] = key
    data = _png_by_hand(words, 2, trns=key.astype(">u2").tobytes())
    decoded = decode(data, "image/png", max_pixels=LIMIT)
    assert decoded.bits == 16 and decoded.alpha is not None
    expected = np.where(np.all(words == key, axis=2), 0, 65535)
    np.testing.assert_array_equal(_as_ints(decoded.alpha, 16), expected)
    assert compose(decoded, decoded.rgb).shape == (6, 10, 4)


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("deflate", [False, True])
@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_rgb_tiff_is_lossless(channels: int, deflate: bool, big_endian: bool) -> None:
    words = _words((9, 13, channels))
    data = _tiff_by_hand(words, big_endian=big_endian, deflate=deflate)
    decoded = decode(data, "image/tiff", max_pixels=LIMIT)
    assert decoded.bits == 16 and not decoded.grey
    np.testing.assert_array_equal(_as_ints(decoded.rgb, 16), words[..., :3])
    if channels == 4:
        assert decoded.alpha is not None
        np.testing.assert_array_equal(_as_ints(decoded.alpha, 16), words[..., 3])


def test_16bit_grey_tiff_and_pillow_png_keep_16_bits() -> None:
    words = _words((11, 17))
    for fmt in ("TIFF", "PNG"):
        decoded = decode(_save(Image.fromarray(words), fmt), None, max_pixels=LIMIT)
        assert decoded.bits == 16 and decoded.grey
        np.testing.assert_array_equal(_as_ints(decoded.rgb[..., 1], 16), words)
        with Image.open(io.BytesIO(_png_out(decoded, decoded.rgb))) as out:
            assert out.mode == "I;16"
            np.testing.assert_array_equal(np.asarray(out), words)


# --------------------------------------------------------------------------- colour


def _srgb_profile() -> bytes:
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_icc_profile_is_carried_over(fmt: str) -> None:
    profile = _srgb_profile()
    data = _save(Image.fromarray(_rgb()), fmt, icc_profile=profile)
    decoded = decode(data, None, max_pixels=LIMIT)
    assert decoded.icc_profile == profile
    with Image.open(io.BytesIO(_png_out(decoded, _twice(decoded)))) as out:
        assert out.info.get("icc_profile") == profile


def test_icc_profile_of_the_wrong_colour_space_is_dropped() -> None:
    grey_with_rgb_profile = _save(Image.new("L", (8, 8), 90), "PNG", icc_profile=_srgb_profile())
    decoded = decode(grey_with_rgb_profile, None, max_pixels=LIMIT)
    assert decoded.grey and decoded.icc_profile is None


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    cmyk = np.zeros((16, 24, 4), np.uint8)
    cmyk[:, :8, 0] = 255  # cyan
    cmyk[:, 8:16, 1] = 255  # magenta
    cmyk[:, 16:, 3] = 255  # black
    expected = [(0, 1, 1), (1, 0, 1), (0, 0, 0)]
    for profile in (None, _srgb_profile()):  # an sRGB profile cannot describe CMYK: ignored
        data = _save(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95, icc_profile=profile)
        decoded = decode(data, "image/jpeg", max_pixels=LIMIT)
        assert not decoded.grey and decoded.rgb.shape == (16, 24, 3) and decoded.icc_profile is None
        for i, rgb in enumerate(expected):
            np.testing.assert_allclose(
                decoded.rgb[4:12, 8 * i + 2 : 8 * i + 6], np.broadcast_to(rgb, (8, 4, 3)), atol=0.03
            )


def test_float_tiff_is_415_unsupported_mode() -> None:
    data = _save(Image.new("F", (8, 8), 0.5), "TIFF")
    error = _refused(data, "image/tiff")
    assert (error.status, error.reason) == (415, "unsupported_mode")


# --------------------------------------------------------------------------- compose, encode


def test_compose_rounds_to_nearest_and_clips() -> None:
    decoded = decode(_save(Image.new("RGB", (6, 1)), "PNG"), None, max_pixels=LIMIT)
    values = [-0.5, 1.7, 0.5 / 255 + 1e-6, 100 / 255, 100.49 / 255, 100.51 / 255]
    rgb_out = np.array([[[v] * 3 for v in values]], np.float32)
    np.testing.assert_array_equal(compose(decoded, rgb_out)[0, :, 0], [0, 255, 1, 100, 100, 101])
    with pytest.raises(ValueError, match="NaN"):
        compose(decoded, np.full((1, 4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="float"):
        compose(decoded, np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "I;16"])
def test_compose_in_bands_equals_quantising_the_whole_image(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Bands of one row, of a few rows with a short last band, and one band for all."""
    rgba = np.concatenate([_rgb(), _alpha_ramp()[..., None]], -1)
    if mode == "I;16":
        source = Image.fromarray(_words((24, 32)))
    else:
        source = Image.fromarray(rgba).convert(mode)
    decoded = decode(_save(source, "PNG"), None, max_pixels=LIMIT)
    rng = np.random.default_rng(11)
    rgb_out = (rng.random((48, 64, 3), np.float32) * 1.2 - 0.1).astype(np.float32)
    results = []
    for band_pixels in (1, 64 * 5, 10**9):
        monkeypatch.setattr("service.imaging.composing.COMPOSE_BAND_PIXELS", band_pixels)
        results.append(compose(decoded, rgb_out))
    for pixels in results[:2]:
        np.testing.assert_array_equal(pixels, results[-1])
    top = 65535 if decoded.bits == 16 else 255
    colour = rgb_out @ np.array([0.299, 0.587, 0.114], np.float32) if decoded.grey else rgb_out
    expected = np.clip(np.rint(colour * np.float32(top)), 0, top).reshape(48, 64, -1)
    np.testing.assert_allclose(results[-1][..., : expected.shape[2]], expected, atol=1)
    assert results[-1].shape[2] == expected.shape[2] + (decoded.alpha is not None)


def test_encode_png_streams_in_chunks() -> None:
    pixels = np.random.default_rng(5).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    chunks = list(
        encode_png(pixels, icc_profile=None, compress_level=1, chunk_bytes=8192, piece_bytes=1)
    )
    assert chunks[0].startswith(b"\x89PNG\r\n\x1a\n") and chunks[0][12:16] == b"IHDR"
    assert len(chunks) > 5 and all(c[4:8] == b"IDAT" for c in chunks[1:-1])
    assert chunks[-1].endswith(_png_chunk(b"IEND", b""))
    # by default, after the header and the first IDAT, pieces gather half a megabyte
    # (each costs the server a thread hop and a socket write), the same bytes
    big = np.random.default_rng(6).integers(0, 256, (1000, 700, 3), dtype=np.uint8)
    for threads in (1, 4):
        pieces = list(encode_png(big, threads=threads))
        assert len(pieces) >= 5 and all(len(p) >= PNG_PIECE_BYTES for p in pieces[2:-1])
        assert b"".join(pieces) == b"".join(encode_png(big, threads=threads, piece_bytes=1))
    for level in (0, 1, 9):
        with Image.open(io.BytesIO(b"".join(encode_png(pixels, compress_level=level)))) as png:
            np.testing.assert_array_equal(np.asarray(png), pixels)
    with pytest.raises(ValueError):
        encode_png(pixels, compress_level=10)  # checked at the call, not at the first chunk
    with pytest.raises(ValueError):
        encode_png(pixels.astype(np.float32))


def test_encode_png_takes_pillow_images() -> None:
    words = _words((5, 7))
    images = [
        Image.fromarray(_rgb()),
        Image.fromarray(np.concatenate([_rgb(), _alpha_ramp()[..., None]], -1)),
        Image.fromarray(_rgb()[..., 0]),
        Image.fromarray(words),
    ]
    for im in images:
        with Image.open(io.BytesIO(b"".join(encode_png(im)))) as png:
            assert png.mode == im.mode
            np.testing.assert_array_equal(np.asarray(png), np.asarray(im))
    with pytest.raises(ValueError, match="CMYK"):
        encode_png(Image.new("CMYK", (2, 2)))


# --------------------------------------------------------------------------- real images


def test_set14_and_set5_images_decode_as_pillow_reads_them(datasets_dir: Path) -> None:
    for path, grey in (
        (datasets_dir / "Set14/HR/bridge.png", True),
        (datasets_dir / "Set5/HR/baby.bmp", False),
    ):
        decoded = decode(path.read_bytes(), None, max_pixels=4096 * 4096)
        assert decoded.grey == grey
        with Image.open(path) as im:
            expected = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(_as_ints(decoded.rgb, 8), expected)
        with Image.open(io.BytesIO(_png_out(decoded, decoded.rgb))) as out:
            assert out.mode == ("L" if grey else "RGB")
