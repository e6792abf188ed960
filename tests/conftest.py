"""Shared test set-up: real data from $SIMKIT_DATA_DIR (default ../shared/data beside the
checkout). Tests that need the data fail loudly when it is missing: they never skip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("SIMKIT_DATA_DIR", str(REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ["SIMKIT_DATA_DIR"])
    assert d.is_dir(), f"task data not found at {d}: set SIMKIT_DATA_DIR to the shared/data folder"
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama + offline tokenizer, made once per test session."""
    from simkit.modelserver.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def model_server(tiny_model, tmp_path_factory):
    """The embedded model server as a real subprocess on loopback (shared by tests)."""
    from simkit.loadtools.testing import start_model_server

    log = tmp_path_factory.mktemp("logs") / "model_server.log"
    with start_model_server(tiny_model, log_path=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def one_torch_thread():
    """Trainer tests: one intra-op thread. The CI box is a small shared CPU where OpenMP spin
    contention makes tiny-model steps swing several-fold. Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def redis_server(tmp_path_factory):
    """A real redis-server (AOF on) on a free loopback port, one per test. Fails, never skips,
    when redis-server is not installed: `apt-get install -y redis-server` (CI's .ci/run does)."""
    from simkit.loadtools.testing import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv
