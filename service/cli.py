"""The `imdn` command: serve, upscale, eval, profile, bench, train, fetch-weights."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError
from tqdm import tqdm

from models.networks.checkpoints import (
    OFFICIAL_BASE_URL,
    REGISTRY,
    CheckpointError,
    fetch,
    load_model,
    load_official,
)
from models.networks.descriptor import describe
from models.networks.imdn import build_model
from models.networks.profile import mult_adds_per_output_pixel
from service.planner import FIXED_SCALES
from service.report import markdown_table
from service.video.cli import is_video
from service.video.cli import report as video_report
from service.video.cli import upscale_local as upscale_video_here
from service.video.cli import upscale_remote as upscale_video_remote

if TYPE_CHECKING:
    from service.jobs import Job, OutputFormat, Plan


def _default_weights_dir() -> Path:
    return Path(os.environ.get("IMDN_WEIGHTS_DIR", "weights"))


def _fail(message: str, code: int = 2) -> int:
    print(f"imdn: error: {message}", file=sys.stderr)
    return code


# serve


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.http_server import server_config
    from service.settings import SettingsInvalid, load_settings

    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "weights_dir": args.weights_dir,
            "device": args.device,
            "fetch_weights": args.fetch_weights or None,
        }.items()
        if v is not None
    }
    try:
        settings = load_settings(**overrides)
    except SettingsInvalid as exc:
        return _fail_at_start(exc.problems)
    from service.logs import configure as configure_logging

    # one handler for every logger, uvicorn's too (log_config=None keeps uvicorn from
    # installing its own); the access log is the app's (request IDs, durations, no probes)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = server_config(
        app,
        settings,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        workers=1,  # one process owns the device; scale out with more processes
        timeout_graceful_shutdown=int(settings.request_timeout_s),
    )
    # uvicorn re-raises the signal it drained on once it is done; a drained SIGTERM is a
    # clean stop, so let that re-raise land on a no-op and exit 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        DrainingServer(config, drain=app.state.engine.drain).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, turn readiness to 503 first, then let uvicorn drain:
    it stops accepting, waits for in-flight requests, then runs the lifespan's stop."""

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._drain()
        super().handle_exit(sig, frame)


def _settings_errors(exc: ValidationError) -> str:
    from service.settings import describe_errors

    return "invalid settings:\n" + "\n".join(f"  {p}" for p in describe_errors(exc))


def _fail_at_start(problems: list[str]) -> int:
    """The server's settings are wrong: say so in the log format asked for (one JSON
    object under IMDN_LOG_FORMAT=json, which a log pipeline reads), exit 2."""
    if os.environ.get("IMDN_LOG_FORMAT", "").strip().lower() != "json":
        return _fail("invalid settings:\n" + "\n".join(f"  {p}" for p in problems))
    from service.logs import JsonFormatter

    message = "invalid settings: " + "; ".join(problems)
    record = logging.LogRecord("service.cli", logging.CRITICAL, __file__, 0, message, (), None)
    record.problems = problems
    print(JsonFormatter().format(record), file=sys.stderr)
    return 2


# upscale


def _summary(done: int, failed: int, skipped: int, extra: str = "") -> str:
    """The run's last line: every file found is done, failed, skipped or not sent."""
    return f"{done} of {done + failed} done, {failed} failed, {skipped} skipped{extra}"


