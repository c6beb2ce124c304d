"""The files of one `imdn upscale` run: which inputs, where each result goes, how it is written.

Shared by the local run (`service/cli.py`) and the client of a server (`service/client.py`),
so that both name, skip and write files alike:

- A folder gives the files in it with an image or video suffix (`IMAGE_SUFFIXES`,
  `VIDEO_SUFFIXES`: a video's result is `<stem>_x<scale>.mp4`, service/video/cli.py); anything else
  in it is reported as skipped, never silently left out. Sub-folders are walked with
  `recursive`, their results going to the same sub-folders under the output folder (the
  output folder itself is not walked when it lies inside an input folder).
- A result is named `<stem>_x<scale>.<format suffix>`. Where two inputs would get the same
  name in one output folder (`baboon.png` and `baboon.jpg`), each of them keeps its whole
  name instead: `baboon.png_x2.png` and `baboon.jpg_x2.png`. Names are compared without
  case (the output folder may be on a case-insensitive disk). A clash that remains (the
  same file name from two folders given on the command line) is refused before anything
  runs: never two inputs to one output.
- With `skip_existing`, an input whose result is already there is skipped (reported).
- A result is written to its own temporary `.part` file beside the target and renamed once
  complete: an interrupted run leaves no half-written image under the final name, and two
  runs into one folder never share a temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from models.quality.evaluate import IMAGE_SUFFIXES
from service.video import VIDEO_SUFFIXES


@dataclass(frozen=True)
class OutputFormat:
    name: str  # as `--format` takes it
    pillow: str  # Pillow's name, as `imaging.encode_lossy` takes it
    suffix: str
    media_type: str  # what the client sends as `Accept`


FORMATS = {
    f.name: f
    for f in (
        OutputFormat("png", "PNG", ".png", "image/png"),
        OutputFormat("webp", "WEBP", ".webp", "image/webp"),
        OutputFormat("jpeg", "JPEG", ".jpg", "image/jpeg"),
    )
}
_SUFFIX_FORMATS = {".png": "png", ".webp": "webp", ".jpg": "jpeg", ".jpeg": "jpeg"}
VIDEO_OUTPUTS = (".mp4", ".webm")  # what `-o` may name for one video (H.264 MP4, VP9 WebM)


class PlanError(ValueError):
    """The run cannot start as asked (nothing was read or written)."""


@dataclass(frozen=True)
class Job:
    source: Path
    target: Path


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)
    done_before: int = 0  # of the skipped: results already there (`skip_existing`)


def names_a_file(output: Path) -> bool:
    """`-o photo.png` names the result; `-o out` (or an existing folder) holds results."""
    return bool(output.suffix) and not output.is_dir()


def output_format(name: str | None, output: Path) -> OutputFormat:
    """`--format`, or the suffix of `-o` when it names one file, else PNG."""
    single = names_a_file(output)
    if single and output.suffix.lower() in VIDEO_OUTPUTS:  # one video: its container
        return FORMATS[name or "png"]
    named = _SUFFIX_FORMATS.get(output.suffix.lower()) if single and output.suffix else None
    if single and output.suffix and named is None:
        raise PlanError(
            f"cannot write {output.name}: the output must end in "
            f"{', '.join(_SUFFIX_FORMATS)} (or -o names a folder)"
        )
    if name is not None and named is not None and name != named:
        raise PlanError(f"-o {output.name} is not a {name} file (--format {name})")
    return FORMATS[name or named or "png"]


def plan_run(
    inputs: Sequence[Path],
    output: Path,
    scale: float,
    fmt: OutputFormat,
    *,
    recursive: bool = False,
    skip_existing: bool = False,
) -> Plan:
    """The jobs of a run, and what is skipped with why. Raises `PlanError` (a missing input,
    several inputs into one file, two inputs to one output) or `FileNotFoundError`."""
    plan = Plan()
    found: list[tuple[Path, Path]] = []  # (file, its folder relative to the output)
    for path in inputs:
        if path.is_dir():
            found += _walk(path, Path(), output, recursive, plan.skipped)
        elif path.is_file():
            found.append((path, Path()))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    single_file = names_a_file(output)
    if single_file and len(found) > 1:
        raise PlanError("several inputs need -o to name a folder")
    targets = [output for _ in found] if single_file else _names(found, output, scale, fmt)
    for (source, _), target in zip(found, targets, strict=True):
        if source.resolve() == target.resolve():
            raise PlanError(f"{source}: the result would overwrite its input")
        if skip_existing and target.exists():
            plan.skipped.append((source, f"{target} exists (--skip-existing)"))
            plan.done_before += 1
        else:
            plan.jobs.append(Job(source, target))
    return plan


def _walk(
    folder: Path, relative: Path, output: Path, recursive: bool, skipped: list[tuple[Path, str]]
) -> list[tuple[Path, Path]]:
    found: list[tuple[Path, Path]] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if entry.resolve() == output.resolve():
                continue  # the results of this run (or an earlier one) are not inputs
            if recursive:
                found += _walk(entry, relative / entry.name, output, recursive, skipped)
            else:
                skipped.append((entry, "a folder (--recursive walks into folders)"))
        elif entry.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
            found.append((entry, relative))
        else:
            skipped.append((entry, "not an image or a video (by its suffix)"))
    return found


def _names(
    found: Sequence[tuple[Path, Path]], output: Path, scale: float, fmt: OutputFormat
) -> list[Path]:
    """`<stem>_x<scale><suffix>`; the whole input name instead of its stem for the inputs
    whose results would otherwise share one name in one folder."""

    def tail(src: Path) -> str:
        video = src.suffix.lower() in VIDEO_SUFFIXES
        return f"_x{scale:g}{'.mp4' if video else fmt.suffix}"

    short = [output / rel / f"{src.stem}{tail(src)}" for src, rel in found]
    counts = _count(short)
    names = [
        output / rel / f"{src.name}{tail(src)}" if counts[_key(name)] > 1 else name
        for (src, rel), name in zip(found, short, strict=True)
    ]
    counts = _count(names)
    clashes = sorted({str(n) for n in names if counts[_key(n)] > 1})
    if clashes:
        sources = [
            str(src) for (src, _), n in zip(found, names, strict=True) if counts[_key(n)] > 1
        ]
        raise PlanError(
            f"{', '.join(sources)} would be written to the same file ({', '.join(clashes)}); "
            "rename one or run them into separate folders"
        )
    return names


def _key(path: Path) -> str:
    return str(path).casefold()


def _count(paths: Iterable[Path]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in paths:
        counts[_key(p)] = counts.get(_key(p), 0) + 1
    return counts


class PartFile:
    """A temporary file of its own beside `target`, renamed onto it by `commit()` and
    removed by `discard()` (or when the block ends without a commit)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=".part")
        os.close(fd)
        self.path = Path(name)

    def commit(self) -> None:
        self.path.replace(self.target)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> PartFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()  # after a commit there is nothing left to remove
