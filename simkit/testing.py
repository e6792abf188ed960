"""Helpers to run real servers as subprocesses (tests, benches, the demo)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} came up")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up within {timeout:.0f}s")


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, base_url: str, log_path: Path | None):
        self.proc, self.base_url, self.log_path = proc, base_url, log_path

    @property
    def url(self) -> str:  # OpenAI-style base URL
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


@contextlib.contextmanager
def start_process(args: Sequence[str], health_url: str | None, log_path: Path | None = None,
                  env: dict | None = None, timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    """Start a subprocess (own process group), wait for `health_url`, stop it on exit."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        if health_url:
            wait_http(health_url, timeout, proc)
        yield proc
    finally:
        stop_process(proc)
        if log_path:
            log.close()


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def start_model_server(model_dir: str | os.PathLike, port: int | None = None, log_path: Path | None = None,
                       extra_args: Sequence[str] = (), timeout: float = 180.0) -> Iterator[ServerProcess]:
    """`simkit model-server --model DIR` as a real subprocess on loopback."""
    port = port or free_port()
    args = [sys.executable, "-m", "simkit.cli", "model-server", "--model", str(model_dir),
            "--port", str(port), *extra_args]
    base = f"http://127.0.0.1:{port}"
    with start_process(args, base + "/health", log_path, timeout=timeout) as proc:
        yield ServerProcess(proc, base, log_path)
