"""Decode uploaded images into colour planes for the network, and encode its output as PNG.

Plain Python, Pillow and numpy; the HTTP layer maps the `ImageError` subclasses below to
their `status` with a JSON problem body, and counts them by `reason`.

Policy (what a client can rely on):

* **Formats.** PNG, JPEG, WebP, BMP and TIFF. The format is always taken from the bytes
  (magic numbers), never from the content type alone:

  - a missing content type, an empty one or ``application/octet-stream``: the bytes decide;
  - a content type outside the allow-list (``image/gif``, ``text/plain``, ...): 415, whatever
    the bytes are;
  - an allowed content type over bytes of *another allowed* format (a PNG sent as
    ``image/jpeg``): accepted and decoded as what the bytes are. Mislabelled files are common
    and the label changes nothing we do;
  - bytes of a known format outside the allow-list (GIF, AVIF/HEIF, JPEG 2000, ...): 415,
    whatever the content type says;
  - bytes that are no image we recognise (a text file sent as ``image/png``): 400
    ``undecodable``: the type is fine, the body is not an instance of it.

  Accepted aliases: ``image/jpg``, ``image/pjpeg``, ``image/x-png``, ``image/x-ms-bmp``.
* **GIF** is refused with 415 ``unsupported_type`` (still or animated).
* **Animations** (an animated WebP or APNG with more than one frame) are refused with 415
  ``animated``: their frames are equals, and quietly upscaling only the first would hand back
  something other than what was sent. A JPEG's extra MPO images (stereo pairs, depth maps)
  and a TIFF's later pages (thumbnails, further scanned pages) are not animations: the first
  image is the primary one and is the one used.
* **Size.** The pixel count is read from the header and checked against ``max_pixels``
  before any pixel is decoded (413 ``too_many_pixels``). Pillow's own guard,
  ``PIL.Image.MAX_IMAGE_PIXELS``, is honoured too: above it (warning range) or above twice it
  (Pillow's ``DecompressionBombError``) the image is refused with 413
  ``decompression_bomb``. So the effective limit is the smaller of the two; raise
  ``MAX_IMAGE_PIXELS`` at start-up if ``max_pixels`` is meant to exceed it. Pillow still
  emits its ``DecompressionBombWarning`` in the warning range: the process-wide warning
  filters are not touched, as decoding runs in worker threads.
* **Damage.** Empty (400 ``empty``), truncated or corrupt data (400 ``undecodable``) never
  yield a partly grey image: Pillow's ``LOAD_TRUNCATED_IMAGES`` must stay False (decoding
  refuses to run if something set it) and every image is fully loaded inside the guard.
  What Pillow lets through is checked here: a PNG chunk that fails its CRC, or image data
  that inflates to fewer rows than the header declares; a JPEG whose scan data is too short
  to code the size its header declares (a bit per block at least; refused before decoding);
  and a JPEG scan that ends early, its end marker put back (libjpeg warns and fills the rest
  grey, Pillow drops the warning), found by a second decode with random bytes before each
  closing marker: skipped after a whole segment, read as data in a short one. Corrupt JPEG
  data that still codes every block decodes as the garbled picture it is, as browsers do.
* **Orientation.** EXIF orientation (JPEG, PNG eXIf, WebP, TIFF) is applied, so the planes
  are upright; no EXIF is carried to the output, the tag included. Unparsable EXIF is
  ignored, as browsers do.
* **Colour.** Greyscale (1-bit, L, LA, 16-bit grey) is flagged ``grey`` and its plane is
  replicated to three for the network; `compose` turns the output back into grey. Palette
  images become RGB, or RGBA when they carry transparency; a PNG/TIFF colour key (tRNS)
  becomes an alpha plane. CMYK (JPEG) is converted to RGB through its embedded ICC profile
  when it has one (the output is then sRGB and carries no profile), naively otherwise. Other
  ICC profiles are carried over when their colour space matches the output (RGB for colour,
  GRAY for grey), and dropped otherwise. Lab, float and other exotic modes: 415
  ``unsupported_mode``.
* **Depth.** 16-bit PNG (grey, grey+alpha, RGB, RGBA) and 16-bit grey or RGB(A) TIFF are
  decoded losslessly and give 16-bit output. Pillow holds 16-bit colour only as 8-bit
  planes, so for those the image is read twice, once keeping the high byte of each sample
  and once the low byte (a rawmode swap in Pillow's decoder), and the two are joined. Other
  16-bit layouts Pillow does not expose (e.g. 16-bit grey+alpha TIFF) come out at 8 bits,
  reported as ``bits == 8``.
* **Output.** `compose` quantises to the input's depth (round to nearest, clip) and resizes
  alpha separately (bicubic, clipped); `encode_png` streams the PNG in chunks, keeping
  16-bit depth and attaching the ICC profile. PNG row filter: Up (one numpy subtraction;
  measured best size for the time at low zlib levels), None at level 0. Deflate runs on
  ISA-L at levels 1-2 (several times zlib's speed, smaller files), and on several
  threads for large images: bands of rows compressed apart and joined into one zlib
  stream. `encode_lossy` writes JPEG or WebP (8 bits; JPEG never with alpha).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import cached_property
from typing import ClassVar, Literal, Protocol

import numpy as np
from isal import isal_zlib
from PIL import ExifTags, Image, ImageChops, ImageCms, ImageFile, UnidentifiedImageError

__all__ = [
    "ALLOWED_CONTENT_TYPES",
    "ALLOWED_FORMATS",
    "REASONS",
    "DecodedImage",
    "ImageError",
    "ImageTooLarge",
    "UndecodableImage",
    "UnsupportedImageType",
    "adler32_combine",
    "check_output_pixels",
    "compose",
    "decode",
    "encode_lossy",
    "encode_png",
    "output_size",
    "sniff_format",
]

# --------------------------------------------------------------------------- errors

REASONS = (
    "empty",
    "undecodable",
    "unsupported_type",
    "animated",
    "unsupported_mode",
    "too_many_pixels",
    "decompression_bomb",
    "output_too_large",
)
"""Every `ImageError.reason`, for metrics that pre-register their labels."""


class ImageError(Exception):
    """A client's image we will not process; `status` is the HTTP status to answer with."""

    status: ClassVar[int] = 400
    default_reason: ClassVar[str] = "undecodable"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason or self.default_reason
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason {self.reason!r}; add it to REASONS")


