"""Which image format to answer with, from the request's `Accept` header (RFC 9110 §12.5.1).

Pure functions, no HTTP framework: `service/api.py` calls them and turns `NotAcceptable`
into a 406 problem document.

Rules (what a client can rely on):

* The formats are PNG (the default), WebP and JPEG. A missing or empty `Accept`, `*/*`
  and `image/*` give PNG.
* Each format takes the q-value of the most specific range that matches it
  (`image/webp` before `image/*` before `*/*`); q=0 refuses it. The format with the
  highest q wins. On a tie, a format the client named outright wins over one matched
  by a wildcard (`Accept: image/webp, */*` gives WebP), then PNG, WebP, JPEG in that
  order. Media-type parameters other than q are ignored; a range whose q is not a
  number in [0, 1] is skipped, as is one that is not `type/subtype`.
* An image with transparency is never sent as JPEG, which cannot hold it: the best of
  the other acceptable formats is chosen, and if there is none, 406. Flattening the
  alpha onto some colour would hand back a different picture than the one sent.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MEDIA_TYPES", "NotAcceptable", "choose_format"]

MEDIA_TYPES = {"PNG": "image/png", "WEBP": "image/webp", "JPEG": "image/jpeg"}
"""Output formats (Pillow names) and their media types, in the server's preference order."""


class NotAcceptable(Exception):
    """The client's `Accept` allows none of the formats this output can be sent as."""


@dataclass(frozen=True)
class _Range:
    kind: str
    subtype: str
    q: float

    def specificity(self, media_type: str) -> int | None:
        """2 for an exact match, 1 for `type/*`, 0 for `*/*`, None for no match."""
        kind, subtype = media_type.split("/")
        if self.kind == "*" and self.subtype == "*":
            return 0
        if self.kind != kind:
            return None
        if self.subtype == "*":
            return 1
        return 2 if self.subtype == subtype else None


def _parse(accept: str) -> list[_Range]:
    ranges = []
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        kind, slash, subtype = media.lower().partition("/")
        if not slash or not kind or not subtype or (kind == "*" and subtype != "*"):
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if 0.0 <= q <= 1.0:
            ranges.append(_Range(kind, subtype, q))
    return ranges


def _quality(ranges: list[_Range], media_type: str) -> tuple[float, bool]:
    """(q, named outright) of `media_type` under `ranges`; q = 0 when nothing matches."""
    best: tuple[int, float] | None = None
    for r in ranges:
        spec = r.specificity(media_type)
        if spec is not None and (best is None or spec > best[0]):
            best = (spec, r.q)
    if best is None:
        return 0.0, False
    return best[1], best[0] == 2


def choose_format(accept: str | None, *, alpha: bool = False) -> str:
    """The Pillow name (`PNG`, `WEBP`, `JPEG`) to encode with, or `NotAcceptable`.

    `alpha`: the output has transparency, so JPEG is out of the running.
    """
    if accept is None or not accept.strip():
        return "PNG"
    ranges = _parse(accept)
    if not ranges:  # nothing parsable: as if no Accept had been sent
        return "PNG"
    candidates = [fmt for fmt in MEDIA_TYPES if not (alpha and fmt == "JPEG")]
    scored = []
    for preference, fmt in enumerate(candidates):
        q, named = _quality(ranges, MEDIA_TYPES[fmt])
        if q > 0:
            scored.append((-q, not named, preference, fmt))
    if not scored:
        offered = ", ".join(MEDIA_TYPES[fmt] for fmt in candidates)
        why = " (the image has transparency, which JPEG cannot hold)" if alpha else ""
        raise NotAcceptable(f"Accept allows none of {offered}{why}")
    return min(scored)[3]
