"""The README's commands as written: its curl examples against a real server, with the
real curl, and its `make serve` lines as `make -n` runs them."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from service.settings import Settings
from tests.live import live_server

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
OUTPUT_FORMATS = {".png": "PNG", ".webp": "WEBP", ".jpg": "JPEG"}


def _commands(program: str) -> Iterator[str]:
    """Each `program ...` command in the README's `sh` blocks, continuation lines joined
    and the trailing comment dropped."""
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words and words[0] == program:
                yield command


CURLS = list(_commands("curl"))


def test_every_curl_example_says_what_it_sends() -> None:
    assert len(CURLS) >= 4
    for command in CURLS:
        words = shlex.split(command, comments=True)
        # a raw body needs its type: curl would call it application/x-www-form-urlencoded
        if "--data-binary" in words:
            assert any(w.lower().startswith("content-type:") for w in words), command


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_examples_work_as_written(
    weights_dir: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    with Image.open(datasets_dir / "Set5" / "HR" / "bird.bmp") as img:
        crop = img.convert("RGB").crop((80, 100, 120, 128))  # 40×28
    crop.save(tmp_path / "photo.jpg", quality=95)
    crop.save(tmp_path / "photo.png")
    settings = Settings(weights_dir=weights_dir, models=["x2", "x3", "AS"], warmup=False)
    with live_server(settings) as srv:
        for command in CURLS:
            words = shlex.split(command, comments=True)
            words = [w.replace("localhost:8000", srv.url.removeprefix("http://")) for w in words]
            done = subprocess.run(
                [*words, "--silent", "--show-error", "--write-out", "%{http_code}"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert (done.returncode, done.stdout) == (0, "200"), (command, done.stderr)
            out = tmp_path / words[words.index("-o") + 1]
            scale = float(re.search(r"scale=([\d.]+)", command)[1])  # type: ignore[index]
            with Image.open(out) as result:
                assert result.format == OUTPUT_FORMATS[out.suffix], command
                assert result.size == (round(40 * scale), round(28 * scale)), command


def test_the_make_serve_lines_choose_the_torch_build(tmp_path: Path) -> None:
    """`make -n` prints the pip line each of the README's `make serve` lines would run."""
    lines = [shlex.split(c, comments=True) for c in _commands("make")]
    choices = [w for w in lines if any(a.startswith("TORCH_INDEX=") for a in w)]
    assert len(choices) >= 2, "the README names the CPU build and a CUDA one"
    assert any("TORCH_INDEX=https://download.pytorch.org/whl/cpu" in w for w in choices)
    for words in choices:
        assert words[:2] == ["make", "serve"]
        variables = dict(a.split("=", 1) for a in words[2:])
        venv = tmp_path / "venv"  # not there: make plans the install
        printed = subprocess.run(
            ["make", "-n", "-C", str(ROOT), "setup", f"VENV={venv}", *words[2:]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (pip,) = [line for line in printed.splitlines() if "pip install" in line]
        assert f'--extra-index-url "{variables["TORCH_INDEX"]}"' in pip
        assert f'"{variables["TORCH"]}"' in pip
