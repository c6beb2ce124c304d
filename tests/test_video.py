"""POST /v1/superres/video over a real server, with tiny clips PyAV makes here
(32x24, a dozen frames, VFR, an AAC tone): frames, timestamps, sizes, audio, colour
and rotation kept; each frame close to the image path's answer; refusals before any
frame runs; a client that leaves stops the work and leaves no temporary file."""

from __future__ import annotations

import io
import math
import re
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.live import LiveServer, live_server, wait_until

av = pytest.importorskip("av", reason="the 'video' extra (PyAV) is not installed")

from tests.video_clips import audio_packets, decoded_frames, make_clip  # noqa: E402

URL = "/v1/superres/video"
MP4 = {"content-type": "video/mp4"}
RGB = {"format": "rgb24", "src_colorspace": 1, "src_color_range": 1}  # BT.709, limited
FRAME_PSNR_DB = 40.0
"""Each output frame's luma (BT.709 Y) against the image path's answer for the same
decoded input frame: the difference is H.264's at crf 18. In RGB the bound is lower
(33 dB seen): 4:2:0 halves the chroma, and this pattern's saturated edges alone lose
38 dB to a 4:2:0 round trip without any encoder."""


@pytest.fixture(scope="module")
def temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("video-spool")


@pytest.fixture(scope="module")
def server(weights_dir: Path, temp_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(
        weights_dir=weights_dir,
        models=["x2", "x3"],
        warmup=False,
        video_temp_dir=temp_dir,
        video_max_input_pixels=40 * 30,
        video_max_frames=30,
        video_frames_in_flight=3,
        video_codec_threads=1,
    )
    with live_server(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def clip() -> tuple[bytes, list[float]]:
    return make_clip(rotation=90, sample_aspect_ratio=Fraction(4, 3))


def metric(srv: LiveServer, name: str) -> float:
    text = httpx.get(srv.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_video_round_trip_keeps_frames_timestamps_audio_and_metadata(
    server: LiveServer, clip: tuple[bytes, list[float]], temp_dir: Path
) -> None:
    data, times = clip
    frames_before = metric(server, "imdn_video_frames_total")
    r = httpx.post(f"{server.url}{URL}?scale=2", content=data, headers=MP4, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    assert r.headers["x-imdn-frames"] == "12"
    out = decoded_frames(r.content)
    assert len(out) == 12
    assert [round(f.time, 4) for f in out] == [round(t, 4) for t in times]  # VFR kept
    assert {(f.width, f.height) for f in out} == {(64, 48)}
    assert {f.rotation for f in out} == {90}
    assert (out[0].color_primaries, out[0].colorspace) == (1, 1)
    with av.open(io.BytesIO(r.content)) as c:
        assert c.streams.video[0].sample_aspect_ratio == Fraction(4, 3)
    assert audio_packets(r.content) == audio_packets(data) != []  # copied byte for byte
    with av.open(io.BytesIO(r.content)) as c:
        assert "frag_" not in c.format.name and c.format.name.startswith("mov")
    # each frame against the image path, for the same decoded input frame
    inputs = decoded_frames(data)
    for i in (0, 5, 11):
        png = io.BytesIO()
        Image.fromarray(inputs[i].to_ndarray(**RGB)).save(png, format="PNG")
        ri = httpx.post(
            f"{server.url}/v1/superres?scale=2",
            content=png.getvalue(),
            headers={"content-type": "image/png"},
            timeout=120,
        )
        assert ri.status_code == 200
        expected = np.asarray(Image.open(io.BytesIO(ri.content)).convert("RGB"))
        assert psnr(luma(out[i].to_ndarray(**RGB)), luma(expected)) >= FRAME_PSNR_DB
    assert list(temp_dir.iterdir()) == []
    assert metric(server, "imdn_video_frames_total") - frames_before == 12


def test_vp9_webm_by_accept_from_a_multipart_body_reencodes_the_audio(
    server: LiveServer, clip: tuple[bytes, list[float]]
) -> None:
    data, times = clip
    r = httpx.post(
        f"{server.url}{URL}?scale=2",
        files={"video": ("clip.mp4", data, "video/mp4")},
        headers={"accept": "video/webm"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/webm"
    with av.open(io.BytesIO(r.content)) as c:
        assert c.format.name.startswith("matroska")
        assert [s.codec_context.name for s in c.streams] == ["vp9", "opus"]  # AAC: not in WebM
    out = decoded_frames(r.content)
    assert [round(f.time, 3) for f in out] == [round(t, 3) for t in times]


def test_odd_sides_and_10_bit(server: LiveServer) -> None:
    """17x13 x3 = 51x39: odd sides are encoded 4:4:4; 10-bit stays 10-bit."""
    data, _ = make_clip(width=17, height=13, frames=4, audio=None, pix_fmt="yuv444p10le", vfr=False)
    r = httpx.post(f"{server.url}{URL}?scale=3", content=data, headers=MP4, timeout=300)
    assert r.status_code == 200, r.text
    out = decoded_frames(r.content)
    assert [(f.width, f.height, f.format.name) for f in out] == [(51, 39, "yuv444p10le")] * 4
    r = httpx.post(f"{server.url}{URL}?scale=3&codec=av1", content=data, headers=MP4, timeout=60)
    assert (r.status_code, r.json()["reason"]) == (422, "odd_output_size")


@pytest.mark.parametrize(
    ("body", "headers", "query", "status", "reason"),
    [
        (b"", MP4, "scale=2", 400, "empty_video"),
        (b"not a video at all" * 10, MP4, "scale=2", 400, "undecodable_video"),
        (b"\x89PNG", {"content-type": "image/png"}, "scale=2", 415, "unsupported_video_type"),
        ("gif", MP4, "scale=2", 415, "animated_image"),
        ("audio_only", MP4, "scale=2", 422, "no_video_stream"),
        ("truncated", MP4, "scale=2", 400, "undecodable_video"),
        ("big_frames", MP4, "scale=2", 413, "too_many_pixels"),
        ("many_frames", MP4, "scale=2", 413, "too_many_frames"),
        ("clip", MP4, "scale=9", 422, "scale_out_of_range"),
        ("clip", MP4, "scale=2&crf=60", 422, "bad_crf"),
        ("clip", {**MP4, "accept": "video/mp4"}, "scale=2&codec=vp9", 406, "not_acceptable"),
    ],
)
def test_bad_videos_are_refused_before_any_frame_runs(
    server: LiveServer,
    clip: tuple[bytes, list[float]],
    temp_dir: Path,
    body: bytes | str,
    headers: dict[str, str],
    query: str,
    status: int,
    reason: str,
) -> None:
    if isinstance(body, str):
        body = _bad_file(body, clip[0])
    batches = metric(server, "imdn_batches_total")
    r = httpx.post(f"{server.url}{URL}?{query}", content=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["reason"] == reason
    assert metric(server, "imdn_batches_total") == batches  # no frame ran
    assert list(temp_dir.iterdir()) == []


def _bad_file(kind: str, clip: bytes) -> bytes:
    if kind == "clip":
        return clip
    if kind == "truncated":
        return clip[: len(clip) // 2]
    if kind == "big_frames":  # a tiny file of 2048x2048 frames; the server's limit is 1200 px
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
            stream.width = stream.height = 2048
            black = av.VideoFrame.from_ndarray(np.zeros((2048, 2048, 3), np.uint8), format="rgb24")
            for p in [*stream.encode(black.reformat(format="yuv420p")), *stream.encode()]:
                out.mux(p)
        assert len(buf.getvalue()) < 20_000
        return buf.getvalue()
    if kind == "many_frames":  # 31 frames; the limit is 30
        return make_clip(width=16, height=16, frames=31, audio=None)[0]
    if kind == "audio_only":
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as out:
            stream = out.add_stream("aac", rate=48000)
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate = 48000
            for p in [*stream.encode(frame), *stream.encode()]:
                out.mux(p)
        return buf.getvalue()
    assert kind == "gif"
    buf = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


def test_without_pyav_the_route_says_what_to_install(
    server: LiveServer, clip: tuple[bytes, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.video

    monkeypatch.setattr(service.video, "available", lambda: False)
    r = httpx.post(f"{server.url}{URL}?scale=2", content=clip[0], headers=MP4, timeout=60)
    assert r.status_code == 501
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["reason"] == "video_unavailable"
    assert "imdn-serve[video]" in r.json()["detail"]


def test_a_client_that_leaves_stops_the_work_and_leaves_no_file(
    server: LiveServer, temp_dir: Path
) -> None:
    data, _ = make_clip(frames=30, audio=None)  # 1.8 s (VFR), the server's frame limit
    cancelled = metric(server, 'imdn_video_requests_total{outcome="cancelled"}')
    frames = metric(server, "imdn_video_frames_total")
    with httpx.stream(
        "POST", f"{server.url}{URL}?scale=2", content=data, headers=MP4, timeout=300
    ) as r:
        assert r.status_code == 200
        assert r.headers["x-imdn-frames"] == "30"
        next(r.iter_raw())  # the first fragment (half a second: 9 frames); then it goes
    left_at = metric(server, "imdn_batches_total")
    wait_until(
        lambda: metric(server, 'imdn_video_requests_total{outcome="cancelled"}') > cancelled,
        30,
        "the video counted as cancelled",
    )
    wait_until(lambda: list(temp_dir.iterdir()) == [], 10, "the spooled upload removed")
    # a batch already on the device may finish (slowly, on a loaded machine): once the
    # count has held for 1.5 s, nothing more runs
    batches = metric(server, "imdn_batches_total")
    deadline = time.monotonic() + 30
    while True:
        time.sleep(1.5)
        now = metric(server, "imdn_batches_total")
        if now == batches or time.monotonic() > deadline:
            break
        batches = now
    time.sleep(2.0)
    assert metric(server, "imdn_batches_total") == batches
    assert batches - left_at <= 2  # the batch on the device, and one that had been taken
    assert metric(server, "imdn_video_frames_total") - frames < 30  # it never finished


def test_corrupt_frames_in_the_middle_are_concealed_not_fatal(server: LiveServer) -> None:
    """Garbage over a middle frame's bytes (the container intact): FFmpeg's decoder conceals
    the damage, as a player would, and every frame comes back."""
    data, times = make_clip(frames=12, audio=None, container="matroska", vfr=False)
    with av.open(io.BytesIO(data)) as c:
        packets = [bytes(p) for p in c.demux(video=0) if p.size]
    middle = packets[6]
    at = data.index(middle) + len(middle) // 4
    rng = np.random.default_rng(1)
    damaged = data[:at] + rng.bytes(len(middle) // 2) + data[at + len(middle) // 2 :]
    r = httpx.post(
        f"{server.url}{URL}?scale=2",
        content=damaged,
        headers={"content-type": "video/x-matroska"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    assert len(decoded_frames(r.content)) == 12 == len(times)


def test_a_deadline_before_the_first_byte_is_a_problem(
    server: LiveServer, clip: tuple[bytes, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.app.state.settings, "video_timeout_s", 1e-6)
    r = httpx.post(f"{server.url}{URL}?scale=2", content=clip[0], headers=MP4, timeout=60)
    assert r.status_code == 504
    assert r.json()["reason"] == "deadline_exceeded"


def test_an_error_after_the_first_byte_cuts_the_stream(
    server: LiveServer, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode error mid-stream (injected at frame 20, after the first fragment of 13
    frames has left: real damage is concealed) ends the body without its final chunk, so
    the client knows it is incomplete."""
    from service.video import decode
    from service.video.errors import undecodable

    items = decode.Decoder.items

    def failing(self: decode.Decoder) -> Iterator[decode.Item]:
        for item in items(self):
            if isinstance(item, decode.Frame) and item.index == 20:
                raise undecodable("the video stops decoding after 20 frames: injected")
            yield item

    monkeypatch.setattr(decode.Decoder, "items", failing)
    aborted = metric(server, 'imdn_video_aborted_total{reason="undecodable_video"}')
    data, _ = make_clip(frames=30, audio=None, vfr=False)
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError, match="incomplete"),
        httpx.stream(
            "POST", f"{server.url}{URL}?scale=2", content=data, headers=MP4, timeout=300
        ) as r,
    ):
        assert r.status_code == 200
        for chunk in r.iter_raw():
            received += chunk
    assert received[4:8] == b"ftyp"  # the first fragment had left
    after = metric(server, 'imdn_video_aborted_total{reason="undecodable_video"}')
    assert after == aborted + 1
    wait_until(lambda: list(temp_dir.iterdir()) == [], 10, "the spooled upload removed")


# ------------------------------------------------------------------ imdn upscale


def test_imdn_upscale_does_a_folder_of_images_and_videos_each_its_way(
    weights_dir: Path,
    tmp_path: Path,
    clip: tuple[bytes, list[float]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.cli import main

    monkeypatch.setenv("IMDN_WARMUP", "false")
    monkeypatch.setenv("IMDN_DEVICE", "cpu")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(clip[0])
    Image.new("RGB", (20, 16), (200, 30, 30)).save(folder / "still.png")
    out = tmp_path / "out"
    args = ["upscale", str(folder), "--scale", "2", "-o", str(out)]
    assert main([*args, "--weights-dir", str(weights_dir)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip_x2.mp4", "still_x2.png"]
    data = (out / "clip_x2.mp4").read_bytes()
    frames = decoded_frames(data)
    assert [round(f.time, 4) for f in frames] == [round(t, 4) for t in clip[1]]
    assert {(f.width, f.height) for f in frames} == {(64, 48)}
    assert audio_packets(data) == audio_packets(clip[0])
    with Image.open(out / "still_x2.png") as img:
        assert img.size == (40, 32)


def test_imdn_upscale_a_video_on_a_server(
    server: LiveServer, tmp_path: Path, clip: tuple[bytes, list[float]]
) -> None:
    from service.cli import main

    source = tmp_path / "clip.mp4"
    source.write_bytes(clip[0])
    target = tmp_path / "up.mp4"
    assert (
        main(["upscale", str(source), "--scale", "2", "-o", str(target), "--url", server.url]) == 0
    )
    frames = decoded_frames(target.read_bytes())
    assert len(frames) == 12 and (frames[0].width, frames[0].height) == (64, 48)
    # a refused video: a message, exit 1, no file
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 20)
    assert (
        main(
            [
                "upscale",
                str(bad),
                "--scale",
                "2",
                "-o",
                str(tmp_path / "b.mp4"),
                "--url",
                server.url,
            ]
        )
        == 1
    )
    assert not (tmp_path / "b.mp4").exists() and not list(tmp_path.glob("*.part"))


def test_the_fragment_counter_counts_frames_as_bytes_arrive(
    server: LiveServer, clip: tuple[bytes, list[float]]
) -> None:
    from service.video.cli import FragmentCounter

    r = httpx.post(f"{server.url}{URL}?scale=2", content=clip[0], headers=MP4, timeout=300)
    counter, seen = FragmentCounter(), []
    for at in range(0, len(r.content), 97):  # pieces that split boxes anywhere
        seen.append(counter.feed(r.content[at : at + 97]))
    assert sum(seen) == counter.frames == 12
    assert sum(1 for n in seen if n) >= 2  # progress came in steps, not at the end


def test_an_image_beside_a_long_video_is_served_about_as_fast_as_alone(
    server: LiveServer,
) -> None:
    """The video's frames are requests of their own in the batcher's turns: an image sent
    while a video streams waits for a batch or so, not for the video."""
    import threading

    png = io.BytesIO()
    Image.fromarray(np.asarray(Image.new("RGB", (24, 20), (10, 200, 90)))).save(png, "PNG")

    timings: list[str] = []

    def image_seconds() -> float:
        t0 = time.perf_counter()
        r = httpx.post(
            f"{server.url}/v1/superres?scale=2",
            content=png.getvalue(),
            headers={"content-type": "image/png"},
            timeout=120,
        )
        assert r.status_code == 200
        timings.append(r.headers["server-timing"])
        return time.perf_counter() - t0

    alone = min(image_seconds() for _ in range(3))
    data, _ = make_clip(frames=30, audio=None, vfr=False)
    frames_done = metric(server, "imdn_video_frames_total")
    done = threading.Event()

    def watch_video() -> None:  # reads until the image is back, then leaves
        with httpx.stream(
            "POST", f"{server.url}{URL}?scale=2", content=data, headers=MP4, timeout=300
        ) as r:
            for _ in r.iter_raw():
                if done.is_set():
                    return

    video = threading.Thread(target=watch_video)
    video.start()
    try:
        wait_until(
            lambda: (
                metric(server, "imdn_video_frames_total") > frames_done
                or metric(server, "imdn_batches_total") > 0
            ),
            60,
            "the video's frames running",
        )
        beside = image_seconds()
        video_frames_then = metric(server, "imdn_video_frames_total") - frames_done
    finally:
        done.set()
        video.join(timeout=300)
    # it did not wait for the video, and took about its own time plus one batch of the
    # video's frames ahead of it (up to 2 s on this loaded shared CPU: a generous bound)
    assert video_frames_then < 30
    assert beside < 3 * alone + 3.0, (alone, beside, timings)


# ------------------------------------------------------------------ the page


def test_the_video_page_upscales_a_clip_and_plays_it(server: LiveServer, tmp_path: Path) -> None:
    from tests.browser import chromium, guarded_page

    data, _ = make_clip(frames=16, audio=None, vfr=False)  # 0.64 s: fragments every 0.5 s
    source = tmp_path / "clip.mp4"
    source.write_bytes(data)
    with chromium() as browser, guarded_page(browser) as g:
        page = g.page
        page.goto(f"{server.url}/video")
        page.locator("#server-info", has_text="models").wait_for()
        page.set_input_files("#file", source)
        assert page.input_value("#codec") == "h264"  # MP4, whose fragments give progress
        page.evaluate(
            """() => {
              const text = document.getElementById("progress-text");
              window.progressSeen = [];
              new MutationObserver(() => window.progressSeen.push(text.textContent))
                .observe(text, {childList: true, characterData: true, subtree: true});
            }"""
        )
        page.click("#run")
        page.wait_for_selector("#result:not([hidden])")
        played = page.evaluate(
            """() => new Promise((resolve) => {
              const v = document.getElementById("player");
              v.muted = true;
              v.addEventListener("error", () => resolve(["error", v.error && v.error.code]));
              v.addEventListener("timeupdate", () => {
                if (v.currentTime > 0.3) resolve([v.videoWidth, v.videoHeight, v.currentTime]);
              });
              v.play();
            })"""
        )
        seen = page.evaluate("window.progressSeen")
        # the page's fragment counter, fed the same answer in 2 KB pieces as a slow network
        # would deliver it (here the whole answer can arrive in one read)
        answer = httpx.post(f"{server.url}{URL}?scale=2", content=data, headers=MP4, timeout=60)
        pieces = page.evaluate(
            """(answer) => {
              const bytes = Uint8Array.from(answer), counter = new FragmentCounter();
              const counts = [];
              for (let at = 0; at < bytes.length; at += 2048)
                counts.push(counter.feed(bytes.subarray(at, at + 2048)));
              return counts;
            }""",
            list(answer.content),
        )
        name = page.get_attribute("#download", "download")
        assert not g.outside() and not g.refused
    assert played[:2] == [64, 48], played  # decoded and played
    assert name == "clip_x2.mp4"
    # frames counted from the fragments as they arrived, at a believable rate (the clip
    # takes at least a few milliseconds)
    shown = [m for t in seen if (m := re.match(r"(\d+) / 16 frames · ([\d.]+) frames/s", t))]
    counts = [int(m[1]) for m in shown]
    assert counts and counts == sorted(counts) and counts[-1] == 16, seen
    assert all(float(m[2]) < 1000 for m in shown), seen
    # the first fragment (half a second: 13 frames) counted before the answer's end
    assert any(0 < n < 16 for n in pieces), pieces
    assert pieces == sorted(pieces) and pieces[-1] == 16, pieces


def test_imdn_upscale_without_pyav_says_what_to_install(
    weights_dir: Path,
    tmp_path: Path,
    clip: tuple[bytes, list[float]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import service.video
    from service.cli import main

    monkeypatch.setattr(service.video, "available", lambda: False)
    monkeypatch.setenv("IMDN_WARMUP", "false")
    source = tmp_path / "clip.mp4"
    source.write_bytes(clip[0])
    args = ["upscale", str(source), "--scale", "2", "-o", str(tmp_path / "out.mp4")]
    assert main([*args, "--weights-dir", str(weights_dir)]) == 1
    assert "pip install 'imdn-serve[video]'" in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists() and not list(tmp_path.glob("*.part"))


def test_frames_that_find_the_queue_full_wait_their_turn(
    weights_dir: Path,
    temp_dir: Path,
    clip: tuple[bytes, list[float]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A queue of one crop and four frames in flight: three of them are refused by the
    batcher each time (429 for an image) and try again; the video still comes back whole."""
    settings = Settings(
        weights_dir=weights_dir,
        models=["x2"],
        warmup=False,
        max_queue_crops=1,
        video_frames_in_flight=4,
        video_temp_dir=temp_dir,
    )
    from service.batcher import Batcher
    from service.errors import QueueFull

    admit, refused = Batcher.admit, []

    def counting(self: Batcher, *args: object, **kwargs: object) -> object:
        try:
            return admit(self, *args, **kwargs)  # type: ignore[arg-type]
        except QueueFull:
            refused.append(args)
            raise

    monkeypatch.setattr(Batcher, "admit", counting)
    with live_server(settings) as srv:
        r = httpx.post(f"{srv.url}{URL}?scale=2", content=clip[0], headers=MP4, timeout=300)
    assert r.status_code == 200, r.text
    assert refused  # the queue was full for some frames, which came back all the same
    assert [round(f.time, 4) for f in decoded_frames(r.content)] == [round(t, 4) for t in clip[1]]


def test_a_late_start_and_b_frames_keep_every_timestamp(server: LiveServer) -> None:
    """A MOV whose first frame is at 0.233 s, coded with B-frames: the first timestamp
    stays where it was (the fragmented MP4's edit list says so), as do the others."""
    data, times = make_clip(container="mov", start_ms=233, b_frames=2, frames=10)
    assert times[0] == 0.233
    r = httpx.post(
        f"{server.url}{URL}?scale=2",
        content=data,
        headers={"content-type": "video/quicktime"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    out = decoded_frames(r.content)
    assert [round(f.time, 4) for f in out] == [round(f.time, 4) for f in decoded_frames(data)]
    assert [round(f.time, 4) for f in out] == [round(t, 4) for t in times]
    assert audio_packets(r.content) == audio_packets(data) != []


def test_the_report_gets_a_video_row_and_the_image_rows_stay_as_they_were(
    server: LiveServer, clip: tuple[bytes, list[float]]
) -> None:
    """A video streamed to its end adds to its (model, scale, frame size) row of
    /v1/report, per frame; its frames are not counted as images, and a refused video
    adds nothing."""
    from service.report import VIDEO_HEADER

    def report() -> tuple[list[Any], dict[tuple[str, str, str], dict[str, Any]]]:
        body = httpx.get(server.url + "/v1/report").json()
        assert {"video_forward_*_seconds", "video_request_*_seconds"} <= set(body["measures"])
        videos = {(v["model"], v["scale"], v["frame_size"]): v for v in body["videos"]}
        return body["models"], videos

    images_before, videos_before = report()
    refused = httpx.post(f"{server.url}{URL}?scale=9", content=clip[0], headers=MP4, timeout=60)
    assert refused.status_code == 422
    assert report() == (images_before, videos_before)

    r = httpx.post(f"{server.url}{URL}?scale=3", content=clip[0], headers=MP4, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["x-imdn-model"] == "x3"
    images_after, videos_after = report()
    assert images_after == images_before  # the frames went through the engine, not as images
    key = ("x3", "3", "32x24")  # decoded size: the clip's rotation tag is metadata
    assert set(videos_after) - set(videos_before) <= {key}
    row, prior = videos_after[key], videos_before.get(key, {"videos": 0, "frames": 0})
    assert (row["videos"] - prior["videos"], row["frames"] - prior["frames"]) == (1, 12)
    assert 0 < row["forward_p50_seconds"] <= row["forward_p95_seconds"]
    assert row["forward_mean_seconds"] > 0
    assert 0 < row["request_p50_seconds"] <= row["request_p95_seconds"]
    assert row["request_mean_seconds"] * 12 < 300  # a video's time, shared by its frames
    assert row["peak_memory_mib"] > 0

    md = httpx.get(server.url + "/v1/report", headers={"Accept": "text/markdown"}).text
    assert "| " + " | ".join(VIDEO_HEADER) + " |" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| x3 | 3 | 32x24 |"))
    assert line.split("|")[5].strip() == f"{row['frames']:,}"
    assert "- **request**: per frame: a video's whole time" in md


def test_the_report_pools_video_rows_past_its_bound() -> None:
    """Frame sizes are the user's: past MAX_VIDEO_ROWS rows, new ones pool per model."""
    from service.report import MAX_VIDEO_ROWS, Report

    report = Report()
    report.record_video("AS", "2", (8, 8), 0, 1.0, [], 0)  # no frame: no row
    for i in range(MAX_VIDEO_ROWS + 3):
        report.record_video("AS", "2.5", (40 - i % 2, 16 + i), 2, 1.0, [0.1, 0.2], 2**20)
    rows = report.video_rows(["x2", "AS"])
    assert len(rows) == MAX_VIDEO_ROWS + 1
    assert (rows[0].model, rows[0].scale, rows[0].frame_size) == ("AS", "2.5", "40x16")
    assert (rows[-1].scale, rows[-1].frame_size, rows[-1].videos, rows[-1].frames) == (
        "other",
        "other",
        3,
        6,
    )
    assert rows[0].request_mean_seconds == pytest.approx(0.5)  # 1 s over 2 frames
    assert rows[0].forward_mean_seconds == pytest.approx(0.15)
    assert rows[0].peak_memory_mib == pytest.approx(1.0)


def test_frames_run_whole_where_images_of_their_size_are_tiled(
    weights_dir: Path, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without shape buckets a frame of up to IMDN_VIDEO_TILE_MAX_PIXELS runs as one crop
    (tiles would redo their context every frame), while an image of the same size follows
    IMDN_TILE_MAX_PIXELS and is cut into tiles."""
    settings = Settings(
        weights_dir=weights_dir,
        models=["x2"],
        warmup=False,
        tile_max_pixels=48 * 48,
        tile_padding=8,
        video_tile_max_pixels=64 * 64,
        video_temp_dir=temp_dir,
    )
    from service.batcher import Batcher

    submit, crops = Batcher.submit, []

    def counting(self: Batcher, key: Any, count: int, *args: Any, **kwargs: Any) -> Any:
        crops.append(count)
        return submit(self, key, count, *args, **kwargs)

    monkeypatch.setattr(Batcher, "submit", counting)
    data, times = make_clip(width=64, height=56, frames=3, audio=None, vfr=False)
    png = io.BytesIO()
    Image.fromarray(np.full((56, 64, 3), 120, np.uint8)).save(png, format="PNG")
    with live_server(settings) as srv:
        image = httpx.post(
            f"{srv.url}/v1/superres?scale=2",
            content=png.getvalue(),
            headers={"content-type": "image/png"},
            timeout=120,
        )
        assert image.status_code == 200 and int(image.headers["X-IMDN-Crops"]) > 1
        crops.clear()
        r = httpx.post(f"{srv.url}{URL}?scale=2", content=data, headers=MP4, timeout=300)
    assert r.status_code == 200, r.text
    frames = decoded_frames(r.content)
    assert len(frames) == len(times) and (frames[0].width, frames[0].height) == (128, 112)
    assert crops == [1] * len(times), crops