class UndecodableImage(ImageError):
    """400: empty, truncated, corrupt, or not an image at all."""

    status = 400
    default_reason = "undecodable"


class UnsupportedImageType(ImageError):
    """415: a content type, format, animation or pixel mode we do not accept."""

    status = 415
    default_reason = "unsupported_type"


class ImageTooLarge(ImageError):
    """413: too many pixels in the input (from its header) or in the requested output."""

    status = 413
    default_reason = "too_many_pixels"


# --------------------------------------------------------------------------- formats

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
"""Pillow format names we decode."""

ALLOWED_CONTENT_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
}
_CONTENT_TYPE_ALIASES = {
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/x-png": "PNG",
    "image/x-ms-bmp": "BMP",
}
_SNIFF_FROM_BYTES = ("", "application/octet-stream")


def _media_type(content_type: str | None) -> str:
    """'Image/PNG; charset=binary' -> 'image/png'."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def sniff_format(data: bytes) -> str | None:
    """The format named by the bytes' signature: an allowed Pillow name, another known
    format's name (refused), or None when the bytes carry no signature we know."""
    head = data[:32]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[4:8] == b"ftyp":
        return "AVIF/HEIF"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    if head.startswith((b"\x00\x00\x00\x0cJXL \r\n\x87\n", b"\xff\x0a")):
        return "JPEG XL"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return "ICO"
    for magic, name in ((b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"qoif", "QOI"), (b"DDS ", "DDS")):
        if head.startswith(magic):
            return name
    return None


def _resolve_format(data: bytes, content_type: str | None) -> str:
    declared = _media_type(content_type)
    if declared not in _SNIFF_FROM_BYTES and (
        declared not in ALLOWED_CONTENT_TYPES and declared not in _CONTENT_TYPE_ALIASES
    ):
        raise UnsupportedImageType(
            f"content type {declared!r} is not accepted; "
            f"send one of {', '.join(ALLOWED_CONTENT_TYPES)}"
        )
    found = sniff_format(data)
    if found in ALLOWED_FORMATS:
        return found
    if found is not None:
        raise UnsupportedImageType(
            f"{found} images are not accepted; send one of {', '.join(ALLOWED_FORMATS)}"
        )
    said = f" (sent as {declared})" if declared not in _SNIFF_FROM_BYTES else ""
    raise UndecodableImage(f"the body is not a PNG, JPEG, WebP, BMP or TIFF image{said}")


# --------------------------------------------------------------------------- decode


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """An upright input image as the network and `compose` need it."""

    pixels: np.ndarray
    """uint8 or uint16 (`bits`) HxWx3, as decoded and oriented; a grey image's plane
    replicated three times. What the engine uploads: it normalises on the device."""
    alpha: np.ndarray | None
    """float32 HxW in [0, 1], or None when the input has no transparency."""
    grey: bool
    bits: int
    """8 or 16: the depth of the output `compose` builds."""
    icc_profile: bytes | None
    """To attach to the output; only kept when it matches the output's colour space."""
    format: str
    """The input's format: one of `ALLOWED_FORMATS`."""

    @cached_property
    def rgb(self) -> np.ndarray:
        """float32 HxWx3 in [0, 1] (`pixels` / 255 or / 65535), made on first use."""
        return _unit_float(self.pixels, self.bits)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


# Pillow's decode errors: open() wraps most into UnidentifiedImageError (an OSError); load()
# raises OSError ("image file is truncated", "broken data stream"), SyntaxError, ValueError,
# EOFError, struct.error or zlib.error from the plugins.
_PILLOW_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


@contextmanager
def _pillow_errors(fmt: str) -> Iterator[None]:
    """Turn what Pillow raises on hostile or broken input into our 400 / 413 errors."""
    try:
        yield
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e), reason="decompression_bomb") from e
    except UnidentifiedImageError as e:
        raise UndecodableImage(f"not a readable {fmt} image") from e
    except (*_PILLOW_DECODE_ERRORS, zlib.error) as e:
        raise UndecodableImage(f"cannot decode the {fmt} image: {e}") from e


def _open(data: bytes, fmt: str) -> ImageFile.ImageFile:
    return Image.open(io.BytesIO(data), formats=[fmt])


def _webp_canvas_size(data: bytes) -> tuple[int, int]:
    """Width and height from a WebP's first chunk (VP8, VP8L or VP8X), without decoding.

    Needed before `Image.open`: Pillow's WebP plugin creates libwebp's decoder, which
    allocates the whole canvas, while opening.
    """
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        return width, int.from_bytes(data[27:30], "little") + 1
    raise UndecodableImage("the WebP header carries no image size")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise UndecodableImage(f"the image header declares an empty size {width}x{height}")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {pixels} pixels; the limit is {max_pixels}",
            reason="too_many_pixels",
        )
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is not None and pixels > pillow_limit:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {pixels} pixels, over Pillow's "
            f"decompression-bomb limit of {pillow_limit}",
            reason="decompression_bomb",
        )


