"""`imdn upscale --url`: the command line as a client of a real server on loopback."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.child import free_port
from service.cli import main
from service.client import BACKOFF_CAP_S, describe_refusal, retry_delay
from service.settings import Settings
from tests.live import LiveServer, live_server, wait_until

SIZES = [(40, 56), (48, 36), (32, 32)]  # (height, width) of the inputs


@pytest.fixture(scope="module")
def server(weights_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(weights_dir=weights_dir, models=["x3"], warmup=False)
    with live_server(settings) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMDN_API_KEY", raising=False)


def _crops(datasets_dir: Path, folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """PNG crops of a Set5 image, one per (height, width), at different places."""
    with Image.open(datasets_dir / "Set5" / "HR" / "baby.bmp") as img:
        source = np.asarray(img.convert("RGB"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"crop{i}.png"
        top, left = 30 * i % (source.shape[0] - h), 40 * i % (source.shape[1] - w)
        Image.fromarray(source[top : top + h, left : left + w]).save(path)
        paths.append(path)
    return paths


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_a_folder_with_a_refused_file_among_good_ones(
    server: LiveServer, datasets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = _crops(datasets_dir, tmp_path / "in", SIZES)
    bad = tmp_path / "in" / "broken.png"  # a PNG cut short: the server's 400
    bad.write_bytes(inputs[0].read_bytes()[:300])
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "in"), "--scale", "3", "-o", str(out)]
    code = main([*args, "--url", server.url, "--concurrency", "3"])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # one file failed

    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}_x3.png" for p in inputs)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for path, (h, w) in zip(inputs, SIZES, strict=True):
            result = (out / f"{path.stem}_x3.png").read_bytes()
            with Image.open(io.BytesIO(result)) as img:
                assert (img.format, img.size) == ("PNG", (3 * w, 3 * h))
            assert f"{path} -> {out / f'{path.stem}_x3.png'} ({3 * w}x{3 * h}, x3)" in captured.out
            direct = c.post("/v1/superres?scale=3", content=path.read_bytes())
            assert np.abs(_rgb(result).astype(int) - _rgb(direct.content)).max() <= 1
        refused = c.post("/v1/superres?scale=3", content=bad.read_bytes())
    problem = refused.json()
    # the server's own words for the refused file, and the rest went on
    assert f"{bad}: failed: 400 {problem['title']}: {problem['detail']}" in captured.err
    assert f"[{problem['reason']}]" in captured.err
    assert "3 of 4 done, 1 failed, 0 skipped, 0 retries" in captured.err
    assert not list(out.glob("*.part"))


def test_a_full_queue_is_retried_after_retry_after(
    weights_dir: Path, datasets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # one crop in the queue at a time, held there 300 ms for company: concurrent files
    # are refused with 429 until the one before them has run
    settings = Settings(
        weights_dir=weights_dir,
        models=["x3"],
        warmup=False,
        max_queue_crops=1,
        max_batch_wait_ms=300,
    )
    inputs = _crops(datasets_dir, tmp_path / "in", [(24, 24)] * 3)
    out = tmp_path / "out"
    with live_server(settings) as srv:
        args = ["upscale", *map(str, inputs), "--scale", "3", "-o", str(out), "--url", srv.url]
        code = main([*args, "--concurrency", "3", "--retries", "10"])
        metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for path in inputs:
        with Image.open(out / f"{path.stem}_x3.png") as img:
            assert img.size == (72, 72)
    refusals = {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "imdn_errors_total"
    }
    assert refusals.get("queue_full", 0) >= 1  # the server did refuse some
    retries = re.findall(r"429 Too Many Requests: .*; trying again in (\d+\.\d) s", captured.err)
    assert len(retries) == refusals["queue_full"]
    assert all(float(s) >= 1.0 for s in retries)  # the server's Retry-After (>= 1 s) held
    assert f"3 of 3 done, 0 failed, 0 skipped, {len(retries)} retries" in captured.err


def test_api_key_from_the_environment_or_the_option(
    weights_dir: Path,
    datasets_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(weights_dir=weights_dir, models=["x3"], warmup=False, api_keys=["k-123"])
    (image,) = _crops(datasets_dir, tmp_path / "in", [(20, 28)])
    with live_server(settings) as srv:
        base = ["upscale", str(image), "--scale", "3", "--url", srv.url]
        # no key: refused once, before any file is sent
        assert main([*base, "-o", str(tmp_path / "none.png")]) == 2
        err = capsys.readouterr().err
        assert "no API key" in err and "401 Unauthorized" in err and "IMDN_API_KEY" in err
        assert main([*base, "-o", str(tmp_path / "wrong.png"), "--api-key", "nope"]) == 2
        assert "the API key was refused" in capsys.readouterr().err
        assert not (tmp_path / "none.png").exists() and not (tmp_path / "wrong.png").exists()

        monkeypatch.setenv("IMDN_API_KEY", "k-123")
        assert main([*base, "-o", str(tmp_path / "env.png")]) == 0
        monkeypatch.delenv("IMDN_API_KEY")
        assert main([*base, "-o", str(tmp_path / "opt.png"), "--api-key", "k-123"]) == 0
    for name in ("env.png", "opt.png"):
        with Image.open(tmp_path / name) as img:
            assert img.size == (84, 60)


def test_no_server_there_fails_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["upscale", str(image), "--scale", "3", "--url", url]) == 2
    assert f"cannot reach the server at {url}" in capsys.readouterr().err


def test_local_only_options_are_refused_with_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    args = ["upscale", str(image), "--scale", "3", "--url", "http://127.0.0.1:1"]
    assert main([*args, "--device", "cpu"]) == 2
    assert "--weights-dir and --device are for local runs" in capsys.readouterr().err
    assert main([*args, "--concurrency", "0"]) == 2


def test_retry_delay_honours_retry_after_else_backs_off() -> None:
    no_jitter = {"jitter": lambda: 0.0}
    assert retry_delay({"retry-after": "3"}, 0, **no_jitter) == 3.0
    assert retry_delay({"retry-after": "0"}, 4, **no_jitter) == 0.0
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    date = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert retry_delay({"retry-after": date}, 0, now=now, **no_jitter) == 7.0
    # no header, or one that is neither seconds nor a date: exponential back-off, capped
    assert [retry_delay({}, a, **no_jitter) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay({"retry-after": "soon"}, 1, **no_jitter) == 1.0
    assert retry_delay({}, 30, **no_jitter) == BACKOFF_CAP_S
    # jitter only ever adds, up to 20 %
    assert retry_delay({"retry-after": "10"}, 0, jitter=lambda: 1.0) == pytest.approx(12.0)


def test_describe_refusal_reads_the_problem_document() -> None:
    headers = {"content-type": "application/problem+json"}
    body = b'{"title": "Unsupported Media Type", "detail": "not an image", "reason": "bad"}'
    assert describe_refusal(415, headers, body) == "415 Unsupported Media Type: not an image [bad]"
    errors = (
        b'{"title": "Unprocessable Content", "detail": [{"loc": ["query", "scale"], "msg": "x"}]}'
    )
    assert describe_refusal(422, headers, errors) == "422 Unprocessable Content: query.scale: x"
    assert (
        describe_refusal(502, {"content-type": "text/html"}, b"Bad gateway") == "502: Bad gateway"
    )


def _direct(client: httpx.Client, path: Path, scale: str = "3", accept: str = "image/png") -> bytes:
    r = client.post(
        f"/v1/superres?scale={scale}", content=path.read_bytes(), headers={"Accept": accept}
    )
    assert r.status_code == 200, r.text
    return r.content


def test_same_stems_never_share_an_output_and_folders_are_walked_on_request(
    server: LiveServer, datasets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`baboon.png` and `baboon.jpg` in one folder: each keeps its whole name in its
    result's; a non-image is reported as skipped; a sub-folder is walked with --recursive."""
    folder = tmp_path / "in"
    png, other = _crops(datasets_dir, folder, [(20, 24), (24, 20)])
    png = png.rename(folder / "baboon.png")
    jpg = folder / "baboon.jpg"
    Image.open(other).convert("RGB").save(jpg, quality=95)
    other.unlink()
    (folder / "notes.txt").write_text("not an image")
    sub = folder / "sub"
    sub.mkdir()
    nested = sub / "baboon.png"
    nested.write_bytes(png.read_bytes())
    out = tmp_path / "out"
    args = ["upscale", str(folder), "--scale", "3", "-o", str(out), "--url", server.url]

    assert main(args) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["baboon.jpg_x3.png", "baboon.png_x3.png"]
    assert f"{folder / 'notes.txt'}: skipped: not an image" in err
    assert f"{sub}: skipped: a folder (--recursive walks into folders)" in err
    assert "2 of 2 done, 0 failed, 2 skipped, 0 retries" in err
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for source in (png, jpg):  # each result is its own input's
            assert np.array_equal(
                _rgb((out / f"{source.name}_x3.png").read_bytes()), _rgb(_direct(c, source))
            )

        # again, into sub-folders, leaving what is there: only the nested file is sent
        assert main([*args, "--recursive", "--skip-existing"]) == 0
        err = capsys.readouterr().err
        assert f"{png}: skipped: {out / 'baboon.png_x3.png'} exists (--skip-existing)" in err
        assert "1 of 1 done, 0 failed, 3 skipped, 0 retries" in err
        result = (out / "sub" / "baboon_x3.png").read_bytes()
        assert np.array_equal(_rgb(result), _rgb(_direct(c, nested)))
    assert not list(out.rglob("*.part"))