def cmd_upscale(args: argparse.Namespace) -> int:
    from service.jobs import PlanError, output_format, plan_run

    scale: float = args.scale
    if not (math.isfinite(scale) and scale > 1):
        return _fail(f"--scale must be a number > 1, got {scale:g}")
    if not 1 <= args.quality <= 100:
        return _fail(f"--quality must be 1..100, got {args.quality}")
    try:
        fmt = output_format(args.format, args.output)
        plan = plan_run(
            args.inputs,
            args.output,
            scale,
            fmt,
            recursive=args.recursive,
            skip_existing=args.skip_existing,
        )
    except (PlanError, FileNotFoundError) as exc:
        return _fail(str(exc))
    for path, why in plan.skipped:
        print(f"{path}: skipped: {why}", file=sys.stderr)
    if not plan.jobs:
        if plan.done_before:
            print(_summary(0, 0, len(plan.skipped)), file=sys.stderr)  # all done before
            return 0
        return _fail("no images or videos found in the inputs")
    if args.url is not None:
        return _upscale_remote(args, plan, fmt)
    from service.engine import model_for_scale
    from service.settings import Settings

    # one-off runs skip warm-up: it costs more than it saves for a few images
    overrides: dict[str, object] = {"models": [model_for_scale(scale)], "warmup": False}
    if args.weights_dir is not None:
        overrides["weights_dir"] = args.weights_dir
    if args.device is not None:
        overrides["device"] = args.device
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        return _fail(_settings_errors(exc))
    if scale > settings.max_scale:
        return _fail(f"--scale must be at most {settings.max_scale:g} (IMDN_MAX_SCALE)")
    failed = asyncio.run(_upscale_files(settings, plan.jobs, scale, fmt, args.quality))
    print(_summary(len(plan.jobs) - failed, failed, len(plan.skipped)), file=sys.stderr)
    return 1 if failed else 0


async def _upscale_files(
    settings: object, jobs: list[Job], scale: float, fmt: OutputFormat, quality: int
) -> int:
    """Run each job on an engine in this process; the number of files that failed."""
    from service import imaging
    from service.engine import Engine, EngineError
    from service.jobs import PartFile
    from service.settings import Settings

    assert isinstance(settings, Settings)
    engine = Engine(settings)
    await engine.start()
    failures = 0
    try:
        for job in tqdm(jobs, desc=f"x{scale:g}", unit="file", disable=len(jobs) < 2):
            path = job.source
            if is_video(path):  # service/video/cli.py: the server's video pipeline, here
                error = await upscale_video_here(engine, path, job.target, scale)
                failures += not video_report(path, error, job.target)
                continue
            try:
                decoded = imaging.decode(
                    path.read_bytes(), None, max_pixels=settings.max_input_pixels
                )
                if fmt.pillow == "JPEG" and decoded.alpha is not None:
                    raise imaging.UnsupportedImageType(
                        "it has transparency, which JPEG cannot hold: use --format png or webp"
                    )
                h, w = imaging.output_size(decoded.height, decoded.width, scale)
                imaging.check_output_pixels(h, w, settings.max_output_pixels)
                result = await engine.upscale(decoded.pixels, scale, grey=decoded.grey)
                image = imaging.compose(decoded, result.image)
                if fmt.pillow == "PNG":
                    encoded = b"".join(
                        imaging.encode_png(
                            image,
                            icc_profile=decoded.icc_profile,
                            compress_level=settings.png_compress_level,
                            threads=settings.encode_threads,
                        )
                    )
                else:
                    encoded = imaging.encode_lossy(
                        image, fmt.pillow, quality=quality, icc_profile=decoded.icc_profile
                    )
            except imaging.ImageError as exc:
                tqdm.write(f"{path}: failed: {exc.detail}", file=sys.stderr)
                failures += 1
                continue
            except EngineError as exc:  # too costly for the deadline, out of memory, ...
                tqdm.write(f"{path}: failed: {exc}", file=sys.stderr)
                failures += 1
                continue
            with PartFile(job.target) as part:
                part.path.write_bytes(encoded)
                part.commit()
            tqdm.write(f"{path} -> {job.target} ({w}x{h}, {result.model})")
    finally:
        await engine.stop()
    return failures


