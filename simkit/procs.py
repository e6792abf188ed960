"""Child processes that never outlive their parent: process groups, the parent-death signal,
starting a server and waiting for its health URL, stopping it with its children, and the process
table that tests use to check nothing was left behind."""
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


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM, prctl=None) -> None:
    """Have the kernel send this process `sig` when its parent `parent_pid` dies, even by SIGKILL
    (Linux PR_SET_PDEATHSIG; elsewhere nothing); exit at once if the parent died before this call.

    Call it first thing in a child, or let `popen_group` do it between fork and exec. The signal
    follows the parent's *thread* that started the child: start children from a thread that lives
    as long as they should (the main thread)."""
    if sys.platform.startswith("linux"):
        (prctl or _prctl())(1, sig)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def _prctl():
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def popen_group(args: Sequence[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` for a child that never outlives this process: it leads its own process
    group (`stop_process` stops it with its own children, and a terminal's Ctrl-C reaches only us,
    who then stop it), and, started from the main thread, it gets SIGTERM when this process dies,
    crashes included (see `die_with_parent`; the child's own children are its business: a process
    group or the same). From another thread only the process group applies."""
    import threading

    preexec = None
    # the kernel ties the parent-death signal to the starting *thread*: armed from a short-lived thread
    # (e.g. a Timer that restarts redis-server) it would kill the child as soon as that thread ends
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        import functools

        # looked up here, not in the child: dlopen / dlsym between fork and exec can deadlock
        preexec = functools.partial(die_with_parent, os.getpid(), signal.SIGTERM, _prctl())
    return subprocess.Popen(list(args), start_new_session=True, preexec_fn=preexec, **kwargs)


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every running process (Linux /proc; zombies left out).
    The start time tells a process from a later one that got the same pid."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] not in ("Z", "X"):
                out[int(d.name)] = (int(fields[1]), fields[19])
    return out


def descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every running descendant of `root`."""
    procs = process_table()
    found, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start) in procs.items():
            if ppid == parent:
                found.add((pid, start))
                todo.append(pid)
    return found


def still_running(procs: set[tuple[int, str]], timeout: float = 0.0) -> set[int]:
    """The pids of `procs` (from `descendants`) still running after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        table = process_table()
        alive = {pid for pid, start in procs if table.get(pid, (0, None))[1] == start}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


@contextlib.contextmanager
def start_process(args: Sequence[str], health_url: str | None, log_path: Path | None = None,
                  env: dict | None = None, timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    """Start a subprocess (`popen_group`: own process group, dies with us), wait for `health_url`,
    stop it on exit."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = popen_group(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
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
