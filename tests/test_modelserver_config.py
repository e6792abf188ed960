"""`simkit model-server`, `model fetch` and `model init-tiny` take their flags from pydantic configs:
the old flag names, defaults, choices and the $SIMKIT_SERVER_API_KEY default still hold."""
import argparse

import pytest

from simkit.config import config_from_args
from simkit.modelserver import tiny
from simkit.modelserver.fetch import FetchConfig
from simkit.modelserver.server import ModelServerConfig, register_cli


@pytest.fixture
def parse():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    register_cli(sub)
    tiny.register_cli(sub)
    return p.parse_args


def test_model_server_defaults_and_vllm_flags(parse, monkeypatch):
    monkeypatch.delenv("SIMKIT_SERVER_API_KEY", raising=False)
    cfg = config_from_args(ModelServerConfig, parse(["model-server", "--model", "m"]))
    assert (cfg.max_lora_rank, cfg.port, cfg.host, cfg.dtype, cfg.api_key) == (16, 8000, "127.0.0.1", "auto", None)
    cfg = config_from_args(ModelServerConfig, parse(["model-server", "--model", "m", "--served-model-name", "pol",
                                                     "--max-lora-rank", "320", "--max-model-len", "512"]))
    assert (cfg.served_model_name, cfg.max_lora_rank, cfg.max_model_len) == ("pol", 320, 512)
    with pytest.raises(SystemExit):  # vLLM's MaxLoRARanks only
        parse(["model-server", "--model", "m", "--max-lora-rank", "24"])
    with pytest.raises(ValueError, match="--model"):
        config_from_args(ModelServerConfig, parse(["model-server"]))


def test_api_key_defaults_to_the_environment(parse, monkeypatch):
    monkeypatch.setenv("SIMKIT_SERVER_API_KEY", "from-env")
    assert config_from_args(ModelServerConfig, parse(["model-server", "--model", "m"])).api_key == "from-env"
    cfg = config_from_args(ModelServerConfig, parse(["model-server", "--model", "m", "--api-key", "flag"]))
    assert cfg.api_key == "flag"


def test_model_server_yaml_then_flags(parse, tmp_path):
    (tmp_path / "s.yaml").write_text("model: a\nserved-model-name: pol\nport: 9\n")
    cfg = config_from_args(ModelServerConfig, parse(["model-server", "--config", str(tmp_path / "s.yaml"),
                                                     "--port", "10"]))
    assert (cfg.model, cfg.served_model_name, cfg.port) == ("a", "pol", 10)


def test_fetch_and_init_tiny_flags(parse):
    cfg = config_from_args(FetchConfig, parse(["model", "fetch", "smollm2", "--out", "o"]))
    assert (cfg.source, str(cfg.out), cfg.install, cfg.force) == ("smollm2", "o", True, False)
    cfg = config_from_args(FetchConfig, parse(["model", "fetch", "x.gguf", "--out", "o", "--no-install", "--force"]))
    assert (cfg.install, cfg.force) == (False, True)
    cfg = config_from_args(tiny.InitTinyConfig, parse(["model", "init-tiny", "--out", "o", "--seed", "3"]))
    assert (cfg.seed, cfg.vocab_size, cfg.hidden_size, cfg.layers, cfg.corpus) == (3, 1024, 64, 2, None)


def test_kv_pool_is_on_for_a_gpu_by_default_and_obeys_on_off(parse):
    from simkit.modelserver.server import uses_kv_pool

    cfg = config_from_args(ModelServerConfig, parse(["model-server", "--model", "m"]))
    assert (cfg.kv_pool, cfg.kv_pool_tokens, cfg.max_batch) == ("auto", 2048, 64)
    assert uses_kv_pool("auto", "cuda") and not uses_kv_pool("auto", "cpu")
    assert uses_kv_pool("on", "cpu") and not uses_kv_pool("off", "cuda")


def test_hub_kernels_are_off_unless_the_user_turns_them_on():
    """transformers fetches 'hub kernels' from the Hub on a GPU by default: offline that breaks loading."""
    import os
    import subprocess
    import sys

    code = "import os, simkit; print(os.environ['USE_HUB_KERNELS'])"
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "NO"
    assert subprocess.run([sys.executable, "-c", code], env={**env, "USE_HUB_KERNELS": "YES"}, capture_output=True,
                          text=True, check=True).stdout.strip() == "YES"