def test_output_formats_webp_and_jpeg_with_quality(
    server: LiveServer, datasets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (image,) = _crops(datasets_dir, tmp_path / "in", [(20, 28)])
    rgba = tmp_path / "in" / "see-through.png"
    Image.new("RGBA", (16, 12), (200, 40, 40, 128)).save(rgba)
    out = tmp_path / "out"
    base = ["upscale", str(image), "--scale", "3", "--url", server.url]
    # WebP at 100 is lossless: the very pixels of the PNG answer
    assert main([*base, "-o", str(out / "lossless.webp"), "--quality", "100"]) == 0
    # JPEG from --format, for a folder (with an image that has alpha: JPEG cannot hold it)
    assert (
        main(
            [
                *base[:1],
                str(tmp_path / "in"),
                *base[2:],
                "-o",
                str(out),
                "--format",
                "jpeg",
                "--quality",
                "60",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    with httpx.Client(base_url=server.url, timeout=120) as c:
        png = _direct(c, image)
        lossy = _direct(c, image, accept="image/jpeg")
        jpeg60 = c.post(
            "/v1/superres?scale=3&quality=60",
            content=image.read_bytes(),
            headers={"Accept": "image/jpeg"},
        ).content
    with Image.open(out / "lossless.webp") as img:
        assert (img.format, img.size) == ("WEBP", (84, 60))
    assert np.array_equal(_rgb((out / "lossless.webp").read_bytes()), _rgb(png))
    with Image.open(out / "crop0_x3.jpg") as img:
        assert (img.format, img.size) == ("JPEG", (84, 60))
    assert (out / "crop0_x3.jpg").read_bytes() == jpeg60 != lossy  # quality 60, not 90
    assert f"{rgba}: failed: 406 Not Acceptable" in err
    assert not (out / "see-through_x3.jpg").exists()
    assert "1 of 2 done, 1 failed, 0 skipped" in err
    # a suffix that is no output format, or one that contradicts --format: refused up front
    assert main([*base, "-o", str(out / "x.tif")]) == 2
    assert main([*base, "-o", str(out / "x.png"), "--format", "webp"]) == 2
    assert main([*base, "-o", str(out), "--quality", "0"]) == 2


def test_a_scale_the_server_refuses_is_one_error_not_one_per_file(
    server: LiveServer,
    weights_dir: Path,
    datasets_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _crops(datasets_dir, tmp_path / "in", [(16, 16)] * 6)
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "in"), "-o", str(out)]
    # over the server's IMDN_MAX_SCALE: its first refusal ends the run, said once
    capped = Settings(weights_dir=weights_dir, models=["x3"], warmup=False, max_scale=2.5)
    with live_server(capped) as srv:
        assert main([*args, "--url", srv.url, "--scale", "3", "--concurrency", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("scale must be a number in (1, 2.5]") == 1, err
    assert "imdn: error: the server refuses this run: 422" in err
    assert re.search(r"0 of 6 done, 6 failed, 0 skipped, 0 retries, [4-6] not sent", err), err
    # x2 needs a model this server (x3 only) does not load: said before any file is sent
    assert main([*args, "--url", server.url, "--scale", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("needs model 'x2', which this server does not load") == 1, err
    assert "done" not in err
    # and what is no scale at all is refused by the command itself
    assert main([*args, "--url", server.url, "--scale", "1"]) == 2
    assert main([*args, "--url", server.url, "--scale", "nan"]) == 2
    assert "--scale must be a number > 1" in capsys.readouterr().err
    assert not out.exists()


def test_a_server_gone_mid_run_ends_it_quickly(
    weights_dir: Path, datasets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server stops after the first results: the run ends within seconds, the files
    not sent counted, instead of `--retries` back-offs for every remaining file."""
    # each request waits 300 ms for company in the batch: the run lasts long enough
    settings = Settings(weights_dir=weights_dir, models=["x3"], warmup=False, max_batch_wait_ms=300)
    inputs = _crops(datasets_dir, tmp_path / "in", [(16, 16)] * 16)
    out = tmp_path / "out"
    codes: list[int] = []
    with live_server(settings) as srv:
        args = ["upscale", str(tmp_path / "in"), "--scale", "3", "-o", str(out), "--url", srv.url]
        thread = threading.Thread(target=lambda: codes.append(main([*args, "--concurrency", "2"])))
        thread.start()
        wait_until(lambda: any(out.glob("*_x3.png")), 60, "a first result")
    gone = time.monotonic()  # the server has drained and closed its socket
    thread.join(timeout=60)
    elapsed = time.monotonic() - gone
    err = capsys.readouterr().err
    assert codes == [1], err
    assert elapsed < 8, err  # before: up to 5 retries (15 s of back-off) per file
    done = len(list(out.glob("*_x3.png")))
    assert 1 <= done < len(inputs)
    assert "connection failures in a row" in err
    summary = re.search(
        r"(\d+) of 16 done, (\d+) failed, 0 skipped, \d+ retries, (\d+) not sent", err
    )
    assert summary is not None, err
    assert int(summary[1]) == done and int(summary[3]) >= len(inputs) - done - 4
    assert not list(out.glob("*.part"))
