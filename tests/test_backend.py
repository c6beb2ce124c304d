"""Every inference backend computes the official network's function (within 1e-4 of eager)
on real images, for batches of 1 and 4, for a fixed-scale model and IMDN_AS, and keeps
doing so when the input shape changes between calls, as the engine's crops do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx
from PIL import Image

from models.networks.imdn import count_parameters
from models.quality.evaluate import list_images, read_rgb
from models.quality.matlab import imresize, imresize_tensor, modcrop, psnr, rgb_to_y
from models.runtime.backend import (
    BACKENDS,
    BackendUnavailable,
    installed,
    mixed_precision,
    native_bf16,
    prepare,
    resolve_backend,
    split_free,
)

CPU = torch.device("cpu")
TOLERANCE = 1e-4


def _backend_or_skip(name: str) -> str:
    if not installed(name):
        pytest.skip(f"backend {name!r} is not installed (its optional extra)")
    return name


@pytest.fixture(scope="module")
def butterfly_lr(datasets_dir: Path) -> torch.Tensor:
    """Set5 butterfly at ×4 LR (MATLAB bicubic), 1×3×64×64 in [0, 1]."""
    hr = np.asarray(Image.open(datasets_dir / "Set5" / "HR" / "butterfly.bmp").convert("RGB"))
    lr = imresize(hr, scale=0.25)
    return torch.from_numpy(lr.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()


def _four_crops(image: torch.Tensor, side: int) -> torch.Tensor:
    """Four different side×side crops of a real image, as one batch."""
    h, w = image.shape[-2:]
    corners = [(0, 0), (0, w - side), (h - side, 0), (h - side, w - side)]
    return torch.cat([image[..., y : y + side, x : x + side] for y, x in corners])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["x4", "AS"])
def test_backend_matches_eager(
    backend: str, name: str, official_model: Any, butterfly_lr: torch.Tensor
) -> None:
    _backend_or_skip(backend)
    model = official_model(name)
    image = butterfly_lr
    if name == "AS":  # IMDN_AS restores a same-size bicubic upscale: give it one (×2)
        image = imresize_tensor(image, size=(128, 128)).clamp(0, 1)
    forward = prepare(model, backend, CPU, torch.float32)
    # batch 1 of the whole image, then batch 4 of crops of another shape, then batch 1 again
    for x in (image, _four_crops(image, 40), image[..., :36, :52]):
        with torch.inference_mode():
            expected = model(x)
        got = forward(x)
        assert got.shape == expected.shape
        assert got.dtype == torch.float32 and got.is_contiguous()
        err = (got - expected).abs().max().item()
        assert err <= TOLERANCE, f"{backend} differs from eager by {err:.2e} on {tuple(x.shape)}"
        # a real picture, not a flat one: the comparison has something to compare
        assert expected.std().item() > 0.05


@pytest.mark.parametrize("name", ["x4", "AS"])
def test_split_free_is_the_same_function_bit_for_bit_without_splits(
    name: str, official_model: Any, butterfly_lr: torch.Tensor
) -> None:
    model = official_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = split_free(model)
    image = butterfly_lr if name == "x4" else imresize_tensor(butterfly_lr, size=(128, 128))
    for x in (image, _four_crops(image, 40)):
        with torch.inference_mode():
            assert torch.equal(rebuilt(x), model(x))
    assert count_parameters(rebuilt) == count_parameters(model)
    called = {str(n.target) for n in torch.fx.symbolic_trace(rebuilt).graph.nodes}
    assert not any("split" in target for target in called)
    assert any(
        "split" in t for t in (str(n.target) for n in torch.fx.symbolic_trace(model).graph.nodes)
    )
    for key, value in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(value, before[key]), key


def test_prepare_leaves_the_model_alone(official_model: Any) -> None:
    model = official_model("x2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare(model, "channels_last", CPU, torch.float32)
    for key, value in model.state_dict().items():
        assert value.is_contiguous(), key
        assert torch.equal(value, before[key]), key


def test_auto_picks_an_installed_backend_on_the_cpu() -> None:
    chosen = resolve_backend("auto", CPU)
    assert installed(chosen)
    preference = ["openvino", "onnxruntime", "channels_last"]
    # nothing faster than the chosen one is installed
    assert not any(installed(b) for b in preference[: preference.index(chosen)])
    # padded crops (shape buckets) run PyTorch's masked forward: the fastest PyTorch one
    assert resolve_backend("auto", CPU, padded=True) == "channels_last"


def test_auto_on_cuda_is_eager_and_exported_backends_refuse_it() -> None:
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda) == "eager"
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(BackendUnavailable, match="CPU only"):
            resolve_backend(backend, cuda)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        resolve_backend("tensorrt", CPU)


def test_missing_package_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "openvino" else real(name, *a),
    )
    with pytest.raises(BackendUnavailable, match=r"imdn-serve\[openvino\]"):
        resolve_backend("openvino", CPU)


def test_settings_refuse_a_backend_that_is_not_installed(
    monkeypatch: pytest.MonkeyPatch, weights_dir: Path
) -> None:
    import importlib.util

    from pydantic import ValidationError

    from service.settings import Settings

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    monkeypatch.delenv("IMDN_BACKEND", raising=False)
    with pytest.raises(ValidationError, match=r"imdn-serve\[onnx\]"):
        Settings(weights_dir=weights_dir, backend="onnxruntime")
    assert Settings(weights_dir=weights_dir).backend == "auto"


def test_openvino_keeps_its_converted_network_and_checks_what_it_reads(
    official_model: Any, butterfly_lr: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first prepare converts and writes the IR (float32 weights) into the cache
    folder; the next reads it back without converting, and computes the same function. A
    damaged file is not trusted: the backend converts afresh."""
    _backend_or_skip("openvino")
    import openvino as ov

    model = official_model("x4")
    cache = tmp_path / "cache"
    first = prepare(model, "openvino", CPU, torch.float32, cache_dir=cache)
    (xml,) = cache.glob("*.xml")
    assert xml.with_suffix(".bin").stat().st_size > 4 * 700_000  # float32, not float16
    assert oct(cache.stat().st_mode & 0o777) == "0o700"

    class Converted(Exception):
        pass

    def no_conversion(*args: Any, **kwargs: Any) -> None:
        raise Converted

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    again = prepare(model, "openvino", CPU, torch.float32, cache_dir=cache)
    x = butterfly_lr[..., :36, :52]
    assert torch.equal(again(x), first(x))
    with torch.inference_mode():
        assert (again(x) - model(x)).abs().max().item() <= TOLERANCE

    xml.write_text(xml.read_text().replace('version="11"', 'version="x"', 1) + "<broken")
    with pytest.raises(Converted):
        prepare(model, "openvino", CPU, torch.float32, cache_dir=cache)


