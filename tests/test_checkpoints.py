"""The official checkpoints: strict loading, the authors' key layout, every way a file can be
wrong, and `imdn fetch-weights` against a real local HTTP server."""

from __future__ import annotations

import functools
import os
import pickle
import shlex
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from models.networks.checkpoints import (
    REGISTRY,
    CheckpointError,
    load_model,
    load_official,
    official_keys,
    save_state_dict,
    sha256_of,
    spec_for,
)
from models.networks.descriptor import describe
from models.networks.imdn import build_model, count_parameters
from service.cli import main

PARAMETERS = {"x2": 694_404, "x3": 703_059, "x4": 715_176, "AS": 752_104}


def _official_state(weights_dir: Path, name: str) -> dict[str, torch.Tensor]:
    path = weights_dir / REGISTRY[name].filename
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


# Loading the official files


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_official_checkpoint_loads_strictly(official_model: Any, name: str) -> None:
    model = official_model(name)
    spec = REGISTRY[name]
    assert count_parameters(model) == PARAMETERS[name] == spec.model.parameters
    # the registry's descriptor is the module's own facts, read off it
    assert describe(name, model) == spec.model
    assert spec.model.depth == (35 if name == "AS" else 34)  # 34: the paper's Table 6
    assert not model.training
    torch.manual_seed(0)
    if spec.model.architecture == "IMDN":
        x = torch.rand(1, 3, 10, 7)
        expected = (1, 3, 10 * spec.model.scale, 7 * spec.model.scale)
    else:
        assert model.size_multiple == 4
        x = torch.rand(1, 3, 12, 8)
        expected = (1, 3, 12, 8)
    with torch.inference_mode():
        y = model(x)
    assert tuple(y.shape) == expected
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_official_file_uses_the_authors_keys(
    weights_dir: Path, official_model: Any, name: str
) -> None:
    keys = set(_official_state(weights_dir, name))
    assert keys == {f"module.{k}" for k in official_keys(official_model(name))}


@pytest.mark.parametrize("name", ["x3", "AS"])  # both head layouts
def test_save_state_dict_round_trips(official_model: Any, tmp_path: Path, name: str) -> None:
    model = official_model(name)
    path = tmp_path / "exported.pth"
    save_state_dict(model, path)

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == set(official_keys(model))
    assert [p.name for p in tmp_path.iterdir()] == ["exported.pth"]  # no .part left behind

    reloaded = load_model(path)
    assert (type(reloaded), reloaded.scale) == (type(model), model.scale)
    torch.manual_seed(1)
    x = torch.rand(1, 3, 16, 12)
    with torch.inference_mode():
        assert torch.equal(reloaded(x), model(x))


# Every wrong file is a CheckpointError that says what is wrong


def test_scale_mismatch_names_both(weights_dir: Path, tmp_path: Path) -> None:
    # The ×2 file under the ×4 name: the registry expects ×4, the tensors say ×2.
    shutil.copyfile(weights_dir / "IMDN_x2.pth", tmp_path / "IMDN_x4.pth")
    with pytest.raises(CheckpointError, match=r"holds IMDN ×2, but IMDN ×4 was expected"):
        load_official("x4", tmp_path)
    with pytest.raises(CheckpointError, match=r"IMDN ×2.*IMDN ×4"):
        load_model(weights_dir / "IMDN_x2.pth", expect=REGISTRY["x4"])


def test_truncated_file(weights_dir: Path, tmp_path: Path) -> None:
    data = (weights_dir / "IMDN_x2.pth").read_bytes()
    path = tmp_path / "IMDN_x2.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
        load_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text", ["hello, this is not a checkpoint\n", "# README\n", '{"weights": [1, 2]}']
)
def test_text_file_is_not_a_checkpoint(tmp_path: Path, text: str) -> None:
    path = tmp_path / "IMDN_x4.pth"
    path.write_text(text)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(path)