def _check_single_frame(im: ImageFile.ImageFile, fmt: str) -> None:
    if fmt not in ("PNG", "WEBP"):
        return  # JPEG (MPO) and TIFF: the first image is used; no need to walk the rest
    frames = int(getattr(im, "n_frames", 1))  # from APNG's acTL / libwebp's header
    if frames > 1:
        raise UnsupportedImageType(
            f"animated {fmt} images ({frames} frames) are not accepted; send one frame",
            reason="animated",
        )


# Rawmodes of 16-bit colour samples that Pillow narrows to 8 bits, and the rawmode that
# reads the *other* byte of each sample (the low one) through the same decoder.
_NATIVE = "L" if sys.byteorder == "little" else "B"
_LOW_BYTE_RAWMODE = {
    f"{m};16{e}": f"{m};16{other}"
    for m in ("RGB", "RGBA")
    for e, other in (("B", "L"), ("L", "B"), ("N", "B" if _NATIVE == "L" else "L"))
}


def _tile_rawmode(tile: ImageFile._Tile) -> str | None:
    args = tile.args
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _with_rawmode(tile: ImageFile._Tile, rawmode: str) -> ImageFile._Tile:
    args = tile.args
    if isinstance(args, tuple):
        return tile._replace(args=(rawmode, *args[1:]))
    return tile._replace(args=rawmode)


def _load_with_rawmode(im: ImageFile.ImageFile, rawmode: str) -> np.ndarray:
    im.tile = [_with_rawmode(t, rawmode) for t in im.tile]
    im.load()
    return np.asarray(im)


@dataclass
class _Planes:
    """Integer planes straight from the file: colour HxWx(1|3), alpha HxW or None."""

    colour: np.ndarray
    alpha: np.ndarray | None
    bits: int


def _read_wide_colour(im: ImageFile.ImageFile, data: bytes, fmt: str) -> _Planes | None:
    """16-bit colour PNG/TIFF, read losslessly, loading `im`; None (and `im` untouched)
    when it is not such an image."""
    rawmodes = {_tile_rawmode(t) for t in im.tile}
    if len(rawmodes) != 1:
        return None
    (rawmode,) = rawmodes
    if rawmode == "LA;16B" and im.mode == "RGBA":
        # 16-bit grey+alpha PNG: Pillow widens it to RGBA; read the raw 4 bytes per pixel.
        raw = _load_with_rawmode(im, "RGBA").astype(np.uint16)
        words = (raw[..., 0::2] << 8) | raw[..., 1::2]
        return _Planes(np.ascontiguousarray(words[..., :1]), words[..., 1].copy(), 16)
    if rawmode is None or rawmode not in _LOW_BYTE_RAWMODE:
        return None
    high = _load_with_rawmode(im, rawmode).astype(np.uint16)
    with _open(data, fmt) as again:
        low = _load_with_rawmode(again, _LOW_BYTE_RAWMODE[rawmode])
    words = (high << 8) | low
    colour = np.ascontiguousarray(words[..., :3])
    alpha = words[..., 3].copy() if im.mode == "RGBA" else _colour_key_alpha(im, colour)
    return _Planes(colour, alpha, 16)


