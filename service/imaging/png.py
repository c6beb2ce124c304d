"""The PNG encoder: streamed in IDAT pieces as rows are compressed, 16-bit and ICC kept,
ISA-L deflate at low levels and bands of rows on several threads for large images
(docs/images.md, docs/benchmarks.md)."""

from __future__ import annotations

import struct
import threading
import zlib
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from isal import isal_zlib
from PIL import Image

# --------------------------------------------------------------------------- encode

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type
_FILTER_NONE, _FILTER_UP = 0, 2


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    # ISA-L's CRC-32: the same values as zlib's, a tenth of its time on a 4K image's IDAT
    crc = isal_zlib.crc32(payload, isal_zlib.crc32(kind))
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def pixel_array(image: Image.Image | np.ndarray) -> np.ndarray:
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
"""The least raw bytes of rows per band that one thread compresses, in the parallel PNG
encoder.

Each band starts with an empty deflate window, which costs a little size at every
boundary; a quarter of a megabyte keeps that under 1 % while a 1024² RGB output still
splits into 12 bands."""

BANDS_PER_THREAD = 2
"""Larger images get larger bands: about this many per encoder thread. Each band costs
the server time under the GIL (a task, its result, its framing): a 4K PNG in
quarter-megabyte bands is ~95 of them, and a 4K request held the GIL 37-38 ms on the
development machine, against 31-32 ms in 2 MB bands (docs/benchmarks.md, section 8).
Two per thread still keep every thread busy, since 2 × threads bands are in flight."""


PNG_PIECE_BYTES = 1 << 19
"""Bytes a streamed piece gathers before it is handed on (after the first two).

Each piece costs the server a hop to a worker thread and a write to the socket, both
under the GIL: a 4K PNG went out in ~95 pieces of 64 KB. Half a megabyte makes that a
dozen, and a Set14 output two or three (with the larger bands, a 4K request's GIL time
fell from 36-40 to 31-34 ms on the development machine: docs/benchmarks.md, section 8)."""


def encode_png(
    image: Image.Image | np.ndarray,
    *,
    icc_profile: bytes | None = None,
    compress_level: int = 1,
    chunk_bytes: int = 1 << 16,
    threads: int = 1,
    band_bytes: int | None = None,
    deflate: Deflate = "auto",
    piece_bytes: int = PNG_PIECE_BYTES,
) -> Iterator[bytes]:
    """PNG bytes in pieces, for a streamed response: the header first, then the first IDAT
    chunks as soon as their rows are compressed, then pieces of at least `piece_bytes`
    (IDAT chunks of about `chunk_bytes` each), IEND in the last.

    Keeps 16-bit depth; writes `icc_profile` as an iCCP chunk. `compress_level` is zlib's
    0..9: 0 stores rows unfiltered; above it rows get PNG's Up filter. With `threads` > 1
    and more than one band, bands of rows are compressed in parallel
    (`_png_stream_banded`); the pixels are the same either way. A band is `band_bytes`
    of raw rows, by default `PNG_BAND_BYTES` or more, for `BANDS_PER_THREAD` a thread.
    `deflate` picks the library: "auto" is ISA-L at `ISAL_LEVELS` and zlib otherwise;
    "isal" takes levels 1..3.
    The arguments are checked now; the work happens as the iterator is consumed.
    """
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be 0..9, got {compress_level}")
    if deflate == "isal" and not 1 <= compress_level <= 3:
        raise ValueError(f"ISA-L compresses at levels 1..3, got {compress_level}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    pixels = pixel_array(image)
    if band_bytes is None:
        band_bytes = max(PNG_BAND_BYTES, -(-pixels.nbytes // (BANDS_PER_THREAD * threads)))
    chunk_bytes, band_bytes = max(1, chunk_bytes), max(1, band_bytes)
    if threads > 1 and pixels.nbytes > band_bytes:
        stream = _png_stream_banded(
            pixels, icc_profile, compress_level, chunk_bytes, threads, band_bytes, deflate
        )
    else:
        stream = _png_stream(pixels, icc_profile, compress_level, chunk_bytes, deflate)
    return _coalesced(stream, piece_bytes)


def _coalesced(pieces: Generator[bytes, None, None], size: int) -> Iterator[bytes]:
    """`pieces` joined into pieces of at least `size` bytes (the last may be shorter),
    except the first two, passed on as they come: the header, which leaves before any
    work, and the first IDAT, which leaves once its rows are compressed."""
    try:
        for _ in range(2):
            first = next(pieces, None)
            if first is None:
                return
            yield first
        gathered: list[bytes] = []
        length = 0
        for piece in pieces:
            gathered.append(piece)
            length += len(piece)
            if length >= size:
                yield b"".join(gathered)
                gathered, length = [], 0
        if gathered:
            yield b"".join(gathered)
    finally:  # a client that left: stop the encoder (the banded one drops queued bands)
        pieces.close()


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
) -> Generator[bytes, None, None]:
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
) -> Generator[bytes, None, None]:
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
