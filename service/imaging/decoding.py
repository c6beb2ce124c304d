"""Upload bytes to colour planes for the network, with the checks that keep decoding
honest: the format from the bytes, the pixel count before any pixel, no partly grey image
from damaged data (the policy: docs/images.md)."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageCms, ImageFile, UnidentifiedImageError

from service.imaging.errors import ImageTooLarge, UndecodableImage, UnsupportedImageType

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
    if head[:4] in _TIFF_LAYOUTS:  # classic and BigTIFF, either byte order
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


def _pillow_planes(im: ImageFile.ImageFile, data: bytes, fmt: str) -> _Planes:
    """The planes through Pillow: 16-bit colour PNG/TIFF read losslessly, the rest loaded."""
    wide = _read_wide_colour(im, data, fmt)
    if wide is not None:
        return wide
    im.load()
    return _read_planes(im)


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


MAX_JPEG_SCANS = 64
"""Most scans a JPEG may have. libjpeg's progressive scripts use 6 (grey) to 10 (colour);
each scan walks every coefficient again, so a file of hundreds of tiny scans costs
seconds to decode for a few kilobytes (an 82 KB 4096² grey JPEG of 883 scans: 2.65 s,
against 0.05 s for its 6-scan twin). With this bound, decoding costs at most a fixed
multiple of the pixels."""


@dataclass
class _JpegLayout:
    """What the size floor and the scan bound need from a JPEG's markers (its first image)."""

    min_scan_bits: int
    """Fewest bits of scan data that can code every block the frame declares; 0: no floor."""
    scan_bytes: int
    scans: int


def _jpeg_layout(data: bytes) -> _JpegLayout:
    """Walk the markers of the first image (an MPO's later images are not read)."""
    frame: tuple[int, int, int, dict[int, tuple[int, int]]] | None = None
    need_bits, scan_bytes, scans, pos = 0, 0, 0, 2
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
            pos = _skip_fill(data, pos)
            if not 0xD0 <= data[pos + 1] <= 0xD7:  # not a restart marker: the scan is over
                break
            pos = _segment_end(data, pos + 2)
        scan_bytes += pos - start
        scans += 1
        if scans > MAX_JPEG_SCANS:
            break  # refused for it: no need to walk the rest
        need_bits += _scan_floor_bits(frame, body)
    return _JpegLayout(need_bits, scan_bytes, scans)


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


PNG_CHUNKS_FREE = 256
PNG_BYTES_PER_CHUNK = 4096
"""A PNG may have `PNG_CHUNKS_FREE` chunks, plus one per `PNG_BYTES_PER_CHUNK` bytes of
the file. Pillow reads chunks one by one in Python, ~3 µs each: a 4.7 MB PNG of 400,000
empty ancillary chunks took 1.17 s to open for 64×64 pixels, and the upload limit
allows ten times that. Encoders write image data in chunks of 8 KB (libpng) to 64 KB
(Pillow) and a handful of others, so real files stay far below the bound; with it,
reading the chunks costs at most ~40 ms."""


def _check_png_chunks(data: bytes) -> None:
    """Refuse, before Pillow reads them, a PNG of more chunks than its size warrants
    (`PNG_BYTES_PER_CHUNK`). Walks the chunk headers only, stopping at IEND, at the bound,
    or at the end of the data (a damaged file is Pillow's to report)."""
    limit = PNG_CHUNKS_FREE + len(data) // PNG_BYTES_PER_CHUNK
    pos, chunks = 8, 0  # after the signature
    while pos + 8 <= len(data):
        chunks += 1
        if chunks > limit:
            raise ImageTooLarge(
                f"the PNG has more than {limit} chunks for its {len(data)} bytes (reading "
                f"them would cost far more than its pixels); re-encode it",
                reason="too_many_chunks",
            )
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 12 + length


TIFF_PIECES_FREE = 4096
TIFF_PIXELS_PER_PIECE = 256
"""A TIFF's first image may have `TIFF_PIECES_FREE` strips or tiles, plus one per
`TIFF_PIXELS_PER_PIECE` pixels. Pillow parses the offsets of every piece in Python at
open: an uncompressed 4×250,000 image (1 MP, 4.9 MB) in one-row strips took 0.8 s to
open and 1.5 s more to decode. One-row strips of an image 256 or more wide, and tiles
(16×16 at the smallest), stay within the bound."""

_TIFF_LAYOUTS = {  # header -> (struct byte order, BigTIFF)
    b"II*\x00": ("<", False),
    b"MM\x00*": (">", False),
    b"II+\x00": ("<", True),
    b"MM\x00+": (">", True),
}


def _check_tiff_pieces(data: bytes) -> None:
    """Refuse, before Pillow parses them, a TIFF whose first image has more strips or
    tiles than its pixels warrant (`TIFF_PIXELS_PER_PIECE`). Reads the first IFD's
    entries only; what it cannot read (a damaged file) is Pillow's to report."""
    layout = _TIFF_LAYOUTS.get(data[:4])
    if layout is None:
        return
    order, big = layout
    head, entry, size = (
        (f"{order}Q", f"{order}HHQQ", 20) if big else (f"{order}H", f"{order}HHII", 12)
    )
    try:
        (ifd,) = struct.unpack_from(f"{order}Q" if big else f"{order}I", data, 8 if big else 4)
        (entries,) = struct.unpack_from(head, data, ifd)
        first = ifd + struct.calcsize(head)
        tags: dict[int, tuple[int, int]] = {}
        for i in range(min(entries, 4096)):
            tag, kind, count, value = struct.unpack_from(entry, data, first + i * size)
            nbytes = {3: 2, 4: 4}.get(kind)  # SHORT, LONG: in the field's first bytes
            if nbytes is not None and count == 1:
                spare = 8 * ((8 if big else 4) - nbytes)  # the field: 4 bytes, 8 in BigTIFF
                value = value >> spare if order == ">" else value & ((1 << 8 * nbytes) - 1)
            tags[tag] = (count, value)
    except struct.error:
        return
    width, height = tags.get(256, (0, 0))[1], tags.get(257, (0, 0))[1]
    pieces = max(tags.get(273, (0, 0))[0], tags.get(324, (0, 0))[0])
    limit = TIFF_PIECES_FREE + width * height // TIFF_PIXELS_PER_PIECE
    if pieces > limit:
        raise ImageTooLarge(
            f"the TIFF has {pieces} strips or tiles for {width}x{height} pixels (more than "
            f"{limit}: reading them would cost far more than its pixels); re-encode it",
            reason="too_many_chunks",
        )


