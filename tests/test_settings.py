"""Settings as an operator meets them: `imdn serve` refusing a bad environment at start
with one line per problem, each naming its variable (as JSON under IMDN_LOG_FORMAT=json),
and the README's settings table checked against the Settings class."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from service.cli import main
from service.settings import Settings, env_var, unknown_variables

README = Path(__file__).resolve().parent.parent / "README.md"


def _serve_refuses(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    weights_dir: Path,
    **environ: str,
) -> str:
    """`imdn serve` under `environ` (plus the real weights): exit 2, no traceback; stderr."""
    monkeypatch.setenv("IMDN_WEIGHTS_DIR", str(weights_dir))
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SettingsError" not in err, err
    return err


@pytest.mark.parametrize(
    ("environ", "expected", "secret"),
    [
        ({"IMDN_API_KEYS": '["k1-secret", ""]'}, "IMDN_API_KEYS: key 2 of 2 is empty", "k1"),
        ({"IMDN_API_KEYS": '["  "]'}, "IMDN_API_KEYS: key 1 of 1 is empty", None),
        (
            {"IMDN_API_KEY": "s3cret"},
            "IMDN_API_KEY is not a setting: it is the client's variable (imdn upscale "
            "--url); the server reads IMDN_API_KEYS",
            "s3cret",
        ),
        (
            {"IMDN_MAX_SCLAE": "4"},
            "IMDN_MAX_SCLAE is not a setting: did you mean IMDN_MAX_SCALE?",
            None,
        ),
        ({"IMDN_API_KEYS": "s3cret"}, "IMDN_API_KEYS is not valid JSON", "s3cret"),
        (
            {"IMDN_MODELS": "x2"},
            "IMDN_MODELS is not valid JSON (Expecting value: line 1 column 1 (char 0)): "
            'it takes JSON, e.g. ["x2", "x4"]',
            None,
        ),
        ({"IMDN_MAX_SCALE": "0.5"}, "IMDN_MAX_SCALE=0.5: Input should be greater than 1", None),
        (  # a check across two settings names both variables too, not their fields
            {"IMDN_BACKEND": "compile", "IMDN_SHAPE_BUCKETS": "off"},
            "it needs IMDN_SHAPE_BUCKETS 'on' or 'auto', not 'off'",
            "shape_buckets",
        ),
    ],
    ids=[
        "empty-key",
        "blank-key",
        "client-variable",
        "typo",
        "keys-not-json",
        "models-not-json",
        "range",
        "across-settings",
    ],
)
def test_serve_refuses_bad_settings_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    weights_dir: Path,
    environ: dict[str, str],
    expected: str,
    secret: str | None,
) -> None:
    err = _serve_refuses(monkeypatch, capsys, weights_dir, **environ)
    assert err.startswith("imdn: error: invalid settings:\n"), err
    assert expected in err, err
    if secret is not None:
        assert secret not in err, "an error message repeated a key"


def test_several_problems_are_reported_together(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], weights_dir: Path
) -> None:
    err = _serve_refuses(monkeypatch, capsys, weights_dir, IMDN_API_KEY="x", IMDN_MAX_SCALE="0.5")
    assert "IMDN_API_KEY is not a setting" in err and "IMDN_MAX_SCALE=0.5" in err


def test_start_up_errors_are_json_under_the_json_log_format(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], weights_dir: Path
) -> None:
    err = _serve_refuses(monkeypatch, capsys, weights_dir, IMDN_LOG_FORMAT="json", IMDN_MODELS="x2")
    (line,) = err.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "CRITICAL" and entry["logger"] == "service.cli"
    assert entry["message"].startswith("invalid settings: IMDN_MODELS is not valid JSON")
    assert entry["problems"] == [entry["message"].removeprefix("invalid settings: ")]


def test_variables_of_the_deployments_and_service_links_are_accepted() -> None:
    """Every IMDN_* the image and the Kubernetes config set is a setting, and what a
    Service named `imdn` (or a Docker link) adds to the environment is let be."""
    repo = README.parent
    given = re.findall(r"\b(IMDN_[A-Z_]+)=", (repo / "Dockerfile").read_text())
    given += re.findall(
        r"^(IMDN_[A-Z_]+)=", (repo / "deploy/k8s/base/config.env").read_text(), re.M
    )
    assert given and unknown_variables(dict.fromkeys(given, "x")) == []
    links = ["IMDN_SERVICE_HOST", "IMDN_SERVICE_PORT_HTTP", "IMDN_PORT_8000_TCP_ADDR"]
    assert unknown_variables(dict.fromkeys(links, "x")) == []
    (refused,) = unknown_variables({"IMDN_SERVICE_HOSTS": "x"})  # no link's name
    assert refused.startswith("IMDN_SERVICE_HOSTS is not a setting")


def test_empty_api_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        Settings.model_validate({"api_keys": [SecretStr("k1"), SecretStr("")]})


# The README's settings table


def _table() -> list[tuple[list[str], list[str]]]:
    """(variables, defaults) of each row of the README's Configuration table."""
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not line.startswith("| `IMDN_") or len(cells) < 3:
            continue
        names = re.findall(r"`(IMDN_[A-Z0-9_]+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(" / ")]
        rows.append((names, defaults if len(defaults) == len(names) else []))
    return rows


def _documented(value: Any) -> str:
    """A default as the README writes it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value, separators=(',', ':'))}`"
    return f"`{value}`"


def _readable(cell: str) -> str | None:
    """The README's '50 MiB' or '4096²' as a number in backticks; None for prose."""
    if m := re.fullmatch(r"(\d+) MiB", cell):
        return f"`{int(m[1]) * 1024 * 1024}`"
    if m := re.fullmatch(r"(\d+)²", cell):
        return f"`{int(m[1]) ** 2}`"
    return cell if cell.startswith("`") or cell == "unset" else None


def test_every_setting_is_in_the_readme_table_with_its_default() -> None:
    """Read from the Settings class at test time: a setting added later fails here until
    its row is written, and a row for a setting that is gone fails too."""
    rows = _table()
    documented = {name for names, _ in rows for name in names}
    settings = {env_var(name): field for name, field in Settings.model_fields.items()}
    assert not (missing := sorted(set(settings) - documented)), f"not in the README: {missing}"
    assert not (stale := sorted(documented - set(settings))), f"not settings: {stale}"
    for names, defaults in rows:
        for name, cell in zip(names, defaults, strict=False):
            field = settings[name]
            if field.default_factory is not None and cell.startswith("`"):
                default = field.default_factory()  # type: ignore[call-arg]
            else:
                default = field.default
            expected = _readable(cell)
            if expected is not None:
                assert expected == _documented(default), f"{name}: README {cell}, code {default!r}"
