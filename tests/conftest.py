"""Shared fixtures: where the official weights and data sets are, read through settings.

`IMDN_SHARED_DIR` (default `../shared` beside the repository) holds `weights/` and
`datasets/`; `IMDN_WEIGHTS_DIR` overrides the weights folder alone (`service/shared.py`,
which the benchmarks read too). Tests that need them skip with the reason when absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.networks.checkpoints import REGISTRY, load_official
from models.networks.imdn import IMDN
from service.shared import DATASETS, WEIGHTS


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    missing = [s.filename for s in REGISTRY.values() if not (WEIGHTS / s.filename).is_file()]
    if missing:
        pytest.skip(
            f"official checkpoints {missing} not in {WEIGHTS} "
            "(set IMDN_WEIGHTS_DIR or IMDN_SHARED_DIR, or run `imdn fetch-weights`)"
        )
    return WEIGHTS


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not (DATASETS / "Set5" / "HR").is_dir():
        pytest.skip(f"benchmark data sets not in {DATASETS} (set IMDN_SHARED_DIR)")
    return DATASETS


_MODELS: dict[str, IMDN] = {}


@pytest.fixture(scope="session")
def official_model(weights_dir: Path):  # type: ignore[no-untyped-def]
    """`official_model("x4")`: the official network, loaded once per test session."""

    def get(name: str) -> IMDN:
        if name not in _MODELS:
            _MODELS[name] = load_official(name, weights_dir)
        return _MODELS[name]

    return get
