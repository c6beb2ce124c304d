"""The benchmark scripts still run and print their figures (a short run, not a measurement)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import model_vs_machine


def test_model_vs_machine_prints_each_backend_against_the_limit(
    weights_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_vs_machine.main(["--rounds", "1"])
    out = capsys.readouterr().out
    assert "46.52 G multiply-adds" in out
    rows = dict(re.findall(r"^(eager|channels_last)\s+(?:[\d.]+\s+){3}([\d.]+)\s", out, re.M))
    assert set(rows) == {"eager", "channels_last"}, out
    assert all(0 < float(ratio) < 3 for ratio in rows.values()), rows
