"""The official checkpoints: a registry, a verified download, and a strict loader.

The loader reads any IMDN state dict (official, `module.`-prefixed, or one our
trainer exported), maps its keys onto our module names, infers architecture
and scale from tensor shapes, and refuses anything that does not fit exactly.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tempfile
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from models.networks.descriptor import ModelDescriptor
from models.networks.imdn import IMDN, IMDN_AS, build_model, describe_network

OFFICIAL_BASE_URL = "https://github.com/Zheng222/IMDN/raw/master/checkpoints"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, unsafe or of the wrong model."""


@dataclass(frozen=True)
class CheckpointSpec:
    """An official checkpoint: the model it holds, and how to get and check the file."""

    model: ModelDescriptor
    filename: str
    sha256: str

    def url(self, base_url: str = OFFICIAL_BASE_URL) -> str:
        return f"{base_url.rstrip('/')}/{self.filename}"


def _official(
    name: str, network: type[IMDN], scale: int, parameters: int, depth: int, sha256: str
) -> CheckpointSpec:
    """A registry entry: the architecture's name and size rule come from its class."""
    model = ModelDescriptor(
        name, network.architecture, scale, network.size_multiple, parameters, depth
    )
    return CheckpointSpec(model, f"IMDN_{name}.pth", sha256)


# The four official models; tests/test_checkpoints.py holds each descriptor to the module
# the file loads into.
REGISTRY: dict[str, CheckpointSpec] = {
    spec.model.name: spec
    for spec in (
        _official(
            "x2",
            IMDN,
            2,
            694_404,
            34,
            "740b39653592bd3f49955a21cd9e16f2d37f2c413368cc09327601b8fbe42ce1",
        ),
        _official(
            "x3",
            IMDN,
            3,
            703_059,
            34,
            "11b1716a19bc16e5e353e1db798d476169338e631eb170c82d765559888cb028",
        ),
        _official(
            "x4",
            IMDN,
            4,
            715_176,
            34,
            "e660c38221147217a136debeb99eb304d62d9c0f73ac421ed66281b619719714",
        ),
        _official(
            "AS",
            IMDN_AS,
            1,
            752_104,
            35,
            "3cbddf7635581a5a1eab501b18081e7825dcdfd53a1a7670e1e571515eae76ff",
        ),
    )
}


def spec_for(name: str) -> CheckpointSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise CheckpointError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None


# Official key (after stripping `module.`) -> our key. Applied in order.
_KEY_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"^fea_conv\."), lambda m: "head."),
    (re.compile(r"^IMDB(\d+)\."), lambda m: f"blocks.{int(m.group(1)) - 1}."),
    (re.compile(r"\.cca\.conv_du\.0\."), lambda m: ".cca.squeeze."),
    (re.compile(r"\.cca\.conv_du\.2\."), lambda m: ".cca.excite."),
    (re.compile(r"^c\.0\."), lambda m: "fuse."),
    (re.compile(r"^LR_conv\."), lambda m: "body_conv."),
    (re.compile(r"^upsampler\.0\."), lambda m: "upsample_conv."),
)


def canonical_key(key: str) -> str:
    """Map an official (or DataParallel-prefixed) key to our module's key."""
    key = key.removeprefix("module.")
    for pattern, replace in _KEY_RULES:
        key = pattern.sub(replace, key, count=1)
    return key


def sha256_of(data: bytes | Path) -> str:
    if isinstance(data, Path):
        digest = hashlib.sha256()
        with data.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    return hashlib.sha256(data).hexdigest()


