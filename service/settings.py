"""Service configuration: one pydantic-settings class, environment prefix `IMDN_`.

Everything is validated when the app is created, so a bad value fails at start
with a message that says what to do, never on the first request.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from models.networks.checkpoints import OFFICIAL_BASE_URL, REGISTRY
from models.runtime.backend import BackendUnavailable, CompileMode, resolve_backend
from models.runtime.device import resolve_device
from service.video import ENCODERS

ModelName = Literal["x2", "x3", "x4", "AS"]


def default_backend_cache_dir() -> Path:
    """This user's folder for converted networks under the system's temporary folder."""
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return Path(tempfile.gettempdir()) / f"imdn-backend-cache-{user}"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMDN_", extra="forbid")

    # Models and device
    weights_dir: Path = Field(Path("weights"), description="folder with the official .pth files")
    fetch_weights: bool = Field(
        False, description="download missing checkpoints from weights_url at start (sha256-checked)"
    )
    weights_url: str = OFFICIAL_BASE_URL
    checkpoints: dict[ModelName, Path] = Field(
        default_factory=dict,
        description='your own files for some models, e.g. {"x4": "runs/x4/best.pth"} '
        "(from `imdn train`): checked for architecture, scale and every shape, not for the "
        "official sha256",
    )
    models: list[ModelName] = Field(default_factory=lambda: list(REGISTRY))  # type: ignore[arg-type]
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="'auto': on CUDA fp16; on the CPU fp32, except OpenVINO on a CPU with "
        "native bfloat16 (AVX512-BF16, AMX), which runs mixed: the trunk in bfloat16, the "
        "head and upsampling in float32 (~1.7x faster; PSNR within 0.003 dB of fp32). "
        "'bf16': mixed under OpenVINO, bfloat16 throughout under PyTorch. 'fp32': within "
        "1e-4 of eager under every backend",
    )
    warmup: bool = True
    torch_threads: int = Field(0, ge=0, description="intra-op threads on the CPU; 0 = PyTorch's")
    backend: Literal["auto", "eager", "channels_last", "onnxruntime", "openvino", "compile"] = (
        Field(
            "auto",
            description="how the network runs (models/runtime/backend.py, docs/benchmarks.md). "
            "'auto': on the CPU the fastest installed, openvino (installed by `make setup`), "
            "else onnxruntime, else channels_last; on CUDA eager. 'eager' gives the authors' "
            "exact outputs (the Table 5 path); the others agree within 1e-4. 'compile': "
            "torch.compile of the plain forward of each (model, full shape, batch size) "
            "during warm-up, padded crops eager (CUDA; needs shape buckets)",
        )
    )
    backend_cache_dir: Path | None = Field(
        default_factory=default_backend_cache_dir,
        description="folder that keeps OpenVINO's converted networks across restarts (6-8 s "
        "each to convert on two cores, ~0.1 s to read back); default: "
        "imdn-backend-cache-<uid> in the system's temporary folder; empty: none",
    )
    compile_mode: CompileMode = Field(
        "max-autotune-no-cudagraphs",
        description="torch.compile mode of the 'compile' backend (docs/deploy.md)",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="folder that keeps the compiled kernels across restarts (inductor's "
        "cache, and a Mega-Cache file of torch.compiler.save_cache_artifacts); unset: "
        "inductor's default under /tmp",
    )
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto",
        description="replay a CUDA graph of each warmed (shape, batch size) of the eager "
        "forwards, masked and plain (models/runtime/graphs.py): one launch instead of a "
        "few hundred per batch; with the compile backend, of the masked forward only. "
        "'auto': on with CUDA and shape buckets; needs both",
    )
    gil_switch_interval_ms: float | None = Field(
        None,
        gt=0,
        description="Python's GIL switch interval for this process: how long the device "
        "thread may wait to retake the GIL after each of its ~20 small torch calls a batch "
        "while another thread runs Python (bench/gil_convoy.py). Unset: 0.5 ms with CUDA, "
        "Python's default (5 ms) elsewhere",
    )
    shape_buckets: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run every batch at one of a few fixed crop shapes and batch sizes, all "
        "warmed before /readyz: 'auto' is on with CUDA (or the compile backend), off on "
        "the CPU (the authors' exact outputs)",
    )

    # Requests
    max_scale: float = Field(8.0, gt=1.0)
    max_upload_bytes: int = Field(50 * 1024 * 1024, gt=0)
    max_input_pixels: int = Field(4096 * 4096, gt=0)
    max_output_pixels: int = Field(8192 * 8192, gt=0)
    request_timeout_s: float = Field(120.0, gt=0)
    body_read_timeout_s: float = Field(
        5.0,
        gt=0,
        description="longest silence while a request body arrives (before its first piece "
        "or between two) before 408: a stalled upload cannot hold a connection",
    )

    # Batching and tiling
    max_batch_size: int = Field(
        8, ge=4, description="the largest batch the batcher forms; >= 4, so the four ACS crops "
        "can share one"
    )
    batch_limit: Literal["measured", "max"] = Field(
        "measured",
        description="'measured': warm-up times each model at batch sizes 1, 2, 4, ... up to "
        "max_batch_size, and batches grow only while each size is faster per crop pixel "
        "than the smaller ones, by 5 % at least (on the CPU usually 1; on CUDA the "
        "largest); the choice is logged and listed in /v1/models. 'max': up to "
        "max_batch_size",
    )
    max_batch_wait_ms: float = Field(5.0, ge=0)
    max_queue_crops: int = Field(256, ge=1, description="crops waiting before 429")
    max_batch_seconds: float = Field(
        1.0,
        gt=0,
        description="the most estimated device seconds in one batch (one crop at the least): "
        "how long a small request may wait behind a large one's batch (service/batcher.py)",
    )
    tile_max_pixels: int = Field(
        256 * 256,
        ge=32 * 32,
        description="pixels per crop at the network's inner resolution (IMDN: its input; "
        "IMDN_AS: a quarter of each side); larger inputs are tiled",
    )
    tile_padding: int = Field(32, ge=0, description="context around each tile, a multiple of 4")
    frame_buckets: list[tuple[int, int]] = Field(
        default_factory=list,
        description='whole-image bucket shapes, "HEIGHTxWIDTH" at the network\'s input, e.g. '
        '["1080x1920"] for a video of 1080p frames: an image larger than a tile that fits one '
        "runs whole in it (no tiles, no seams, ~1.9x less work for 1080p than 256-px tiles; "
        "an image of the very size runs the plain forward, a smaller one padded), at batch "
        "size 1; warmed like the other buckets (docs/deploy.md)",
    )

    # Video (POST /v1/superres/video, docs/video.md; needs the 'video' extra)
    video_max_upload_bytes: int = Field(
        1024 * 1024 * 1024, gt=0, description="largest video upload (spooled to a temp file)"
    )
    video_max_input_pixels: int = Field(3840 * 2160, gt=0, description="pixels of an input frame")
    video_max_output_pixels: int = Field(
        7680 * 4320, gt=0, description="pixels of an output frame"
    )
    video_max_frames: int = Field(108_000, gt=0, description="frames of one video (1 h at 30/s)")
    video_max_duration_s: float = Field(3600.0, gt=0, description="seconds of one video")
    video_timeout_s: float = Field(
        3600.0, gt=0, description="deadline of one video request, from its arrival"
    )
    video_tile_max_pixels: int = Field(
        640 * 360,
        ge=4096,
        description="without shape buckets (the CPU): a video frame of up to this many pixels "
        "at the network's inner resolution runs whole instead of as tiles that redo their "
        "context (240p and 360p frames: 0.79 -> 0.95 and 0.65 -> 0.84 of the model's frames/s "
        "on a 2-core CPU); never below IMDN_TILE_MAX_PIXELS. With buckets: IMDN_FRAME_BUCKETS",
    )
    video_frames_in_flight: int = Field(
        4,
        ge=1,
        description="frames between the decoder and the encoder of one video (memory bound; "
        "several small frames share a forward)",
    )
    video_encoder: str = Field(
        "auto",
        description="'auto' (NVENC on a CUDA host where PyAV has it, else the CPU encoder), "
        "'cpu' (libx264/libx265/SVT-AV1/libvpx), or an encoder name (e.g. h264_nvenc)",
    )
    video_codec_threads: int = Field(
        default_factory=lambda: max(1, usable_cpus() // 4),
        ge=1,
        description="threads of each video's decoder and encoder (default: a quarter of the "
        "CPUs, leaving the network the rest)",
    )
    video_temp_dir: Path | None = Field(
        None, description="where uploads are spooled (default: the system's temp folder)"
    )

    device_memory_budget_bytes: int = Field(
        0,
        ge=0,
        description="0: no limit. Otherwise a batch whose estimated activations exceed it is "
        "treated as out of memory (split and retried), as a real CUDA OOM is",
    )

    decode_threads: int = Field(
        default_factory=lambda: max(1, usable_cpus() // 2),
        ge=1,
        description="threads that decode uploads (a bounded pool: a flood of slow decodes "
        "cannot take every core from the engine); default: half the CPUs this process may "
        "use, at least 1",
    )

    # Output
    png_compress_level: int = Field(1, ge=0, le=9)
    encode_threads: int = Field(
        0,
        ge=0,
        description="threads that compress one PNG's bands of rows in parallel (shared by "
        "all responses); 1: one zlib stream, compressed as it is sent. 0 (default): 1 when "
        "the network runs on the CPU (its intra-op threads take every core: more encoders "
        "preempt them, docs/deploy.md), else the CPUs this process may use",
    )

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_header_bytes: int = Field(
        64 * 1024,
        ge=8 * 1024,
        description="largest request line and headers together: a longer head is refused "
        "(414 when the URL is most of it, 431 otherwise) before it is all buffered",
    )
    web_ui: bool = Field(
        True,
        description="serve the try-it page at / (off: / is a 404; /docs stays)",
    )
    api_keys: list[SecretStr] = Field(default_factory=list)
    protect_ops_routes: bool = Field(
        False,
        description="with api_keys set, also require a key on /healthz, /readyz and /metrics "
        "(off: probes and Prometheus scrape without one)",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed by CORS (JSON list of scheme://host[:port], or "
        "'*'); empty: no CORS middleware, no CORS headers",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text",
        description="'text': time level logger [request_id] message; 'json': one JSON object "
        "a line (time, level, logger, message, request_id; method, path, status, duration_ms "
        "on access lines)",
    )
    access_log: bool = Field(True, description="one log line per request (imdn.access)")
    access_log_ops_routes: bool = Field(
        False,
        description="also log requests to /metrics, /healthz and /readyz (off: probes and "
        "scrapes would drown the log)",
    )
    liveness_timeout_s: float = Field(
        120.0,
        gt=0,
        description="/healthz answers 503 once one device call (a batch's forward) has been "
        "running longer than this: the device thread is wedged, not busy",
    )

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, v: list[SecretStr]) -> list[SecretStr]:
        # an empty key would match a request with no key at all: the API would be open
        for i, key in enumerate(v):
            secret = key.get_secret_value()
            if not secret.strip() or secret != secret.strip():
                raise ValueError(
                    f"key {i + 1} of {len(v)} is empty or has leading or trailing spaces: "
                    "an empty key would let requests without one in"
                )
        return v

    @field_validator("models")
    @classmethod
    def _models_known_and_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one model must be configured (x2, x3, x4, AS)")
        return list(dict.fromkeys(v))

    @field_validator("backend")
    @classmethod
    def _backend_installed(cls, v: str) -> str:
        try:  # the package check; whether it suits the device is checked at start
            resolve_backend(v, torch.device("cpu"))
        except BackendUnavailable as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins_well_formed(cls, v: list[str]) -> list[str]:
        for origin in v:
            scheme, sep, host = origin.partition("://")
            well_formed = scheme in ("http", "https") and sep and host and "/" not in host
            if origin != "*" and not well_formed:
                raise ValueError(
                    f"CORS origin {origin!r} must be '*' or scheme://host[:port] "
                    "with no path or trailing slash (browsers send it that way)"
                )
        return v

    @field_validator("backend_cache_dir", mode="before")
    @classmethod
    def _empty_is_no_cache(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("frame_buckets", mode="before")
    @classmethod
    def _frame_shapes(cls, v: object) -> list[tuple[int, int]]:
        """ "HEIGHTxWIDTH" strings to (height, width), each side >= 16."""
        frames = []
        for frame in v if isinstance(v, list) else [v]:
            sides = str(frame).lower().split("x")
            if len(sides) != 2 or not all(side.isdigit() and int(side) >= 16 for side in sides):
                raise ValueError(f'frame bucket {frame!r} is not "HEIGHTxWIDTH" of sides >= 16')
            frames.append((int(sides[0]), int(sides[1])))
        return frames

    @field_validator("video_encoder")
    @classmethod
    def _video_encoder_known(cls, v: str) -> str:
        if v not in ("auto", "cpu", *ENCODERS):
            raise ValueError(f"video_encoder {v!r} is not 'auto', 'cpu' or one of {ENCODERS}")
        return v

    @field_validator("tile_padding")
    @classmethod
    def _padding_multiple_of_4(cls, v: int) -> int:
        if v % 4:
            raise ValueError(f"tile_padding must be a multiple of 4 (the paper's p = 4k), got {v}")
        return v

    @model_validator(mode="after")
    def _tiles_hold_their_context(self) -> Settings:
        side = 2 * self.tile_padding + 16
        if self.tile_max_pixels < side * side:
            raise ValueError(
                f"IMDN_TILE_MAX_PIXELS={self.tile_max_pixels} is too small for "
                f"IMDN_TILE_PADDING={self.tile_padding}: a tile needs at least {side}x{side} "
                "pixels"
            )
        return self

    @field_validator("max_input_pixels")
    @classmethod
    def _within_pillows_guard(cls, v: int) -> int:
        # Pillow refuses larger images as decompression bombs, whatever we allow
        if Image.MAX_IMAGE_PIXELS is not None and v > Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"max_input_pixels {v} exceeds Pillow's decompression-bomb guard "
                f"({Image.MAX_IMAGE_PIXELS} pixels)"
            )
        return v

    @model_validator(mode="after")
    def _encoders_leave_the_cpu_network_its_cores(self) -> Settings:
        if self.encode_threads == 0:  # the thread budget, docs/deploy.md
            try:
                on_cpu = resolve_device(self.device).type == "cpu"
            except (RuntimeError, ValueError):
                on_cpu = False  # a device that cannot be had fails at start, with its reason
            self.encode_threads = 1 if on_cpu else usable_cpus()
        return self

    @model_validator(mode="after")
    def _ops_protection_needs_keys(self) -> Settings:
        if self.protect_ops_routes and not self.api_keys:
            raise ValueError(
                "protect_ops_routes is set but api_keys is empty, so nothing would be "
                "protected: set IMDN_API_KEYS too, or drop IMDN_PROTECT_OPS_ROUTES"
            )
        return self

    @model_validator(mode="after")
    def _buckets_need_a_torch_backend(self) -> Settings:
        if self.shape_buckets == "on" and self.backend in ("onnxruntime", "openvino"):
            raise ValueError(
                f"shape_buckets 'on' runs padded crops with a masked forward, which backend "
                f"{self.backend!r} cannot run: use eager, channels_last or compile"
            )
        return self

    @model_validator(mode="after")
    def _compile_needs_buckets(self) -> Settings:
        if self.backend == "compile" and self.shape_buckets == "off":
            raise ValueError(
                "backend 'compile' compiles each fixed shape during warm-up: it needs "
                "shape_buckets 'on' or 'auto', not 'off'"
            )
        return self

    @model_validator(mode="after")
    def _graphs_need_buckets(self) -> Settings:
        if self.cuda_graphs == "on" and (
            self.shape_buckets == "off" or self.backend in ("onnxruntime", "openvino")
        ):
            raise ValueError(
                "cuda_graphs 'on' captures the fixed shapes of shape buckets with a PyTorch "
                "backend (eager, channels_last or compile)"
            )
        return self

    def switch_interval_s(self, device: torch.device) -> float | None:
        """The GIL switch interval the runner sets for `device`, in seconds; None leaves
        Python's. On CUDA a batch is mostly small calls that wait on the device, each
        followed by a wait for the GIL: 20 of them took 0.24 ms alone and 128 ms beside
        one busy Python thread at 5 ms, 13 ms at 0.5 ms (docs/benchmarks.md, section 8)."""
        if self.gil_switch_interval_ms is not None:
            return self.gil_switch_interval_ms / 1000
        return 0.0005 if device.type == "cuda" else None

    def graphs_on(self, device: torch.device) -> bool:
        """Whether the runner captures CUDA graphs on `device` (`auto`: CUDA, buckets on,
        a PyTorch backend)."""
        fits = (
            device.type == "cuda"
            and self.buckets_on(device)
            and self.backend in ("auto", "eager", "channels_last", "compile")
        )
        if self.cuda_graphs == "on" and device.type != "cuda":
            raise ValueError(f"cuda_graphs 'on' needs a CUDA device, not {device}")
        return fits and self.cuda_graphs != "off"

    @property
    def frame_tile_pixels(self) -> int:
        """A video frame's tile budget: IMDN_VIDEO_TILE_MAX_PIXELS, or the images' if larger."""
        return max(self.video_tile_max_pixels, self.tile_max_pixels)

    def buckets_on(self, device: torch.device) -> bool:
        """Whether shape buckets are on for `device` (`auto`: CUDA or the compile backend)."""
        if self.shape_buckets == "auto":
            return device.type == "cuda" or self.backend == "compile"
        return self.shape_buckets == "on"

    def checkpoint_path(self, name: ModelName) -> Path:
        """The file a model loads from: the configured one, else the official one."""
        return self.checkpoints.get(name, self.weights_dir / REGISTRY[name].filename)

    @model_validator(mode="after")
    def _weights_present(self) -> Settings:
        own = [self.checkpoints[n] for n in self.models if n in self.checkpoints]
        official = [n for n in self.models if n not in self.checkpoints]
        if missing_own := [str(p) for p in own if not p.is_file()]:
            raise ValueError(f"checkpoint files {', '.join(missing_own)} do not exist")
        if self.fetch_weights:
            return self
        missing = [REGISTRY[n].filename for n in official if not self.checkpoint_path(n).is_file()]
        if missing:
            raise ValueError(
                f"checkpoints {', '.join(missing)} not found in {self.weights_dir.resolve()}: "
                f"run `imdn fetch-weights --dir {self.weights_dir}`, point IMDN_WEIGHTS_DIR at "
                "a folder that has them, or set IMDN_FETCH_WEIGHTS=true to download at start"
            )
        return self


ENV_PREFIX = "IMDN_"
NOT_SETTINGS = frozenset(
    {
        "IMDN_SHARED_DIR",  # tests and benchmarks: where the shared weights and data are
        "IMDN_FUZZ_SEED",  # the tests' own knobs (tests/test_fuzz.py, test_reliability.py)
        "IMDN_FUZZ_EXAMPLES",
        "IMDN_LOAD_REQUESTS",
        # docker-compose.yml's own variables (ports, image and build), read by compose
        "IMDN_BIND",
        "IMDN_IMAGE_TAG",
        "IMDN_BUILD_FETCH_WEIGHTS",
        "IMDN_CUDA_IMAGE",
        "IMDN_TORCH_CUDA",
        "IMDN_WEIGHTS_HOST_DIR",
    }
)
"""`IMDN_*` variables that are no setting of the server but that other parts of the
project read: the server lets them be. Any other unknown one stops it at start."""
SERVICE_LINKS = re.compile(r"IMDN_(SERVICE_(HOST|PORT)(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_\w+)?)")
"""What Kubernetes (a Service named `imdn`, unless `enableServiceLinks: false`) and
Docker's legacy links put in the environment: no typo of a setting, let be."""
CLIENT_VARIABLES = {"IMDN_API_KEY": "IMDN_API_KEYS", "IMDN_URL": "IMDN_HOST and IMDN_PORT"}
"""The client's variables (`imdn upscale --url`), with what the server reads instead."""
JSON_EXAMPLES = {
    "api_keys": '["key-1", "key-2"]',
    "models": '["x2", "x4"]',
    "cors_origins": '["https://app.example.com"]',
    "frame_buckets": '["1080x1920"]',
    "checkpoints": '{"x4": "runs/x4/best.pth"}',
}
"""What each setting that is read as JSON looks like, for the error that says it is not."""
SECRET_SETTINGS = frozenset({"api_keys"})
"""Settings whose values an error message never repeats."""