def _y_psnr(sr: torch.Tensor, hr: np.ndarray, scale: int) -> float:
    out = (sr[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    return psnr(rgb_to_y(out), rgb_to_y(hr), border=scale)


def test_openvino_mixed_precision_keeps_the_psnr_of_float32(
    official_model: Any, datasets_dir: Path, butterfly_lr: torch.Tensor
) -> None:
    """OpenVINO's mixed precision (bfloat16 trunk, float32 head and upsampling) on Set5 at
    ×2, the model whose PSNR is highest and so most sensitive to rounding: the mean PSNR
    within 0.005 dB of eager's (the whole network in bfloat16 lost 0.03 dB there). Where
    the CPU has native bfloat16 it really runs it: outputs move beyond float32's 1e-4.
    IMDN_AS, batches and changing shapes run too."""
    _backend_or_skip("openvino")
    model = official_model("x2")
    mixed = prepare(model, "openvino", CPU, torch.float32, mixed=True)
    ours, eager, moved = [], [], 0.0
    for path in list_images(datasets_dir / "Set5" / "HR"):
        hr = modcrop(read_rgb(path), 2)
        x = torch.from_numpy(imresize(hr, scale=0.5).astype(np.float32) / 255)
        x = x.permute(2, 0, 1)[None].contiguous()
        with torch.inference_mode():
            expected = model(x)
        got = mixed(x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        moved = max(moved, (got - expected).abs().max().item())
        ours.append(_y_psnr(got, hr, 2))
        eager.append(_y_psnr(expected, hr, 2))
    assert abs(np.mean(ours) - np.mean(eager)) <= 0.005, (np.mean(ours), np.mean(eager))
    assert np.mean(eager) > 37.9  # the paper's Table 5: 38.00 dB
    if native_bf16():
        assert moved > TOLERANCE
    assert moved < 0.1
    as_model = official_model("AS")
    as_mixed = prepare(as_model, "openvino", CPU, torch.float32, mixed=True)
    image = imresize_tensor(butterfly_lr, size=(128, 128)).clamp(0, 1)
    for x in (_four_crops(image, 40), image[..., :36, :52]):
        with torch.inference_mode():
            expected = as_model(x)
        got = as_mixed(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 0.1


def test_mixed_precision_is_openvinos_where_the_cpu_has_bfloat16(
    monkeypatch: pytest.MonkeyPatch, official_model: Any
) -> None:
    """'auto' runs OpenVINO mixed only on a CPU with native bfloat16, 'bf16' always, 'fp32'
    never, and no other backend ever (PyTorch's bf16 is bfloat16 throughout)."""
    import models.runtime.backend as backend

    for native in (True, False):
        monkeypatch.setattr(backend, "native_bf16", lambda native=native: native)
        assert mixed_precision("auto", "openvino") is native
        assert mixed_precision("bf16", "openvino") is True
        assert mixed_precision("fp32", "openvino") is False
        for other in ("eager", "channels_last", "onnxruntime", "compile"):
            assert mixed_precision("auto", other) is mixed_precision("bf16", other) is False
    with pytest.raises(BackendUnavailable, match="mixed precision is OpenVINO's"):
        prepare(official_model("x2"), "channels_last", CPU, torch.float32, mixed=True)
