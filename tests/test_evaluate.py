"""The paper's Table 5 protocol with the official weights, and the evaluator's contract.

Targets are `shared/README.md`'s reference figures (measured with the official
code), to +-0.01 dB PSNR and +-0.0005 SSIM, and the paper's own Table 5 to the
digits it prints.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from models.networks.imdn import IMDN
from models.quality.evaluate import EvalReport, ImageScore, dataset_name, evaluate

ModelFactory = Callable[[str], IMDN]

PSNR_TOL = 0.01
SSIM_TOL = 0.0005


def _check(report: EvalReport, psnr: float, ssim: float, images: int) -> None:
    print(f"{report.dataset} x{report.scale}: {report.psnr:.4f} dB / {report.ssim:.5f}")
    assert report.images == images
    assert report.psnr == pytest.approx(psnr, abs=PSNR_TOL)
    assert report.ssim == pytest.approx(ssim, abs=SSIM_TOL)


@pytest.mark.slow
@pytest.mark.parametrize(("scale", "psnr", "ssim"), [(2, 37.996, 0.9605), (4, 32.210, 0.8948)])
def test_set5_with_the_authors_lr(
    official_model: ModelFactory, datasets_dir: Path, scale: int, psnr: float, ssim: float
) -> None:
    set5 = datasets_dir / "Set5"
    report = evaluate(
        official_model(f"x{scale}"),
        set5 / "HR",
        lr_dir=set5 / "LR_bicubic" / f"x{scale}",
        scale=scale,
    )
    _check(report, psnr, ssim, images=5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scale", "psnr", "ssim"), [(2, 33.638, 0.9179), (3, 30.326, 0.8418), (4, 28.582, 0.7811)]
)
def test_set14_readme_reference_lr_rounded_once(
    official_model: ModelFactory, datasets_dir: Path, scale: int, psnr: float, ssim: float
) -> None:
    """The README's Set14 figures come from a bicubic port that rounds once at the end."""
    report = evaluate(
        official_model(f"x{scale}"),
        datasets_dir / "Set14" / "HR",
        lr_dir=None,
        scale=scale,
        lr_round_each_pass=False,
    )
    _check(report, psnr, ssim, images=14)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scale", "psnr", "ssim"), [(2, 33.63, 0.9177), (3, 30.32, 0.8417), (4, 28.58, 0.7811)]
)
def test_set14_matlab_lr_gives_the_papers_table5(
    official_model: ModelFactory, datasets_dir: Path, scale: int, psnr: float, ssim: float
) -> None:
    """With MATLAB's own rounding (the default), Set14 lands on Table 5's printed digits."""
    report = evaluate(
        official_model(f"x{scale}"), datasets_dir / "Set14" / "HR", lr_dir=None, scale=scale
    )
    print(f"Set14 x{scale} (MATLAB LR): {report.psnr:.4f} dB / {report.ssim:.5f}")
    assert report.images == 14
    assert round(report.psnr, 2) == psnr
    assert abs(report.ssim - ssim) <= 0.00006  # Table 5 prints 4 digits


@pytest.mark.slow
def test_realsr_with_imdn_as(official_model: ModelFactory, datasets_dir: Path) -> None:
    """Same-size pairs; cam1_07 (1200x2001) is not a multiple of 4, so it goes through ACS."""
    realsr = datasets_dir / "RealSR"
    report = evaluate(official_model("AS"), realsr / "HR", lr_dir=realsr / "LR", scale=None)
    by_name = {row.name: row for row in report.rows}
    print({name: round(row.psnr, 4) for name, row in by_name.items()})
    assert sorted(by_name) == ["cam1_02", "cam1_07"]
    assert by_name["cam1_02"].psnr == pytest.approx(29.361, abs=PSNR_TOL)
    assert by_name["cam1_07"].psnr == pytest.approx(30.245, abs=PSNR_TOL)
    assert report.psnr == pytest.approx(29.803, abs=PSNR_TOL)
    assert report.scale == 1 and "RGB" in report.protocol
    assert all(0.5 < row.ssim < 1 for row in report.rows)


# --- the evaluator's contract, on a few small real images (x4 is the fastest model) ---