def _upscale_remote(args: argparse.Namespace, plan: Plan, fmt: OutputFormat) -> int:
    """`--url`: the server does the work; this side reads, sends and writes files."""
    from service.client import ClientError, upscale_remote

    if args.weights_dir is not None or args.device is not None:
        return _fail("--weights-dir and --device are for local runs; with --url the server's apply")
    if args.concurrency < 1 or args.retries < 0 or args.timeout <= 0:
        return _fail("--concurrency must be >= 1, --retries >= 0 and --timeout > 0")
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        return _fail(f"--url must start with http:// or https://, got {args.url!r}")
    key = args.api_key or os.environ.get("IMDN_API_KEY") or None
    videos = [j for j in plan.jobs if is_video(j.source)]  # one at a time, streamed
    videos_done = sum(
        video_report(
            j.source,
            upscale_video_remote(
                url, j.source, j.target, args.scale, api_key=key, timeout_s=args.timeout
            ),
            j.target,
        )
        for j in videos
    )
    images = [j for j in plan.jobs if not is_video(j.source)]
    if not images:
        failed = len(videos) - videos_done
        print(_summary(videos_done, failed, len(plan.skipped)), file=sys.stderr)
        return 1 if failed else 0
    plan = dataclasses.replace(plan, jobs=images)
    try:
        run = asyncio.run(
            upscale_remote(
                url,
                plan.jobs,
                args.scale,
                fmt,
                quality=args.quality,
                api_key=key,
                concurrency=args.concurrency,
                retries=args.retries,
                timeout_s=args.timeout,
            )
        )
    except ClientError as exc:
        return _fail(str(exc))
    outcomes = run.outcomes
    done = sum(o.ok for o in outcomes)
    unsent = sum(not o.sent for o in outcomes)
    retried = sum(o.retries for o in outcomes)
    extra = f", {retried} retries" + (f", {unsent} not sent" if unsent else "")
    failed = len(outcomes) - done + len(videos) - videos_done
    print(_summary(done + videos_done, failed, len(plan.skipped), extra), file=sys.stderr)
    if run.stopped is not None and not run.server_gone:  # the request itself is refused
        return _fail(f"the server refuses this run: {run.stopped}")
    if run.stopped is not None:
        _fail(f"stopped: {run.stopped} at {url}", 1)
    return 1 if failed else 0


# eval, profile, fetch-weights