def _check_jpeg_scans(layout: _JpegLayout, size: tuple[int, int]) -> None:
    """Refuse, before decoding, a JPEG of more than `MAX_JPEG_SCANS` scans, or whose scan
    data cannot cover the size it declares."""
    if layout.scans > MAX_JPEG_SCANS:
        raise ImageTooLarge(
            f"the JPEG has more than {MAX_JPEG_SCANS} scans (its decode would cost far more "
            "than its pixels); re-encode it with a standard progression",
            reason="too_many_scans",
        )
    if layout.min_scan_bits > 8 * layout.scan_bytes:
        width, height = size
        raise UndecodableImage(
            f"the JPEG's scan data ({layout.scan_bytes} bytes) is too short for the "
            f"{width}x{height} its header declares (at least {layout.min_scan_bits // 8} bytes)"
        )


# libjpeg's output colour space for each colour space simplejpeg reads from a header
_JPEG_COLOURSPACES = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}


def _strict_jpeg(data: bytes, *, min_factor: int = 1) -> np.ndarray:
    """The JPEG decoded by simplejpeg (libjpeg-turbo) in strict mode, which raises libjpeg's
    warnings that Pillow drops: a scan cut short (libjpeg fills the missing blocks grey),
    corrupt entropy-coded data, bytes where a marker should be. Refused as damaged.

    At `min_factor=8` it is the check alone: every coefficient is still entropy-decoded,
    so every warning still fires. Grey and YCbCr/RGB JPEGs take their pixels from the full
    decode itself (ISLOW DCT and fancy upsampling, as Pillow's: the same pixels, and one
    decode instead of two); CMYK ones are checked here and decoded by Pillow.
    """
    try:
        colourspace = _JPEG_COLOURSPACES.get(simplejpeg.decode_jpeg_header(data)[2], "RGB")
        pixels: np.ndarray = simplejpeg.decode_jpeg(
            data, colorspace=colourspace, min_factor=min_factor, strict=True
        )
    except ValueError as exc:
        raise UndecodableImage(
            f"the JPEG's data is damaged (truncated or corrupt): libjpeg says {exc}"
        ) from None
    return pixels


def _open_checked(
    data: bytes, content_type: str | None, max_pixels: int
) -> tuple[str, ImageFile.ImageFile]:
    """The image opened (headers read, no pixel decoded) once its format, its pixel count,
    its frames and, for a JPEG, its scans passed their checks."""
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
    if fmt == "PNG":  # before Pillow's open, which reads every chunk before the pixels
        _check_png_chunks(data)
    if fmt == "TIFF":  # the same: it parses every strip's offset
        _check_tiff_pieces(data)
    with _pillow_errors(fmt):
        im = _open(data, fmt)
    try:
        _check_pixels(im.size, max_pixels)
        _check_single_frame(im, fmt)
        if fmt == "JPEG":
            _check_jpeg_scans(_jpeg_layout(data), im.size)
    except BaseException:
        im.close()
        raise
    return fmt, im


def probe(data: bytes, content_type: str | None, *, max_pixels: int) -> tuple[int, int]:
    """(height, width) of the upright image, from its headers alone: what `decode` checks
    before decoding (format, pixel limit, frames, JPEG scans, PNG chunks, TIFF strips) and raises
    alike, in a fraction of a millisecond to a few (tens for a PNG of many chunks). The
    API prices a request with it before paying for the decode."""
    fmt, im = _open_checked(data, content_type, max_pixels)
    with im, _pillow_errors(fmt):
        width, height = im.size
        if _exif_orientation(im) in (5, 6, 7, 8):  # a quarter turn: the sides swap
            width, height = height, width
    return height, width


def decode(data: bytes, content_type: str | None, *, max_pixels: int) -> DecodedImage:
    """Decode an uploaded image, refusing what we do not accept (see the module docstring).

    Raises `UndecodableImage` (400), `UnsupportedImageType` (415) or `ImageTooLarge` (413).
    The pixel limit and the JPEG scan bound are checked from the headers, before any
    pixel is decoded.
    """
    fmt, im = _open_checked(data, content_type, max_pixels)
    with im:
        if fmt == "PNG":
            _check_png_whole(data)
        with _pillow_errors(fmt):
            if fmt == "JPEG" and im.mode in ("L", "RGB"):
                pixels = _strict_jpeg(data)
                if pixels.shape[:2] != (im.height, im.width):  # two headers that disagree
                    raise UndecodableImage(
                        f"the JPEG decodes to {pixels.shape[1]}x{pixels.shape[0]}, its header "
                        f"says {im.width}x{im.height}"
                    )
                planes = _Planes(pixels, None, 8)
            else:
                if fmt == "JPEG":
                    _strict_jpeg(data, min_factor=8)  # damaged data costs no full decode
                planes = _pillow_planes(im, data, fmt)
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
