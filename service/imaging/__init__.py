"""Images in and out of the network, one job per module: `decoding` (upload bytes to
colour planes, with the checks that refuse what cannot be decoded honestly), `composing`
(the output's size and its pixels in the input's kind and depth), `png` (the streamed PNG
encoder) and `lossy` (JPEG and WebP); `errors` says what a client's image is refused for.

Plain Python, Pillow and numpy: the HTTP layer maps each `ImageError` to its `status` with
a problem document and counts it by `reason`. What a client can rely on (formats, sizes,
damage, orientation, colour, depth, output) is written in docs/images.md.
"""

from service.imaging.composing import check_output_pixels, compose, output_size
from service.imaging.decoding import (
    ALLOWED_CONTENT_TYPES,
    ALLOWED_FORMATS,
    DecodedImage,
    decode,
    probe,
    sniff_format,
)
from service.imaging.errors import (
    REASONS,
    ImageError,
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImageType,
)
from service.imaging.lossy import LOSSY_FORMATS, encode_lossy
from service.imaging.png import (
    ISAL_LEVELS,
    PNG_BAND_BYTES,
    PNG_PIECE_BYTES,
    Deflate,
    adler32_combine,
    encode_png,
)

__all__ = [
    "ALLOWED_CONTENT_TYPES",
    "ALLOWED_FORMATS",
    "ISAL_LEVELS",
    "LOSSY_FORMATS",
    "PNG_BAND_BYTES",
    "PNG_PIECE_BYTES",
    "REASONS",
    "DecodedImage",
    "Deflate",
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
    "probe",
    "sniff_format",
]
