"""The OpenAPI document, byte for byte, for a few settings: the routes' declarations
(service/api.py) and the scale schema that depends on the loaded models and `max_scale`.

The documents under tests/openapi/ are what clients and /docs see; a change to them is a
change of the API. After a deliberate one, write them again with
`python -m tests.test_openapi` and review the diff.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.app import create_app
from service.settings import Settings

DOCUMENTS = Path(__file__).parent / "openapi"
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "fewer_models": {"models": ["x2", "AS"]},
    "fixed_only": {"models": ["x3", "x4"], "max_scale": 3.5},
    "max_scale_6": {"max_scale": 6.0},
    "keys": {"api_keys": ["k"]},
    "keys_on_ops": {"api_keys": ["k"], "protect_ops_routes": True},
}


def document(settings: dict[str, Any], weights: Path) -> str:
    """The app's OpenAPI document as served (no model is loaded: only the lifespan does)."""
    app = create_app(Settings(weights_dir=weights, **settings))
    return json.dumps(app.openapi(), indent=1) + "\n"


@pytest.mark.parametrize("name", VARIANTS)
def test_the_openapi_document_is_the_recorded_one(name: str, weights_dir: Path) -> None:
    assert document(VARIANTS[name], weights_dir) == (DOCUMENTS / f"{name}.json").read_text()


def test_the_description_names_every_output_format_and_header(weights_dir: Path) -> None:
    doc = json.loads(document({}, weights_dir))
    assert all(f in doc["info"]["description"] for f in ("PNG", "WebP", "JPEG", "Accept"))
    ok = doc["paths"]["/v1/superres"]["post"]["responses"]["200"]
    assert set(ok["content"]) == {"image/png", "image/webp", "image/jpeg"}
    assert set(ok["headers"]) == {"X-IMDN-Model", "X-IMDN-Crops", "Server-Timing"}
    assert ok["headers"]["X-IMDN-Crops"]["schema"] == {"type": "integer"}


if __name__ == "__main__":
    from service.shared import WEIGHTS

    for name, settings in VARIANTS.items():
        (DOCUMENTS / f"{name}.json").write_text(document(settings, WEIGHTS))
