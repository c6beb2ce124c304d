"""Which files an `imdn upscale` run reads and where each result goes (service/jobs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.jobs import FORMATS, PartFile, PlanError, output_format, plan_run


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def _targets(tmp_path: Path, *inputs: Path, **options: bool) -> dict[str, str]:
    plan = plan_run(list(inputs), tmp_path / "out", 2, FORMATS["png"], **options)
    return {
        str(j.source.relative_to(tmp_path)): str(j.target.relative_to(tmp_path / "out"))
        for j in plan.jobs
    }


def test_same_stems_keep_their_whole_names_others_their_stems(tmp_path: Path) -> None:
    d = tmp_path / "in"
    _touch(
        d / "baboon.png",
        d / "baboon.JPG",
        d / "Baboon.tif",
        d / "lenna.png",
        d / "x" / "baboon.png",
    )
    assert _targets(tmp_path, d, recursive=True) == {
        # case-insensitive disks would make baboon_x2.png and Baboon_x2.png one file
        "in/Baboon.tif": "Baboon.tif_x2.png",
        "in/baboon.JPG": "baboon.JPG_x2.png",
        "in/baboon.png": "baboon.png_x2.png",
        "in/lenna.png": "lenna_x2.png",
        "in/x/baboon.png": "x/baboon_x2.png",  # alone in its own folder
    }


def test_a_clash_that_names_cannot_undo_is_refused_before_anything_runs(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "photo.png", tmp_path / "b" / "photo.png"
    _touch(a, b)
    with pytest.raises(PlanError, match="would be written to the same file"):
        plan_run([a, b], tmp_path / "out", 2, FORMATS["png"])
    with pytest.raises(PlanError, match="overwrite its input"):
        plan_run([a], a, 2, FORMATS["png"])


def test_the_output_folder_inside_an_input_is_not_an_input(tmp_path: Path) -> None:
    _touch(tmp_path / "in" / "a.png", tmp_path / "in" / "out" / "a_x2.png")
    plan = plan_run([tmp_path / "in"], tmp_path / "in" / "out", 2, FORMATS["png"], recursive=True)
    assert [j.source.name for j in plan.jobs] == ["a.png"] and not plan.skipped


def test_format_from_the_option_or_the_output_name(tmp_path: Path) -> None:
    assert output_format(None, tmp_path / "out").name == "png"
    assert output_format(None, tmp_path / "big.JPEG").name == "jpeg"
    assert output_format("webp", tmp_path / "out").suffix == ".webp"
    with pytest.raises(PlanError):
        output_format(None, tmp_path / "big.gif")
    with pytest.raises(PlanError):
        output_format("png", tmp_path / "big.webp")


def test_part_files_are_each_their_own(tmp_path: Path) -> None:
    target = tmp_path / "out" / "a_x2.png"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_x2.png.part").write_bytes(b"another run's")  # the old fixed name
    with PartFile(target) as one, PartFile(target) as two:
        assert len({one.path, two.path, target.with_name("a_x2.png.part")}) == 3
        one.path.write_bytes(b"one")
        two.path.write_bytes(b"two")
        two.commit()
    assert target.read_bytes() == b"two"
    assert (tmp_path / "out" / "a_x2.png.part").read_bytes() == b"another run's"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x2.png", "a_x2.png.part"]


def test_a_folder_without_images_is_an_error_not_a_quiet_success(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    (tmp_path / "notes.txt").write_text("no image")
    assert main(["upscale", str(tmp_path), "--scale", "2", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'notes.txt'}: skipped: not an image" in err
    assert "imdn: error: no images or videos found in the inputs" in err