def _colour_key_alpha(im: Image.Image, colour: np.ndarray) -> np.ndarray | None:
    """A tRNS colour key (PNG/TIFF 'transparency' of an L, I;16 or RGB image) as alpha."""
    key = im.info.get("transparency")
    if key is None or isinstance(key, bytes):
        return None
    key_values = np.asarray(key if isinstance(key, tuple) else (key,), dtype=np.int64)
    top = np.iinfo(colour.dtype).max
    if key_values.size != colour.shape[2] or key_values.min() < 0 or key_values.max() > top:
        return None
    transparent = np.all(colour == key_values.astype(colour.dtype), axis=2)
    return np.where(transparent, 0, top).astype(colour.dtype)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    profile = im.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(
                im, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
        except (ImageCms.PyCMSError, OSError, ValueError):
            converted = None  # an unusable profile: fall back to Pillow's plain formula
        if converted is not None:
            return converted
    return im.convert("RGB")


def _read_planes(im: ImageFile.ImageFile) -> _Planes:
    """8-bit planes (or 16-bit grey) of a loaded image, whatever Pillow's mode."""
    mode = im.mode
    img: Image.Image = im
    if mode == "1":
        img = im.convert("L")
    elif mode == "P":
        img = im.convert("RGBA" if im.has_transparency_data else "RGB")
    elif mode in ("PA", "RGBa"):
        img = im.convert("RGBA")
    elif mode == "La":
        img = im.convert("LA")
    elif mode in ("RGBX", "YCbCr"):
        img = im.convert("RGB")
    elif mode == "CMYK":
        img = _cmyk_to_rgb(im)
    mode = img.mode

    if mode in ("L", "RGB"):
        colour = np.asarray(img).reshape(img.height, img.width, -1)
        return _Planes(colour, _colour_key_alpha(img, colour), 8)
    if mode in ("LA", "RGBA"):
        arr = np.asarray(img)
        return _Planes(np.ascontiguousarray(arr[..., :-1]), arr[..., -1].copy(), 8)
    if mode.startswith("I;16"):
        colour = np.asarray(img).astype(np.uint16).reshape(img.height, img.width, 1)
        return _Planes(colour, _colour_key_alpha(img, colour), 16)
    if mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImageType(
                "32-bit integer samples outside 0..65535 are not supported",
                reason="unsupported_mode",
            )
        colour = values.astype(np.uint16).reshape(img.height, img.width, 1)
        return _Planes(colour, _colour_key_alpha(img, colour), 16)
    raise UnsupportedImageType(
        f"pixel mode {mode!r} is not supported; send RGB, RGBA, grey or CMYK",
        reason="unsupported_mode",
    )


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except (*_PILLOW_DECODE_ERRORS, KeyError, TypeError):
        return 1  # unparsable EXIF: ignored, as browsers do
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to an HxW(xC) array (as Pillow's exif_transpose does)."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return arr[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


def _icc_for_output(profile: object, grey: bool) -> bytes | None:
    """Keep an ICC profile only if its colour space (header bytes 16..20) fits the output."""
    if not isinstance(profile, bytes) or len(profile) < 128:
        return None
    return profile if profile[16:20] == (b"GRAY" if grey else b"RGB ") else None


def _unit_float(arr: np.ndarray, bits: int) -> np.ndarray:
    # divide (not multiply by the reciprocal): bit-identical to the evaluation's `x / 255`
    scaled = arr.astype(np.float32, order="C")
    scaled /= np.float32(65535.0 if bits == 16 else 255.0)
    return scaled


# --------------------------------------------------------------------------- integrity
#
# Pillow decodes some damaged files without a word: libjpeg only *warns* when a scan's data
# ends early (it fills the rest with flat grey blocks) and Pillow drops its warnings; the
# PNG plugin skips IDAT CRCs, and a zlib stream that ends rows early leaves them black.
# These checks refuse such files; they read the bytes, never trust the header alone.

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7: (first column, first row, column step, row step) of each pass
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def _png_row_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of filtered rows (each with its filter byte) that a width x height PNG inflates to."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if cols > 0 and rows > 0:
            total += rows * (1 + -(-cols * bits_per_pixel // 8))
    return total


def _check_png_whole(data: bytes) -> None:
    """Refuse a PNG with a chunk that fails its CRC, or whose image data inflates to fewer
    rows than its header declares. Called after the pixel limit, so the inflate is bounded."""
    view = memoryview(data)
    pos, header, idat = 8, None, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            break  # cut inside a chunk: the size check below, or Pillow, refuses it
        body = view[pos + 8 : end - 4]
        if zlib.crc32(view[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            name = kind.decode("latin-1")
            raise UndecodableImage(f"the PNG's {name} chunk fails its CRC check: damaged data")
        if kind == b"IHDR" and length == 13:
            header = struct.unpack_from(">IIBBBBB", data, pos + 8)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos = end
    if header is None:
        return  # no usable header: Pillow has refused it, or will
    width, height, depth, colour_type, _, _, interlace = header
    if colour_type not in _PNG_CHANNELS:
        return
    expected = _png_row_bytes(width, height, depth * _PNG_CHANNELS[colour_type], interlace == 1)
    inflater, produced = zlib.decompressobj(), 0
    try:
        for piece in idat:
            tail: bytes | memoryview = piece
            while tail and produced < expected and not inflater.eof:
                produced += len(inflater.decompress(tail, 1 << 20))
                tail = inflater.unconsumed_tail
    except zlib.error as e:
        raise UndecodableImage(f"cannot decode the PNG image: {e}") from e
    if produced < expected:
        raise UndecodableImage(
            f"the PNG's image data ends early: {produced} of the {expected} bytes its "
            f"{width}x{height} header needs"
        )


# SOF markers of the Huffman-coded DCT processes (baseline, extended, progressive), for
# which every block costs at least a bit; arithmetic and lossless JPEGs have no such floor.
_HUFFMAN_DCT_FRAMES = {0xC0: False, 0xC1: False, 0xC2: True}  # marker -> progressive
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JUNK_BYTES = 32


@dataclass
class _JpegLayout:
    """What the probe and the size floor need from a JPEG's markers (its first image)."""

    segment_ends: list[int]
    """Offsets where entropy-coded segments end: each scan's end and each restart marker."""
    min_scan_bits: int
    """Fewest bits of scan data that can code every block the frame declares; 0: no floor."""
    scan_bytes: int


def _jpeg_layout(data: bytes) -> _JpegLayout:
    """Walk the markers of the first image (an MPO's later images are not read)."""
    ends: list[int] = []
    frame: tuple[int, int, int, dict[int, tuple[int, int]]] | None = None
    need_bits, scan_bytes, pos = 0, 0, 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # stand-alone markers
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            break
        if marker in _FRAME_MARKERS and len(body) >= 6 and frame is None:
            height, width, count = struct.unpack_from(">HHB", body, 1)
            sampling = {
                body[6 + 3 * i]: (body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15)
                for i in range(count)
                if len(body) >= 9 + 3 * i
            }
            frame = (marker, width, height, sampling)
        pos += 2 + length
        if marker != 0xDA:  # SOS: its entropy-coded data follows
            continue
        start = pos
        pos = _segment_end(data, pos)
        while pos < len(data):
            ends.append(pos)
            pos = _skip_fill(data, pos)
            if not 0xD0 <= data[pos + 1] <= 0xD7:  # not a restart marker: the scan is over
                break
            pos = _segment_end(data, pos + 2)
        scan_bytes += pos - start
        need_bits += _scan_floor_bits(frame, body)
    return _JpegLayout(ends, need_bits, scan_bytes)


def _segment_end(data: bytes, pos: int) -> int:
    """Where the entropy-coded data from `pos` ends: at a marker's first byte (fill bytes
    0xFF included; FF 00 is a data byte), or at the end of the data."""
    while (pos := data.find(b"\xff", pos)) != -1:
        after = _skip_fill(data, pos) + 1
        if after >= len(data):
            break
        if data[after] != 0:
            return pos
        pos = after + 1
    return len(data)


def _skip_fill(data: bytes, pos: int) -> int:
    """The last 0xFF of the run that starts at `pos`."""
    while pos + 1 < len(data) and data[pos + 1] == 0xFF:
        pos += 1
    return pos


def _scan_floor_bits(
    frame: tuple[int, int, int, dict[int, tuple[int, int]]] | None, sos: bytes
) -> int:
    """Fewest bits a Huffman scan can spend on its blocks: a sequential scan codes a DC and
    at least one AC symbol (an end of block) per block, a progressive first DC scan one
    symbol per block; other progressive scans can skip blocks in runs (no floor)."""
    if frame is None or frame[0] not in _HUFFMAN_DCT_FRAMES or len(sos) < 4:
        return 0
    marker, width, height, sampling = frame
    ids = [sos[1 + 2 * i] for i in range(sos[0]) if 2 + 2 * i < len(sos)]
    if not sampling or any(i not in sampling for i in ids):
        return 0
    first_dc = sos[-3] == 0 and sos[-1] >> 4 == 0  # Ss = 0 and Ah = 0
    per_block = (1 if first_dc else 0) if _HUFFMAN_DCT_FRAMES[marker] else 2
    h_max = max(h for h, _ in sampling.values()) or 1
    v_max = max(v for _, v in sampling.values()) or 1
    blocks = 0
    for i in ids:
        h, v = sampling[i]
        cols, rows = -(-width * h // h_max), -(-height * v // v_max)
        blocks += -(-cols // 8) * -(-rows // 8)
    return per_block * blocks


def _check_jpeg_scan_size(layout: _JpegLayout, size: tuple[int, int]) -> None:
    """Refuse, before decoding, a JPEG whose scan data cannot cover the size it declares."""
    if layout.min_scan_bits > 8 * layout.scan_bytes:
        width, height = size
        raise UndecodableImage(
            f"the JPEG's scan data ({layout.scan_bytes} bytes) is too short for the "
            f"{width}x{height} its header declares (at least {layout.min_scan_bits // 8} bytes)"
        )


def _check_jpeg_whole(im: Image.Image, data: bytes, layout: _JpegLayout, fmt: str) -> None:
    """Refuse a JPEG one of whose entropy-coded segments ends before its blocks do.

    libjpeg meets the marker early, warns (Pillow drops the warning) and fills the missing
    blocks with flat grey. So decode again with random bytes put before each segment's
    closing marker: after a whole segment the decoder skips them, unread; in a short one
    it reads them as data, and the picture changes.
    """
    if not layout.segment_ends:
        return
    pieces, last = [], 0
    for end in layout.segment_ends:
        pieces += [data[last:end], bytes(b % 0xFF for b in os.urandom(_JUNK_BYTES))]
        last = end
    pieces.append(data[last:])
    with _open(b"".join(pieces), fmt) as probe:
        probe.load()
        if probe.mode != im.mode or ImageChops.difference(probe, im).getbbox() is not None:
            raise UndecodableImage(
                "the JPEG's scan data ends before its last blocks (truncated or corrupt): "
                "decoding it would give grey blocks"
            )


def decode(data: bytes, content_type: str | None, *, max_pixels: int) -> DecodedImage:
    """Decode an uploaded image, refusing what we do not accept (see the module docstring).

    Raises `UndecodableImage` (400), `UnsupportedImageType` (415) or `ImageTooLarge` (413).
    The pixel limit is checked from the header, before any pixel is decoded.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated uploads would decode "
            "as partly grey images; something in this process set it, unset it"
        )
    if not data:
        raise UndecodableImage("the request body is empty", reason="empty")
    fmt = _resolve_format(data, content_type)
    if fmt == "WEBP":
        _check_pixels(_webp_canvas_size(data), max_pixels)

    with _pillow_errors(fmt):
        im = _open(data, fmt)
    with im:
        _check_pixels(im.size, max_pixels)
        _check_single_frame(im, fmt)
        layout = None
        if fmt == "PNG":
            _check_png_whole(data)
        elif fmt == "JPEG":
            layout = _jpeg_layout(data)
            _check_jpeg_scan_size(layout, im.size)
        with _pillow_errors(fmt):
            planes = _read_wide_colour(im, data, fmt)
            if planes is None:
                im.load()
                if layout is not None:
                    _check_jpeg_whole(im, data, layout, fmt)
                planes = _read_planes(im)
            orientation = _exif_orientation(im)
        source_profile = im.info.get("icc_profile")
        converted_cmyk = im.mode == "CMYK"

    grey = planes.colour.shape[2] == 1
    colour = _orient(planes.colour, orientation)
    alpha = None if planes.alpha is None else _orient(planes.alpha, orientation)
    return DecodedImage(
        pixels=np.repeat(colour, 3, axis=2) if grey else np.ascontiguousarray(colour),
        alpha=None if alpha is None else _unit_float(alpha, planes.bits),
        grey=grey,
        bits=planes.bits,
        icc_profile=None if converted_cmyk else _icc_for_output(source_profile, grey),
        format=fmt,
    )


# --------------------------------------------------------------------------- sizes


def output_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(round(s·H), round(s·W)) with halves rounded up, the scale read as the decimal the
    client wrote: 2.3 x 25 = 57.5 → 58 (float arithmetic would give 57.49999… → 57)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    s = Decimal(repr(float(scale)))
    if not s.is_finite() or s <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    out_h, out_w = (int((s * n).to_integral_value(rounding=ROUND_HALF_UP)) for n in (height, width))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"scale {scale} makes {height}x{width} empty")
    return out_h, out_w


def check_output_pixels(height: int, width: int, max_output_pixels: int) -> None:
    """Refuse (413 ``output_too_large``) an output over the pixel budget, before any work."""
    if height * width > max_output_pixels:
        raise ImageTooLarge(
            f"the output would be {width}x{height} = {height * width} pixels; "
            f"the limit is {max_output_pixels}",
            reason="output_too_large",
        )


# --------------------------------------------------------------------------- compose


def _quantise(unit: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] floats to uint8/uint16: rounded as the evaluation rounds (`np.round` of
    x * 255; adding 0.5 in float32 would carry x.4999… up), then clipped."""
    top = 65535.0 if bits == 16 else 255.0
    scaled = unit * np.float32(top)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0.0, top, out=scaled)
    return scaled.astype(np.uint16 if bits == 16 else np.uint8)


def _resize_alpha(alpha: np.ndarray, height: int, width: int) -> np.ndarray:
    if alpha.shape == (height, width):
        return alpha
    plane = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.float32))
    resized = np.asarray(plane.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    clipped: np.ndarray = np.clip(resized, 0.0, 1.0)
    return clipped


# pixels quantised at a time: compose's float temporaries stay ~3 MB, not 12 B a pixel
COMPOSE_BAND_PIXELS = 1 << 18


def compose(decoded: DecodedImage, rgb_out: np.ndarray) -> np.ndarray:
    """The output pixels at `rgb_out`'s size, in the input's kind and depth.

    `rgb_out` is either what the engine returns, already quantised on the device
    (uint8/uint16 as `decoded.bits`, H'xW'x1 for a grey input, else H'xW'x3), or the
    network's H'xW'x3 float output in [0, 1], quantised here as the engine does it
    (`np.rint` of x * 255, then clipped). Returns uint8 or uint16 (`decoded.bits`),
    H'xW'xC with C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA: grey inputs come back grey
    (BT.601 luma of the three planes), alpha is resized on its own (bicubic, clipped)
    and re-attached. Float input is quantised a band of rows at a time, straight into
    the result, so a large output costs its integer pixels and little more.
    """
    if rgb_out.dtype.kind in "ui":
        return _attach_alpha(decoded, rgb_out)
    if rgb_out.ndim != 3 or rgb_out.shape[2] != 3 or rgb_out.dtype.kind != "f":
        raise ValueError(f"rgb_out must be float HxWx3, got {rgb_out.dtype} {rgb_out.shape}")
    if not np.isfinite(np.sum(rgb_out, dtype=np.float64)):
        raise ValueError("rgb_out holds NaN or infinite values")
    height, width = int(rgb_out.shape[0]), int(rgb_out.shape[1])
    alpha = None if decoded.alpha is None else _resize_alpha(decoded.alpha, height, width)
    channels = (1 if decoded.grey else 3) + (alpha is not None)
    out = np.empty((height, width, channels), np.uint16 if decoded.bits == 16 else np.uint8)
    rows = max(1, COMPOSE_BAND_PIXELS // width)
    for top in range(0, height, rows):
        band = slice(top, top + rows)
        rgb = rgb_out[band].astype(np.float32, copy=False)
        if decoded.grey:
            luma = rgb[..., 0] * np.float32(0.299)
            luma += rgb[..., 1] * np.float32(0.587)
            luma += rgb[..., 2] * np.float32(0.114)
            out[band, :, 0] = _quantise(luma, decoded.bits)
        else:
            out[band, :, :3] = _quantise(rgb, decoded.bits)
        if alpha is not None:
            out[band, :, -1] = _quantise(alpha[band], decoded.bits)
    return out


def _attach_alpha(decoded: DecodedImage, quantised: np.ndarray) -> np.ndarray:
    """The engine's quantised output with the input's alpha (resized) re-attached."""
    dtype = np.uint16 if decoded.bits == 16 else np.uint8
    planes = 1 if decoded.grey else 3
    if quantised.ndim != 3 or quantised.shape[2] != planes or quantised.dtype != dtype:
        raise ValueError(
            f"quantised output must be {np.dtype(dtype).name} HxWx{planes} for this input, "
            f"got {quantised.dtype} {quantised.shape}"
        )
    if decoded.alpha is None:
        return quantised
    height, width = int(quantised.shape[0]), int(quantised.shape[1])
    alpha = _resize_alpha(decoded.alpha, height, width)
    out = np.empty((height, width, planes + 1), dtype)
    out[..., :planes] = quantised
    rows = max(1, COMPOSE_BAND_PIXELS // width)
    for top in range(0, height, rows):
        out[top : top + rows, :, -1] = _quantise(alpha[top : top + rows], decoded.bits)
    return out


# --------------------------------------------------------------------------- encode

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type
_FILTER_NONE, _FILTER_UP = 0, 2


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    # ISA-L's CRC-32: the same values as zlib's, a tenth of its time on a 4K image's IDAT
    crc = isal_zlib.crc32(payload, isal_zlib.crc32(kind))
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _pixel_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWxC uint8/uint16 from `compose`'s output or a Pillow image."""
    if isinstance(image, Image.Image):
        if image.mode.startswith("I;16"):
            arr = np.asarray(image).astype(np.uint16)
        elif image.mode in ("L", "LA", "RGB", "RGBA"):
            arr = np.asarray(image)
        else:
            raise ValueError(f"cannot write a PNG from Pillow mode {image.mode!r}")
    else:
        arr = image
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in _COLOUR_TYPE or arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected uint8/uint16 HxWx(1..4) pixels, got {arr.dtype} {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"cannot write an empty {arr.shape[0]}x{arr.shape[1]} PNG")
    return arr


ISAL_LEVELS = (1, 2)
"""zlib levels whose deflate runs on ISA-L (`isal`), same level: on a 4K photo's filtered
rows, ISA-L 1 took 0.18× zlib 1's time for 4 % fewer bytes, ISA-L 2 0.22× zlib 2's for
1 % fewer (docs/benchmarks.md). Level 0 (stored) and 3..9 (smaller files, slower:
ISA-L's own level 3 came out larger than its 2 there) stay on zlib."""

Deflate = Literal["auto", "zlib", "isal"]


class _Compressor(Protocol):
    def compress(self, data: bytes | memoryview, /) -> bytes: ...
    def flush(self, mode: int = ..., /) -> bytes: ...


def _compressobj(level: int, deflate: Deflate, wbits: int = zlib.MAX_WBITS) -> _Compressor:
    """A deflate compressor: ISA-L for `ISAL_LEVELS` under "auto", else as `deflate` says."""
    if deflate == "isal" or (deflate == "auto" and level in ISAL_LEVELS):
        return isal_zlib.compressobj(level, isal_zlib.DEFLATED, wbits)
    return zlib.compressobj(level, zlib.DEFLATED, wbits)


PNG_BAND_BYTES = 1 << 18
"""Raw bytes of rows per band that one thread compresses, in the parallel PNG encoder.

Each band starts with an empty deflate window, which costs a little size at every
boundary; a quarter of a megabyte keeps that under 1 % while a 1024² RGB output still
splits into 12 bands."""


def encode_png(
    image: Image.Image | np.ndarray,
    *,
    icc_profile: bytes | None = None,
    compress_level: int = 1,
    chunk_bytes: int = 1 << 16,
    threads: int = 1,
    band_bytes: int = PNG_BAND_BYTES,
    deflate: Deflate = "auto",
) -> Iterator[bytes]:
    """PNG bytes in pieces, for a streamed response: the header first, then IDAT chunks of
    about `chunk_bytes` as the rows are compressed, then IEND.

    Keeps 16-bit depth; writes `icc_profile` as an iCCP chunk. `compress_level` is zlib's
    0..9: 0 stores rows unfiltered; above it rows get PNG's Up filter. With `threads` > 1
    and more than one band of `band_bytes`, bands of rows are compressed in parallel
    (`_png_stream_banded`); the pixels are the same either way. `deflate` picks the
    library: "auto" is ISA-L at `ISAL_LEVELS` and zlib otherwise; "isal" takes levels 1..3.
    The arguments are checked now; the work happens as the iterator is consumed.
    """
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be 0..9, got {compress_level}")
    if deflate == "isal" and not 1 <= compress_level <= 3:
        raise ValueError(f"ISA-L compresses at levels 1..3, got {compress_level}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    pixels = _pixel_array(image)
    chunk_bytes, band_bytes = max(1, chunk_bytes), max(1, band_bytes)
    if threads > 1 and pixels.nbytes > band_bytes:
        return _png_stream_banded(
            pixels, icc_profile, compress_level, chunk_bytes, threads, band_bytes, deflate
        )
    return _png_stream(pixels, icc_profile, compress_level, chunk_bytes, deflate)


def _png_head(pixels: np.ndarray, icc_profile: bytes | None) -> bytes:
    height, width, channels = pixels.shape
    depth = 16 if pixels.dtype == np.uint16 else 8
    ihdr = struct.pack(">IIBBBBB", width, height, depth, _COLOUR_TYPE[channels], 0, 0, 0)
    head = _PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr)
    if icc_profile:
        head += _png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile))
    return head


def _png_rows(pixels: np.ndarray) -> np.ndarray:
    """The image as PNG's raw rows: H x (W·C·bytes) uint8, 16-bit samples big-endian."""
    rows = pixels.astype(">u2", copy=False) if pixels.dtype == np.uint16 else pixels
    return np.ascontiguousarray(rows).view(np.uint8).reshape(pixels.shape[0], -1)


def _filter_rows(flat: np.ndarray, top: int, stop: int, level: int) -> np.ndarray:
    """Rows top..stop-1 with their filter byte: None at level 0, else Up (each byte minus
    the one above it, modulo 256; the row above the image is zeros)."""
    band = flat[top:stop]
    filtered = np.empty((band.shape[0], flat.shape[1] + 1), np.uint8)
    if level == 0:
        filtered[:, 0] = _FILTER_NONE
        filtered[:, 1:] = band
        return filtered
    filtered[:, 0] = _FILTER_UP
    if top == 0:
        filtered[0, 1:] = band[0]
    else:
        np.subtract(band[0], flat[top - 1], out=filtered[0, 1:])
    np.subtract(band[1:], band[:-1], out=filtered[1:, 1:])
    return filtered


def _idat_chunks(pending: bytearray, chunk_bytes: int, *, everything: bool) -> Iterator[bytes]:
    """IDAT chunks of `chunk_bytes` cut from the front of `pending` (all of it when
    `everything`, the last one shorter)."""
    while len(pending) >= chunk_bytes or (everything and pending):
        yield _png_chunk(b"IDAT", bytes(pending[:chunk_bytes]))
        del pending[:chunk_bytes]


def _png_stream(
    pixels: np.ndarray,
    icc_profile: bytes | None,
    level: int,
    chunk_bytes: int,
    deflate: Deflate = "auto",
) -> Iterator[bytes]:
    """One zlib stream, compressed on the consumer's thread as it reads."""
    yield _png_head(pixels, icc_profile)
    flat = _png_rows(pixels)
    height = flat.shape[0]
    band_rows = max(1, chunk_bytes // flat.shape[1])
    compressor = _compressobj(level, deflate)
    pending = bytearray()
    for top in range(0, height, band_rows):
        pending += compressor.compress(_filter_rows(flat, top, top + band_rows, level).data)
        yield from _idat_chunks(pending, chunk_bytes, everything=False)
    pending += compressor.flush()
    yield b"".join(_idat_chunks(pending, chunk_bytes, everything=True)) + _png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------- parallel PNG

_ADLER_BASE = 65521


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """Adler-32 of X + Y from adler32(X), adler32(Y) and len(Y) (zlib's adler32_combine,
    which Python's zlib does not expose).

    With A = 1 + the sum of the bytes and B = the sum of A after each byte:
    A(XY) = A(X) + A(Y) - 1 and B(XY) = B(X) + B(Y) + len(Y)·(A(X) - 1), modulo 65521.
    """
    a1, b1 = first & 0xFFFF, first >> 16
    a2, b2 = second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % _ADLER_BASE
    b = (b1 + b2 + second_length * (a1 - 1)) % _ADLER_BASE
    return (b << 16) | a


@dataclass(frozen=True)
class _Band:
    idat: bytes
    """Whole IDAT chunks (CRCs included) of the band's deflated bytes."""
    adler: int
    length: int


@dataclass(frozen=True)
class _BandJob:
    """What every band of one image shares."""

    flat: np.ndarray
    level: int
    deflate: Deflate
    chunk_bytes: int
    zlib_header: bytes


def _deflate_band(job: _BandJob, top: int, stop: int) -> _Band:
    """One band as raw deflate, ended by a sync flush (byte-aligned, not final) or, for the
    last band, by the final block, framed as IDAT chunks of at most `chunk_bytes` (the
    first band's led by the zlib header). All of it here, on a worker thread: numpy,
    deflate, Adler-32 and CRC-32 release the GIL, and the consumer only passes bytes on."""
    filtered = _filter_rows(job.flat, top, stop, job.level)
    compressor = _compressobj(job.level, job.deflate, -zlib.MAX_WBITS)
    last = stop >= job.flat.shape[0]
    deflated = (job.zlib_header if top == 0 else b"") + compressor.compress(filtered.data)
    deflated += compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    size = job.chunk_bytes
    idat = b"".join(
        _png_chunk(b"IDAT", deflated[i : i + size]) for i in range(0, len(deflated), size)
    )
    return _Band(idat, isal_zlib.adler32(filtered.data), filtered.nbytes)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _encoder_pool(threads: int) -> ThreadPoolExecutor:
    """One process-wide pool per thread count, shared by every response: concurrent
    encodes queue for the same `threads` workers instead of each starting its own."""
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="imdn-png")
        return pool


def _png_stream_banded(
    pixels: np.ndarray,
    icc_profile: bytes | None,
    level: int,
    chunk_bytes: int,
    threads: int,
    band_bytes: int,
    deflate: Deflate = "auto",
) -> Iterator[bytes]:
    """Bands of rows deflated in parallel and joined into one zlib stream.

    Each band is an independent raw deflate stream ended by a sync flush, so their
    concatenation, between zlib's two-byte header and the Adler-32 of all the filtered
    bytes (combined from the bands'), is one valid stream across the IDAT chunks. Each
    band comes framed in its own IDAT chunks; the Adler-32 goes in a last small one. At
    most 2·`threads` bands are in flight, and they are sent in order as they finish: the
    first IDAT leaves once the first band is done, and memory stays a few bands.
    """
    yield _png_head(pixels, icc_profile)
    flat = _png_rows(pixels)
    height = flat.shape[0]
    band_rows = max(1, band_bytes // flat.shape[1])
    zlib_header = _compressobj(level, deflate).flush()[:2]  # CMF and FLG for this level
    job = _BandJob(flat, level, deflate, chunk_bytes, zlib_header)
    pool = _encoder_pool(threads)
    in_flight: deque[Future[_Band]] = deque()
    next_top = 0
    adler = zlib.adler32(b"")
    try:
        while next_top < height or in_flight:
            while next_top < height and len(in_flight) < 2 * threads:
                stop = next_top + band_rows
                in_flight.append(pool.submit(_deflate_band, job, next_top, stop))
                next_top = stop
            band = in_flight.popleft().result()
            adler = adler32_combine(adler, band.adler, band.length)
            yield band.idat
    finally:  # a client that left: drop the bands not started
        for future in in_flight:
            future.cancel()
    yield _png_chunk(b"IDAT", struct.pack(">I", adler)) + _png_chunk(b"IEND", b"")


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
    pixels = _pixel_array(image)
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
