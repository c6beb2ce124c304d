"""`imdn train`: the paper's recipe on real images, fine-tuning, resuming, and the export.

Runs are tiny (4 Set14 images, batches of 4 HR patches of 48x48) so the file
stays fast on a 2-core CPU; the behaviour checked is the one a DIV2K run relies on.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.networks.checkpoints import REGISTRY, CheckpointError, load_model
from models.networks.imdn import IMDN
from models.quality.evaluate import evaluate
from models.quality.matlab import psnr
from models.training.data import PatchDataset, bicubic_lr, build_cache
from models.training.train import TrainConfig, TrainResult, configure, load_training_state, train
from service.cli import main

OFFICIAL_SET5_X4 = 32.210  # shared/README.md, the official x4 weights on the authors' LR
TRAIN_IMAGES = ("baboon", "comic", "face", "flowers")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny convolutions on a busy 2-core machine run ~10x faster on one OpenMP thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train_hr(datasets_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train_hr")
    for name in TRAIN_IMAGES:
        (folder / f"{name}.png").symlink_to(datasets_dir / "Set14" / "HR" / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _config(hr: Path, out: Path, cache: Path, **overrides: object) -> TrainConfig:
    options: dict[str, object] = {
        "hr_dir": hr,
        "scale": 4,
        "out_dir": out,
        "cache_dir": cache,
        "batch_size": 4,
        "patch_size": 48,
        "log_every": 1,
        "workers": 0,
        "seed": 7,
    }
    options.update(overrides)
    return configure(options)


def _log(out: Path) -> list[dict[str, str]]:
    with (out / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_bicubic_cache_reproduces_the_authors_set5_lr(datasets_dir: Path, tmp_path: Path) -> None:
    set5 = datasets_dir / "Set5"
    made = build_cache(set5 / "HR", scale=4, cache_dir=tmp_path)
    given = build_cache(set5 / "HR", scale=4, cache_dir=tmp_path, lr_dir=set5 / "LR_bicubic" / "x4")
    assert [m.name for m in made] == [g.name for g in given] == sorted(m.name for m in made)
    for m, g in zip(made, given, strict=True):
        assert m.lr != g.lr  # two cache entries, one made here, one read from the folder
        assert np.array_equal(np.load(m.lr[0]), np.load(g.lr[0])), m.name


def test_patches_are_aligned_augmented_and_a_function_of_seed_and_index(
    train_hr: Path, cache_dir: Path
) -> None:
    images = build_cache(train_hr, scale=4, cache_dir=cache_dir)
    dataset = PatchDataset(images, scale=4, patch_size=48, seed=3)
    again = PatchDataset(images, scale=4, patch_size=48, seed=3)
    other_seed = PatchDataset(images, scale=4, patch_size=48, seed=4)
    for k in range(12):
        lr, hr = dataset[k]
        assert lr.dtype == hr.dtype == torch.uint8
        assert lr.shape == (3, 12, 12) and hr.shape == (3, 48, 48)
        assert torch.equal(lr, again[k][0]) and torch.equal(hr, again[k][1])
        assert not torch.equal(hr, other_seed[k][1])
        # The LR patch is the bicubic image of its HR patch, flipped/rotated the same way.
        down = bicubic_lr(hr.permute(1, 2, 0).numpy(), 4)
        assert psnr(down, lr.permute(1, 2, 0).numpy(), border=2) > 30.0


def test_training_from_scratch_lowers_the_l1_loss(
    train_hr: Path, cache_dir: Path, tmp_path: Path
) -> None:
    result = train(_config(train_hr, tmp_path, cache_dir, iterations=40), progress=False)
    losses = [loss for _, loss in result.losses]
    assert [i for i, _ in result.losses] == list(range(1, 41))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"L1 loss: first 5 iterations {first:.4f}, last 5 {last:.4f}")
    assert last < 0.6 * first
    rows = _log(tmp_path)
    assert [int(r["iteration"]) for r in rows] == list(range(1, 41))
    assert all(float(r["lr"]) == pytest.approx(2e-4) for r in rows)
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses, abs=1e-6)
    assert result.best is None  # no validation folder: only last.pth
    model = load_model(result.last, expect=REGISTRY["x4"], verify_sha256=False)
    assert isinstance(model, IMDN) and model.scale == 4


@pytest.fixture(scope="module")
def fine_tuned(
    train_hr: Path,
    cache_dir: Path,
    datasets_dir: Path,
    weights_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> TrainResult:
    set5 = datasets_dir / "Set5"
    config = _config(
        train_hr,
        tmp_path_factory.mktemp("fine_tune"),
        cache_dir,
        init=weights_dir / REGISTRY["x4"].filename,
        learning_rate=1e-7,
        iterations=3,
        val_hr_dir=set5 / "HR",
        val_lr_dir=set5 / "LR_bicubic" / "x4",
    )
    return train(config, progress=False)


def test_fine_tuning_the_official_x4_keeps_its_set5_psnr(fine_tuned: TrainResult) -> None:
    assert fine_tuned.validations and fine_tuned.validations[-1][0] == 3
    psnr_set5 = fine_tuned.validations[-1][1]
    print(f"Set5 x4 after 3 iterations at lr 1e-7: {psnr_set5:.4f} dB")
    assert psnr_set5 == pytest.approx(OFFICIAL_SET5_X4, abs=0.05)
    assert fine_tuned.best_iteration == 3 and fine_tuned.best_psnr == psnr_set5
    assert _log(fine_tuned.out_dir)[-1]["val_psnr"] == f"{psnr_set5:.4f}"


def test_exported_best_loads_like_an_official_checkpoint(
    fine_tuned: TrainResult, datasets_dir: Path, official_model: Callable[[str], IMDN]
) -> None:
    assert fine_tuned.best is not None
    model = load_model(fine_tuned.best, expect=REGISTRY["x4"], verify_sha256=False)
    keys = torch.load(fine_tuned.best, weights_only=True).keys()
    assert {"fea_conv.weight", "IMDB1.cca.conv_du.0.weight", "upsampler.0.bias"} <= set(keys)
    official = official_model("x4")
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(model.state_dict().values(), official.state_dict().values(), strict=True)
    )
    assert 0 < moved < 1e-5  # trained, a little: Adam steps of about lr = 1e-7
    set5 = datasets_dir / "Set5"
    report = evaluate(model, set5 / "HR", lr_dir=set5 / "LR_bicubic" / "x4", scale=4)
    assert report.psnr == pytest.approx(fine_tuned.best_psnr, abs=1e-6)
    # The service loads by registry name with the official sha256: a trained file is refused.
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(fine_tuned.best, expect=REGISTRY["x4"])


def test_resume_continues_the_iterations_schedule_and_weights(
    train_hr: Path, cache_dir: Path, tmp_path: Path
) -> None:
    common: dict[str, object] = {"lr_step": 3, "checkpoint_every": 100}
    whole = train(
        _config(train_hr, tmp_path / "whole", cache_dir, iterations=8, **common), progress=False
    )
    first = train(
        _config(train_hr, tmp_path / "split", cache_dir, iterations=5, **common), progress=False
    )
    checkpoint = first.checkpoint
    assert load_training_state(checkpoint)["iteration"] == 5
    with pytest.raises(ValueError, match="batch_size"):
        configure({"batch_size": 8}, resume=checkpoint)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(_config(train_hr, tmp_path / "split", cache_dir, iterations=8), progress=False)

    # Resume with data-loader workers: the batches do not depend on them.
    resumed = train(configure({"iterations": 8, "workers": 2}, resume=checkpoint), progress=False)
    assert resumed.out_dir == tmp_path / "split"
    assert (resumed.start_iteration, resumed.iteration) == (5, 8)
    assert resumed.learning_rate == whole.learning_rate == pytest.approx(2e-4 * 0.5**2)
    assert resumed.losses == whole.losses[5:]
    assert _log(tmp_path / "split") == _log(tmp_path / "whole")
    a = load_model(whole.last, verify_sha256=False).state_dict()
    b = load_model(resumed.last, verify_sha256=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_imdn_as_trains_on_bicubic_same_size_pairs(
    train_hr: Path, cache_dir: Path, tmp_path: Path
) -> None:
    config = _config(train_hr, tmp_path, cache_dir, scale=1, iterations=3, as_factors=(2, 4))
    images = build_cache(train_hr, scale=1, cache_dir=cache_dir, as_factors=(2, 4))
    for image in images:
        hr = np.load(image.hr)
        assert hr.shape[0] % 4 == 0 and hr.shape[1] % 4 == 0
        degraded = [np.load(p) for p in image.lr]
        assert [d.shape for d in degraded] == [hr.shape] * 2
        # x4 loses more than x2: the pairs are degradations of increasing strength.
        assert psnr(degraded[0], hr) > psnr(degraded[1], hr) + 1.0
    result = train(config, progress=False)
    assert result.iteration == 3 and all(np.isfinite(loss) for _, loss in result.losses)
    model = load_model(result.last, expect=REGISTRY["AS"], verify_sha256=False)
    assert model(torch.rand(1, 3, 48, 60)).shape == (1, 3, 48, 60)


def test_cli_trains_resumes_and_refuses_a_changed_recipe(
    train_hr: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    tiny = ["--batch-size", "2", "--patch-size", "48", "--workers", "0"]
    common = ["--cache-dir", str(cache_dir), "--device", "cpu", *tiny]
    start = ["train", "--hr", str(train_hr), "--scale", "4", "--out", str(out), *common]
    assert main([*start, "--iterations", "2"]) == 0
    checkpoint = out / "checkpoint.pt"
    assert main(["train", "--resume", str(checkpoint), "--iterations", "3"]) == 0
    assert load_training_state(checkpoint)["iteration"] == 3
    assert "trained iterations 2..3" in capsys.readouterr().out
    assert main(["train", "--resume", str(checkpoint), "--learning-rate", "1e-3"]) == 2
    assert "keeps its recipe" in capsys.readouterr().err
    assert main(["train", "--scale", "4", "--out", str(out)]) == 2
    assert "--hr" in capsys.readouterr().err