def env_var(field: str) -> str:
    """The environment variable of a setting: `max_scale` is `IMDN_MAX_SCALE`."""
    return ENV_PREFIX + field.upper()


class SettingsInvalid(ValueError):
    """The settings cannot start a server: one line per problem, each naming its
    environment variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid settings: " + "; ".join(problems))
        self.problems = problems


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A problem for each `IMDN_*` variable that is no setting (a typo, or the client's
    `IMDN_API_KEY`, would otherwise be ignored in silence), with the likely intended one."""
    known = {env_var(name) for name in Settings.model_fields}
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in NOT_SETTINGS:
            continue
        if SERVICE_LINKS.fullmatch(upper):
            continue
        if upper in CLIENT_VARIABLES:
            hint = (
                f"it is the client's variable (imdn upscale --url); the server reads "
                f"{CLIENT_VARIABLES[upper]}"
            )
        elif close := difflib.get_close_matches(upper, known, n=1, cutoff=0.6):
            hint = f"did you mean {close[0]}?"
        else:
            hint = "the settings are listed in the README's Configuration table"
        problems.append(f"{name} is not a setting: {hint}")
    return problems


def describe_errors(exc: ValidationError | SettingsError) -> list[str]:
    """One line per problem, naming the environment variable, not the field."""
    if isinstance(exc, SettingsError):  # a complex setting's value is not JSON
        field = next((f for f in Settings.model_fields if f'"{f}"' in str(exc)), None)
        if field is None:
            return [str(exc)]
        example = JSON_EXAMPLES.get(field, "a JSON value")
        cause = f" ({exc.__cause__})" if isinstance(exc.__cause__, json.JSONDecodeError) else ""
        return [f"{env_var(field)} is not valid JSON{cause}: it takes JSON, e.g. {example}"]
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        message = _variables_named(error["msg"].removeprefix("Value error, "))
        if not loc:  # a check across several settings: its message names them
            problems.append(message)
            continue
        name = env_var(loc[0]) + "".join(f"[{part}]" for part in loc[1:])
        given: Any = error.get("input")
        if loc[0] not in SECRET_SETTINGS and isinstance(given, (str, int, float)):
            name += f"={given}"
        problems.append(f"{name}: {message}")
    return problems


def _variables_named(message: str) -> str:
    """`message` with each setting it names as a field (`shape_buckets`) named as its
    environment variable (`IMDN_SHAPE_BUCKETS`), which is what an operator sets. Only
    names with an underscore: one-word fields (`device`, `backend`) are also plain words."""
    fields = sorted((f for f in Settings.model_fields if "_" in f), key=len, reverse=True)
    if not fields:
        return message
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, fields)) + r")\b")
    return pattern.sub(lambda m: env_var(m.group(1)), message)


def load_settings(**overrides: Any) -> Settings:
    """The server's settings from the environment (and `overrides`, e.g. command-line
    flags), refusing unknown `IMDN_*` variables; SettingsInvalid says what is wrong."""
    problems = unknown_variables(os.environ)
    try:
        settings = Settings(**overrides)
    except (ValidationError, SettingsError) as exc:
        raise SettingsInvalid(problems + describe_errors(exc)) from None
    if problems:
        raise SettingsInvalid(problems)
    return settings
