"""A real Prometheus server on a loopback port, for tests that query what it scraped.

Debian's `prometheus` binary (`make test` installs it) is started with a generated
config scraping the given targets, a TSDB in the test's temporary folder and a free
127.0.0.1 port; the test talks to its HTTP API. Every wait is bounded, and the
server is always terminated when the block ends. Tests skip with the reason when
the binary is not installed.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.child import free_port, stop, wait_ready

JOB = "imdn"
"""The `job` label of the generated config's one scrape job."""

Series = dict[str, Any]
"""One result of an instant query: `{"metric": {labels}, "value": [time, "text"]}`."""


def series_value(series: Series) -> float:
    """The sample of an instant-query series as a float (NaN and ±Inf included)."""
    return float(series["value"][1])


def has_finite_value(result: list[Series]) -> bool:
    return any(math.isfinite(series_value(s)) for s in result)


@dataclass
class PrometheusClient:
    """Just enough of Prometheus's HTTP API for tests."""

    url: str
    http: httpx.Client

    def query(self, expr: str, at: float | None = None) -> list[Series]:
        """An instant query (at `at`, Unix seconds, or now); PromQL errors raise."""
        params: dict[str, str] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        r = self.http.get("/api/v1/query", params=params)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise ValueError(f"query {expr!r} failed: {body.get('error', r.text)}")
        result: list[Series] = body["data"]["result"]
        return result

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[Series]], bool],
        timeout: float = 30.0,
        interval: float = 0.25,
    ) -> list[Series]:
        """Query until `predicate(result)` holds; TimeoutError with the last result if not."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} not as expected within {timeout}s: {result}")
            time.sleep(interval)

    def wait_for_value(self, expr: str, expected: float, timeout: float = 30.0) -> None:
        """Wait until `expr` gives one series whose value is `expected`."""
        self.wait_for(
            expr,
            lambda r: len(r) == 1 and series_value(r[0]) == expected,
            timeout=timeout,
        )

    def targets_up(self, timeout: float = 30.0) -> None:
        """Wait until every scraped target has been scraped successfully once."""
        self.wait_for(
            f'up{{job="{JOB}"}}',
            lambda r: bool(r) and all(series_value(s) == 1 for s in r),
            timeout=timeout,
        )


def write_config(
    path: Path,
    targets: Sequence[str],
    scrape_interval: str,
    target_labels: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """A config with one job (`JOB`) scraping `targets` (host:port) at /metrics, each
    target with the extra labels `target_labels[target]` (e.g. the `pod` a PodMonitor adds)."""
    labels = target_labels or {}
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [t], "labels": dict(labels.get(t, {}))} for t in targets
                ],
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))


@contextmanager
def running_prometheus(
    targets: Sequence[str],
    tmp_path: Path,
    scrape_interval: str = "1s",
    *,
    target_labels: Mapping[str, Mapping[str, str]] | None = None,
    start_timeout: float = 30.0,
) -> Iterator[PrometheusClient]:
    """Run Prometheus scraping `targets` (e.g. `["127.0.0.1:8123"]`) until the block ends.

    `target_labels` adds labels per target, as service discovery would in a cluster.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not on PATH (`make system-tools` installs it)")
    folder = Path(tempfile.mkdtemp(prefix="prometheus-", dir=tmp_path))
    config = folder / "prometheus.yml"
    write_config(config, targets, scrape_interval, target_labels)
    log_path = folder / "prometheus.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            ready = f"{url}/-/ready"
            wait_ready(ready, proc, what="prometheus", timeout=start_timeout, log=log_path)
            with httpx.Client(base_url=url, timeout=10) as http:
                yield PrometheusClient(url, http)
        finally:
            stop(proc, timeout=15)
