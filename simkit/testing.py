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


class RedisServer:
    """A real `redis-server` on loopback with AOF on (appendfsync everysec unless told), in its own dir.

    `kill()` is a SIGKILL (no shutdown save); `start()` again reuses the same dir and port, so
    the restarted server replays the AOF. A killed process loses nothing it answered with either
    fsync policy (the AOF write() precedes the reply); `appendfsync="always"` also survives an
    OS crash or power loss, at one fsync per write."""

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, appendonly: bool = True,
                 exe: str = "redis-server", appendfsync: str = "everysec") -> None:
        import shutil

        exe = shutil.which(exe)
        if exe is None:
            raise RuntimeError("redis-server not found: install it (Debian/Ubuntu: apt-get install -y "
                               "redis-server; macOS: brew install redis); .ci/run does this on CI")
        self.exe, self.dir = exe, Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly, self.appendfsync = appendonly, appendfsync
        self.proc: subprocess.Popen | None = None

    def url(self, stream: str = "act") -> str:
        return f"redis://127.0.0.1:{self.port}/0?stream={stream}"

    def start(self, timeout: float = 20.0) -> "RedisServer":
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
                "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout:.0f}s")

    def kill(self) -> None:
        """SIGKILL: nothing is flushed beyond what the AOF already has."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