@pytest.fixture
def small_set(datasets_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two Set5 images (HR folder) with the authors' x4 LR files (LR folder)."""
    hr, lr = tmp_path / "HR", tmp_path / "LR"
    hr.mkdir()
    lr.mkdir()
    for stem in ("bird", "head"):
        shutil.copy(datasets_dir / "Set5" / "HR" / f"{stem}.bmp", hr)
        shutil.copy(datasets_dir / "Set5" / "LR_bicubic" / "x4" / f"{stem}x4.bmp", lr)
    return hr, lr


def test_lr_files_match_by_stem_and_rows_are_reported(
    official_model: ModelFactory, small_set: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    hr, lr = small_set
    seen: list[ImageScore] = []
    report = evaluate(
        official_model("x4"), hr, lr_dir=lr, scale=4, progress=True, on_image=seen.append
    )
    assert [r.name for r in report.rows] == ["bird", "head"] == [r.name for r in seen]
    assert report.psnr == pytest.approx((seen[0].psnr + seen[1].psnr) / 2)
    assert all(25 < r.psnr < 40 and 0.7 < r.ssim < 1 and r.seconds > 0 for r in seen)
    out = capsys.readouterr()
    assert "bird" in out.out + out.err and "head" in out.out + out.err
    data = json.loads(json.dumps(report.as_dict()))
    assert data["images"] == 2 and data["scale"] == 4 and len(data["rows"]) == 2
    assert data["psnr"] == pytest.approx(report.psnr)
    assert data["seconds_per_image"] == pytest.approx(report.seconds_per_image)


def test_made_lr_is_close_to_the_authors_lr(
    official_model: ModelFactory, small_set: tuple[Path, Path]
) -> None:
    hr, lr = small_set
    model = official_model("x4")
    given = evaluate(model, hr, lr_dir=lr, scale=4)
    made = evaluate(model, hr, lr_dir=None, scale=None)
    # The MATLAB-exact bicubic reproduces the authors' files, so the scores agree.
    assert made.psnr == pytest.approx(given.psnr, abs=1e-9)
    assert made.ssim == pytest.approx(given.ssim, abs=1e-9)


def test_greyscale_hr_is_replicated(
    official_model: ModelFactory, datasets_dir: Path, tmp_path: Path
) -> None:
    hr = tmp_path / "HR"
    hr.mkdir()
    shutil.copy(datasets_dir / "Set14" / "HR" / "bridge.png", hr)
    report = evaluate(official_model("x4"), hr, lr_dir=None, scale=4)
    assert report.images == 1 and 20 < report.psnr < 35


def test_refuses_what_it_cannot_score(
    official_model: ModelFactory, small_set: tuple[Path, Path], tmp_path: Path
) -> None:
    hr, lr = small_set
    with pytest.raises(ValueError, match="does not match"):
        evaluate(official_model("x4"), hr, lr_dir=lr, scale=2)
    with pytest.raises(ValueError, match="lr_dir"):
        evaluate(official_model("AS"), hr, lr_dir=None, scale=None)
    with pytest.raises(ValueError, match="expected"):  # x4 LR files given to the x2 model
        (lr / "birdx4.bmp").rename(lr / "bird.bmp")
        evaluate(official_model("x2"), hr, lr_dir=lr, scale=2)
    (lr / "head.bmp").write_bytes((lr / "headx4.bmp").read_bytes())
    with pytest.raises(FileNotFoundError, match="2 LR file"):
        evaluate(official_model("x4"), hr, lr_dir=lr, scale=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        evaluate(official_model("x4"), empty, lr_dir=None, scale=4)


def test_a_data_set_is_named_by_the_folder_above_its_hr_or_gt_images() -> None:
    """The one rule `imdn eval` and `imdn bench` name their rows by."""
    assert dataset_name(Path("datasets/Set5/HR")) == "Set5"
    assert dataset_name(Path("datasets/RealSR/GT")) == "RealSR"
    assert dataset_name(Path("datasets/Set5/hr")) == "Set5"
    assert dataset_name(Path("photos")) == "photos"
    assert dataset_name(Path("HR")) == "HR"  # nothing above it to name it by
