"""The `imdn` command line: profile (Tables 6/7), eval (Table 5 path), upscale files and folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.networks.checkpoints import REGISTRY
from models.quality.matlab import imresize, imresize_tensor, psnr
from models.runtime.acs import authors_forward
from service.cli import main

# Table 7: multiply-adds per output pixel.
TABLE7_MULT_ADDS = {"x2": 173e3, "x3": 78e3, "x4": 45e3}


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(autouse=True)
def _fast_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's engine reads IMDN_* settings: skip the warm-up, keep the CPU."""
    monkeypatch.setenv("IMDN_WARMUP", "false")
    monkeypatch.setenv("IMDN_DEVICE", "cpu")


def test_profile_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(REGISTRY)
    for name, spec in REGISTRY.items():
        assert rows[name]["parameters"] == spec.model.parameters
        assert rows[name]["depth"] == spec.model.depth
    for name, target in TABLE7_MULT_ADDS.items():
        assert rows[name]["depth"] == 34
        assert rows[name]["mult_adds_per_output_pixel"] == pytest.approx(target, rel=0.02)


def test_eval_set5_x4_json(
    weights_dir: Path, datasets_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set5 = datasets_dir / "Set5"
    args = ["eval", "--hr", str(set5 / "HR"), "--lr", str(set5 / "LR_bicubic" / "x4")]
    args += ["--scale", "4", "--weights-dir", str(weights_dir), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "x4"
    assert report["dataset"] == "Set5"
    assert report["images"] == 5
    assert report["psnr"] == pytest.approx(32.210, abs=0.01)
    assert report["ssim"] == pytest.approx(0.8948, abs=0.0005)
    assert report["seconds_per_image"] > 0


def test_eval_with_missing_weights_says_how_to_get_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--hr", str(tmp_path), "--scale", "2", "--weights-dir", str(tmp_path / "w")]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("imdn: error: ")
    assert "IMDN_x2.pth" in captured.err
    assert f"imdn fetch-weights --dir {tmp_path / 'w'}" in captured.err


def test_upscale_one_file_x2(
    weights_dir: Path, datasets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lr_path = datasets_dir / "Set5" / "LR_bicubic" / "x2" / "birdx2.bmp"
    out = tmp_path / "out.png"
    args = ["upscale", str(lr_path), "--scale", "2", "-o", str(out)]
    assert main([*args, "--weights-dir", str(weights_dir)]) == 0

    with Image.open(out) as img:
        assert img.format == "PNG"
        sr = np.asarray(img.convert("RGB"))
    lr = _rgb(lr_path)
    assert sr.shape == (2 * lr.shape[0], 2 * lr.shape[1], 3)
    assert f"-> {out}" in capsys.readouterr().out
    # A real ×2 super-resolution: clearly closer to the original than bicubic is.
    hr = _rgb(datasets_dir / "Set5" / "HR" / "bird.bmp")
    assert psnr(sr, hr, border=2) > psnr(imresize(lr, scale=2.0), hr, border=2) + 2.0


def _crops(datasets_dir: Path, folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Small PNG inputs cut from a Set5 LR image: (height, width) each, at different places."""
    source = _rgb(datasets_dir / "Set5" / "LR_bicubic" / "x2" / "babyx2.bmp")
    folder.mkdir()
    paths = []
    for i, (h, w) in enumerate(sizes):
        top, left = 17 * i, 23 * i
        path = folder / f"crop{i}.png"
        Image.fromarray(source[top : top + h, left : left + w]).save(path)
        paths.append(path)
    return paths


def test_upscale_folder(
    weights_dir: Path, datasets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = _crops(datasets_dir, tmp_path / "in", [(40, 48)] * 3)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "in"), "--scale", "2", "-o", str(out)]
    assert main([*args, "--weights-dir", str(weights_dir)]) == 0  # a skip is no failure

    assert sorted(p.name for p in out.iterdir()) == [f"{p.stem}_x2.png" for p in inputs]
    err = capsys.readouterr().err
    assert f"{tmp_path / 'in' / 'notes.txt'}: skipped: not an image" in err  # said, not silent
    assert "3 of 3 done, 0 failed, 1 skipped" in err
    for path in inputs:
        with Image.open(out / f"{path.stem}_x2.png") as img:
            assert (img.format, img.size) == ("PNG", (96, 80))


def test_upscale_arbitrary_scale_uses_imdn_as(
    weights_dir: Path,
    datasets_dir: Path,
    official_model: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (source,) = _crops(datasets_dir, tmp_path / "in", [(38, 46)])  # not multiples of 4: ACS
    out = tmp_path / "wide.png"
    args = ["upscale", str(source), "--scale", "2.5", "-o", str(out)]
    assert main([*args, "--weights-dir", str(weights_dir)]) == 0

    assert "AS)" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.size == (round(2.5 * 46), round(2.5 * 38))  # (115, 95)
        sr = np.asarray(img.convert("RGB"))
    # The authors' IMDN_AS recipe by hand: bicubic to the target size, then the network
    # (their 4-crop ACS, as 95x115 is not a multiple of 4), rounded to 8 bits.
    lr = torch.from_numpy(_rgb(source).copy()).permute(2, 0, 1)[None].double() / 255
    x = imresize_tensor(lr, size=(95, 115)).clamp(0, 1).float()
    with torch.inference_mode():
        y = authors_forward(official_model("AS"), x)
    expected = (y[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(sr.astype(int) - expected).max() <= 1


def test_upscale_goes_on_past_a_file_the_engine_refuses(
    weights_dir: Path,
    datasets_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A queue of one crop, IMDN_AS: 40x48 at x2.5 is 100x120 and runs whole, 38x46 is
    95x115 and needs the paper's four ACS crops: refused (too costly for this server). It
    is named, the rest is done, and the exit code says something failed."""
    monkeypatch.setenv("IMDN_MAX_QUEUE_CROPS", "1")
    aligned, unaligned = _crops(datasets_dir, tmp_path / "in", [(40, 48), (38, 46)])
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "in"), "--scale", "2.5", "-o", str(out)]
    assert main([*args, "--weights-dir", str(weights_dir)]) == 1

    assert sorted(p.name for p in out.iterdir()) == [f"{aligned.stem}_x2.5.png"]
    err = capsys.readouterr().err
    assert f"{unaligned}: failed: the image needs 4 crops" in err
    assert "1 of 2 done, 1 failed, 0 skipped" in err


def test_upscale_same_stems_to_webp_here(
    weights_dir: Path, datasets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`photo.png` and `photo.bmp` side by side: two results, each of its own input."""
    png, other = _crops(datasets_dir, tmp_path / "in", [(20, 24), (24, 20)])
    png = png.rename(tmp_path / "in" / "photo.png")
    bmp = tmp_path / "in" / "photo.bmp"
    Image.open(other).save(bmp)
    other.unlink()
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "in"), "--scale", "2", "-o", str(out), "--format", "webp"]
    assert main([*args, "--quality", "100", "--weights-dir", str(weights_dir)]) == 0
    assert "2 of 2 done, 0 failed, 0 skipped" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["photo.bmp_x2.webp", "photo.png_x2.webp"]
    for source in (png, bmp):
        with Image.open(out / f"{source.name}_x2.webp") as img:
            assert img.format == "WEBP"
            assert img.size == (2 * _rgb(source).shape[1], 2 * _rgb(source).shape[0])


def test_upscale_refuses_a_scale_over_the_maximum_once_before_loading(
    weights_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    args = ["upscale", str(tmp_path), "--scale", "9", "-o", str(tmp_path / "out")]
    assert main([*args, "--weights-dir", str(weights_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("--scale must be at most 8 (IMDN_MAX_SCALE)") == 1, err
    assert not (tmp_path / "out").exists()