def cmd_eval(args: argparse.Namespace) -> int:
    from models.quality.evaluate import evaluate

    name = args.model or (FIXED_SCALES[args.scale] if args.scale else None)
    if name is None:
        return _fail("give --scale (2, 3, 4) or --model (x2, x3, x4, AS)")
    if name not in REGISTRY:
        return _fail(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    try:
        if args.checkpoint is not None:  # a file of your own, e.g. from `imdn train`
            model = load_model(args.checkpoint, expect=REGISTRY[name], verify_sha256=False)
        else:
            model = load_official(name, args.weights_dir or _default_weights_dir())
        report = evaluate(
            model,
            args.hr,
            lr_dir=args.lr,
            scale=args.scale,
            progress=not args.json,
        )
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({"model": name, **report.as_dict()}, indent=2))
    else:
        print(
            f"{report.dataset} {name}: PSNR {report.psnr:.3f} dB, SSIM {report.ssim:.4f} "
            f"over {report.images} images, {report.seconds_per_image:.3f} s/image"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.training.train import config_from_args, train

    try:
        result = train(config_from_args(args))
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(result.summary())
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name, spec in REGISTRY.items():
        network = build_model(spec.model.architecture, spec.model.scale)
        facts = describe(name, network)  # measured on the module, not read from the registry
        mult_adds = mult_adds_per_output_pixel(network)
        rows.append(
            {
                "model": name,
                "parameters": facts.parameters,
                "depth": facts.depth,
                "mult_adds_per_output_pixel": mult_adds,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            markdown_table(
                ["model", "params", "depth", "mult-adds / output pixel"],
                (
                    (
                        r["model"],
                        r["parameters"],
                        r["depth"],
                        f"{r['mult_adds_per_output_pixel'] / 1e3:.1f}K",
                    )
                    for r in rows
                ),
            ),
            end="",
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Table 6 offline: time per image and peak memory through the service's engine."""
    from service.table6 import bench_settings, run_bench

    try:
        settings = bench_settings(args.scale, weights_dir=args.weights_dir, device=args.device)
        result = asyncio.run(run_bench(settings, args.hr, args.scale))
    except ValidationError as exc:
        return _fail(_settings_errors(exc))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    text = result.markdown()
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    print(json.dumps(result.as_dict(), indent=2) if args.json else text.rstrip("\n"))
    return 0


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    names = args.models or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        return _fail(f"unknown models {unknown}; known: {', '.join(REGISTRY)}")
    for name in names:
        spec = REGISTRY[name]
        with tqdm(desc=spec.filename, unit="B", unit_scale=True, leave=True) as bar:

            def progress(done: int, total: int | None, bar: tqdm = bar) -> None:
                if total and bar.total != total:
                    bar.total = total
                bar.update(done - bar.n)

            try:
                path = fetch(spec, args.dir, base_url=args.base_url, progress=progress)
            except (CheckpointError, OSError) as exc:
                return _fail(f"{spec.filename}: {exc}")
        print(f"{path}  sha256 {spec.sha256[:16]}… ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imdn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP service (settings from IMDN_* variables)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--weights-dir", type=Path)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--fetch-weights", action="store_true", help="download missing checkpoints")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "upscale",
        help="super-resolve files or folders, here or (--url) on a running server",
    )
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--scale", type=float, required=True)
    p.add_argument("-o", "--output", type=Path, default=Path("."), help="file or folder")
    p.add_argument(
        "--format",
        choices=["png", "webp", "jpeg"],
        help="output format (default: the suffix of -o when it names a file, else png)",
    )
    p.add_argument(
        "--quality", type=int, default=90, help="WebP and JPEG quality, 1..100 (default 90)"
    )
    p.add_argument("--recursive", "-r", action="store_true", help="walk into sub-folders")
    p.add_argument(
        "--skip-existing", action="store_true", help="leave inputs whose result is already there"
    )
    p.add_argument("--weights-dir", type=Path)
    p.add_argument("--device")
    remote = p.add_argument_group("client of a running server")
    remote.add_argument(
        "--url", help="send each file to the IMDN server at this address instead of running here"
    )
    remote.add_argument(
        "--api-key", help="the server's API key (default: $IMDN_API_KEY, which ps cannot show)"
    )
    remote.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    remote.add_argument(
        "--retries",
        type=int,
        default=5,
        help="times one file is tried again after 429/503 (Retry-After) or a lost "
        "connection (default 5)",
    )
    remote.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request (default 300)"
    )
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("eval", help="PSNR/SSIM with the paper's protocol (Table 5)")
    p.add_argument("--hr", type=Path, required=True)
    p.add_argument("--lr", type=Path, help="LR folder; default: made by MATLAB bicubic")
    p.add_argument("--scale", type=int, choices=(2, 3, 4))
    p.add_argument("--model", choices=list(REGISTRY))
    p.add_argument("--weights-dir", type=Path)
    p.add_argument("--checkpoint", type=Path, help="score this file instead of the official one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    from models.training.train import add_train_arguments

    p = sub.add_parser("train", help="train IMDN with the paper's recipe (docs/training.md)")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("profile", help="parameters, depth and mult-adds per model (Tables 6, 7)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("bench", help="time per image and peak memory per data set (Table 6)")
    p.add_argument("--hr", type=Path, nargs="+", required=True, help="HR folders (data sets)")
    p.add_argument("--scale", type=float, nargs="+", required=True)
    p.add_argument("--weights-dir", type=Path)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--output", type=Path, help="also write the Markdown table here")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("fetch-weights", help="download and verify the official checkpoints")
    p.add_argument("--dir", type=Path, default=_default_weights_dir())
    p.add_argument("--base-url", default=OFFICIAL_BASE_URL)
    p.add_argument("models", nargs="*", help=f"some of {', '.join(REGISTRY)} (default: all)")
    p.set_defaults(func=cmd_fetch_weights)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