def _read_state_dict(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """Unpickle with `weights_only`: tensors and plain containers, nothing else."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if "global" not in reason.lower():  # bad opcodes: not a pickle at all
            raise CheckpointError(
                f"{source}: not a readable PyTorch checkpoint (truncated or corrupt?): {reason}"
            ) from exc
        raise CheckpointError(
            f"{source}: refused to load: the file asks for objects other than tensors "
            f"(a pickle with arbitrary classes is never loaded): {reason}"
        ) from exc
    # Arbitrary bytes can make the unpickler fail in any way (a text file: KeyError).
    except Exception as exc:
        raise CheckpointError(
            f"{source}: not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(exc).__name__}{': ' + str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: not a state dict of tensors (bad entries: {bad[:3]})")
    return {canonical_key(k): v for k, v in obj.items()}


def _unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only error that names the cause, without its boilerplate
    (which suggests `weights_only=False`, the very thing this loader never does)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(exc).__name__])[0]


def infer_architecture(
    state: dict[str, torch.Tensor], source: str = "checkpoint"
) -> tuple[str, int]:
    """(arch, network scale) from tensor shapes: the head and the upsampler tell."""
    tail = state.get("upsample_conv.weight")
    if tail is None or tail.ndim != 4:
        raise CheckpointError(f"{source}: no IMDN upsampler ('upsampler.0.weight') in the file")
    if "head.0.weight" in state:
        return IMDN_AS.architecture, 1
    factor = round((tail.shape[0] / 3) ** 0.5)
    if 3 * factor * factor != tail.shape[0]:
        raise CheckpointError(
            f"{source}: upsampler has {tail.shape[0]} output channels, not 3·s² for any s"
        )
    return IMDN.architecture, factor


def load_model(
    path: Path | str,
    *,
    expect: CheckpointSpec | None = None,
    verify_sha256: bool = True,
) -> IMDN:
    """Load a checkpoint strictly into a new network in eval mode.

    With `expect`, the file must hold that architecture and scale, and (when
    `verify_sha256`) have the registry's sha256.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        hint = ""
        if expect is not None:
            hint = f"; get it with `imdn fetch-weights --dir {path.parent}` or from {expect.url()}"
        raise CheckpointError(f"{source}: no such file{hint}")
    data = path.read_bytes()
    state = _read_state_dict(data, source)
    arch, scale = infer_architecture(state, source)
    if expect is not None and (arch, scale) != (expect.model.architecture, expect.model.scale):
        wanted = describe_network(expect.model.architecture, expect.model.scale)
        raise CheckpointError(
            f"{source}: holds {describe_network(arch, scale)}, but {wanted} "
            f"was expected (model {expect.model.name!r}, file {expect.filename})"
        )
    model = build_model(arch, scale)
    missing, unexpected, mismatched = _compare(model.state_dict(), state)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source}: does not fit {describe_network(arch, scale)}: "
            + "; ".join(
                f"{label}: {', '.join(items[:4])}{' …' if len(items) > 4 else ''}"
                for label, items in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("wrong shape", mismatched),
                )
                if items
            )
        )
    if expect is not None and verify_sha256:
        actual = sha256_of(data)
        if actual != expect.sha256:
            raise CheckpointError(
                f"{source}: sha256 {actual} differs from the official {expect.filename} "
                f"({expect.sha256}); re-download it with `imdn fetch-weights`"
            )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _compare(
    wanted: dict[str, torch.Tensor], given: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(set(wanted) - set(given))
    unexpected = sorted(set(given) - set(wanted))
    mismatched = sorted(
        f"{k} {tuple(given[k].shape)} != {tuple(wanted[k].shape)}"
        for k in set(wanted) & set(given)
        if given[k].shape != wanted[k].shape
    )
    return missing, unexpected, mismatched


def load_official(name: str, weights_dir: Path | str) -> IMDN:
    """Load one of the four official models ("x2", "x3", "x4", "AS") from a directory."""
    spec = spec_for(name)
    return load_model(Path(weights_dir) / spec.filename, expect=spec)


def save_state_dict(model: IMDN, path: Path | str) -> None:
    """Export in the official layout (keys as the authors name them) so any IMDN tool loads it."""
    ours_to_official = {canonical_key(k): k for k in official_keys(model)}
    state = {ours_to_official[k]: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda f: torch.save(state, f))


def official_keys(model: IMDN) -> Iterable[str]:
    """The authors' key names for `model` (without the `module.` prefix)."""
    head = ["fea_conv.0", "fea_conv.2"] if model.size_multiple == 4 else ["fea_conv"]
    convs = [*head]
    for i in range(len(model.blocks)):
        convs += [f"IMDB{i + 1}.{c}" for c in ("c1", "c2", "c3", "c4", "c5")]
        convs += [f"IMDB{i + 1}.cca.conv_du.0", f"IMDB{i + 1}.cca.conv_du.2"]
    convs += ["c.0", "LR_conv", "upsampler.0"]
    return [f"{c}.{p}" for c in convs for p in ("weight", "bias")]


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write through a temporary file in the same folder, so no half-written file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(
    spec: CheckpointSpec,
    directory: Path | str,
    *,
    base_url: str = OFFICIAL_BASE_URL,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download one checkpoint, verify its sha256, and move it into place atomically.

    A file already present with the right sha256 is kept. `progress(done, total)`
    is called as bytes arrive.
    """
    target = Path(directory) / spec.filename
    if target.is_file() and sha256_of(target) == spec.sha256:
        return target
    url = spec.url(base_url)
    digest = hashlib.sha256()

    def write(f: io.BufferedWriter) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.length
            done = 0
            for chunk in iter(lambda: response.read(1 << 16), b""):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        if digest.hexdigest() != spec.sha256:
            raise CheckpointError(
                f"{url}: downloaded sha256 {digest.hexdigest()} differs from the pinned "
                f"{spec.sha256}; nothing was written"
            )

    atomic_write(target, write)
    return target
