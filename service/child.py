"""A server in a child process, for the tests and the benchmarks: a free port, waiting until
it is ready, stopping it cleanly; `imdn serve` run that way."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A loopback port nobody listens on now, for a child server to take."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes],
    *,
    what: str,
    timeout: float,
    log: Path | None = None,
) -> None:
    """Poll `url` until it answers 200. Fails, with the tail of `log`, if `process` exits
    first, and fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"{what} exited with {process.returncode} at start:\n{tail}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready within {timeout:g}s")
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Served:
    """A running `imdn serve` child: its URL, its process, where its output goes."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path | None

    def rss_bytes(self) -> int:
        """The server process's resident memory now, from /proc/<pid>/statm."""
        pages = int(Path(f"/proc/{self.process.pid}/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")


def imdn_command() -> list[str]:
    """This interpreter's `imdn` script, or `python -m service.cli` where it has none."""
    script = Path(sys.executable).with_name("imdn")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]


@contextmanager
def imdn_serve(
    settings: Mapping[str, str],
    *,
    log: Path | None = None,
    start_timeout: float = 120,
    inherit: bool = False,
) -> Iterator[Served]:
    """`imdn serve` as a child process on a free loopback port, with `settings` (IMDN_*
    variables) over the environment, whose own IMDN_* variables it keeps only with
    `inherit` (a benchmark configured from the shell). Its output goes to `log`, else to
    ours. Ready (readyz 200) when the block starts; stopped (SIGTERM, then SIGKILL after
    60 s) when it ends."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if inherit or not k.startswith("IMDN_")}
    env.update({"IMDN_HOST": "127.0.0.1", "IMDN_PORT": str(port), **settings})
    with open(log, "wb") if log else contextlib.nullcontext() as out:
        process = subprocess.Popen(
            [*imdn_command(), "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(
            f"{served.url}/readyz", process, what="imdn serve", timeout=start_timeout, log=log
        )
        yield served
    finally:
        stop(process, timeout=60)
