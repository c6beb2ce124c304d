"""Where the official weights and the benchmark data sets are on a development machine,
for the tests and the benchmark scripts: `IMDN_SHARED_DIR` (default `../shared` beside the
repository) holds `weights/` and `datasets/`; `IMDN_WEIGHTS_DIR`, the service's own
setting for the weights, overrides the weights folder alone."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
"""The checkout the package runs from (an editable install: the repository)."""
SHARED = Path(os.environ.get("IMDN_SHARED_DIR", REPO.parent / "shared")).resolve()
WEIGHTS = Path(os.environ.get("IMDN_WEIGHTS_DIR", SHARED / "weights")).resolve()
DATASETS = SHARED / "datasets"