class _RunsACommand:
    """A pickle payload: unpickling it calls os.system (here: touch a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_with_arbitrary_class_is_refused_unrun(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "payload-ran"
    payload = {"fea_conv.weight": _RunsACommand(marker)}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(CheckpointError, match=r"refused to load.*system") as info:
        load_model(path)
    assert not marker.exists(), "the payload ran"
    assert "weights_only" not in str(info.value)  # no advice to load it unsafely

    # Control: the payload is live, so the assertion above could have failed.
    if writer == "pickle":
        pickle.loads(path.read_bytes())
        assert marker.exists()


def _save_edited(weights_dir: Path, tmp_path: Path, edit: Any, name: str = "x4") -> Path:
    state = _official_state(weights_dir, name)
    edit(state)
    path = tmp_path / REGISTRY[name].filename
    torch.save(state, path)
    return path


def test_missing_key(weights_dir: Path, tmp_path: Path) -> None:
    path = _save_edited(weights_dir, tmp_path, lambda s: s.pop("module.IMDB3.c2.bias"))
    with pytest.raises(
        CheckpointError, match=r"does not fit IMDN ×4: missing: blocks\.2\.c2\.bias"
    ):
        load_model(path)


def test_wrong_shape(weights_dir: Path, tmp_path: Path) -> None:
    def shrink(state: dict[str, torch.Tensor]) -> None:
        state["module.IMDB1.c5.weight"] = state["module.IMDB1.c5.weight"][:, :32]

    path = _save_edited(weights_dir, tmp_path, shrink)
    with pytest.raises(
        CheckpointError, match=r"wrong shape: blocks\.0\.c5\.weight \(64, 32, 1, 1\)"
    ):
        load_model(path)


def test_extra_key(weights_dir: Path, tmp_path: Path) -> None:
    def add(state: dict[str, torch.Tensor]) -> None:
        state["module.IMDB7.c1.weight"] = torch.zeros(64, 64, 3, 3)

    path = _save_edited(weights_dir, tmp_path, add)
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.6\.c1\.weight"):
        load_model(path)


def test_sha256_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(2)
    save_state_dict(build_model("IMDN", 4), tmp_path / "IMDN_x4.pth")
    load_model(tmp_path / "IMDN_x4.pth", expect=REGISTRY["x4"], verify_sha256=False)  # fits
    with pytest.raises(
        CheckpointError, match=r"sha256 [0-9a-f]{64} differs from the official"
    ) as info:
        load_official("x4", tmp_path)
    assert REGISTRY["x4"].sha256 in str(info.value)
    assert "imdn fetch-weights" in str(info.value)


def test_missing_file_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file") as info:
        load_official("AS", tmp_path)
    message = str(info.value)
    assert f"imdn fetch-weights --dir {tmp_path}" in message
    assert REGISTRY["AS"].url() in message


def test_unknown_model_name() -> None:
    with pytest.raises(CheckpointError, match="unknown model 'x5'; known: x2, x3, x4, AS"):
        spec_for("x5")


# fetch-weights over real HTTP


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving a folder and recording request paths."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def served(weights_dir: Path, tmp_path: Path) -> Iterator[tuple[_Server, Path]]:
    """(server, its folder) with copies of the four official files."""
    folder = tmp_path / "served"
    folder.mkdir()
    for spec in REGISTRY.values():
        shutil.copyfile(weights_dir / spec.filename, folder / spec.filename)
    with _Server(folder) as server:
        yield server, folder


def test_fetch_weights_downloads_and_verifies_all(
    served: tuple[_Server, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, _ = served
    target = tmp_path / "weights"
    assert main(["fetch-weights", "--dir", str(target), "--base-url", server.url]) == 0

    assert sorted(server.requests) == sorted(f"/{s.filename}" for s in REGISTRY.values())
    assert sorted(p.name for p in target.iterdir()) == sorted(s.filename for s in REGISTRY.values())
    for spec in REGISTRY.values():
        assert sha256_of(target / spec.filename) == spec.sha256
    out, err = capsys.readouterr()
    for spec in REGISTRY.values():
        assert f"{target / spec.filename}  sha256 {spec.sha256[:16]}… ok" in out
        assert spec.filename in err and "100%" in err  # tqdm progress on stderr
    assert load_official("AS", target).scale == 1


def test_fetch_weights_refuses_a_corrupted_download(
    served: tuple[_Server, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, folder = served
    path = folder / "IMDN_x2.pth"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same length
    path.write_bytes(bytes(data))
    target = tmp_path / "weights"

    code = main(["fetch-weights", "--dir", str(target), "--base-url", server.url, "x2"])

    assert code != 0
    assert server.requests == ["/IMDN_x2.pth"]
    err = capsys.readouterr().err
    assert "IMDN_x2.pth" in err and "differs from the pinned" in err
    assert REGISTRY["x2"].sha256 in err
    assert not target.exists() or list(target.iterdir()) == []  # no file, no .part


def test_fetch_weights_reports_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    target = tmp_path / "weights"
    with _Server(empty) as server:
        code = main(["fetch-weights", "--dir", str(target), "--base-url", server.url, "x3"])
    assert code != 0
    err = capsys.readouterr().err
    assert "IMDN_x3.pth" in err and "404" in err
    assert not target.exists() or list(target.iterdir()) == []


def test_fetch_weights_keeps_a_good_file_and_replaces_a_bad_one(
    served: tuple[_Server, Path], weights_dir: Path, tmp_path: Path
) -> None:
    server, _ = served
    target = tmp_path / "weights"
    target.mkdir()
    good = target / "IMDN_x2.pth"
    shutil.copyfile(weights_dir / "IMDN_x2.pth", good)
    os.utime(good, ns=(1_000_000_000, 1_000_000_000))
    bad = target / "IMDN_x4.pth"
    bad.write_bytes((weights_dir / "IMDN_x4.pth").read_bytes()[:1000])

    code = main(["fetch-weights", "--dir", str(target), "--base-url", server.url, "x2", "x4"])

    assert code == 0
    assert server.requests == ["/IMDN_x4.pth"]  # the good ×2 file was not downloaded
    assert good.stat().st_mtime_ns == 1_000_000_000
    assert sha256_of(bad) == REGISTRY["x4"].sha256
    assert sorted(p.name for p in target.iterdir()) == ["IMDN_x2.pth", "IMDN_x4.pth"]
