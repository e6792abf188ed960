"""The stand-in model server behaves as vLLM's code defines it (each test cites the vLLM file)."""
import argparse
import json
import shutil
from types import SimpleNamespace

import aiohttp
import pytest

from simkit.modelserver import info as server_info
from simkit.modelserver.server import ModelServer, generation_defaults, register_cli


def _make_adapter(base_dir, out_dir, r=4, seed=1):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return _make_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "ok")


def _variant(adapter, tmp_path, name, **config):
    """A copy of `adapter` whose adapter_config.json has `config` merged in."""
    dst = tmp_path / name
    shutil.copytree(adapter, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


async def _post(s, url, payload, **kw):
    async with s.post(url, json=payload, **kw) as r:
        return r.status, await r.text()


async def _load(s, server, name, path, inplace=False):
    status, text = await _post(s, server.url + "/load_lora_adapter",
                               {"lora_name": name, "lora_path": str(path), "load_inplace": inplace})
    return status, (json.loads(text)["error"] if status != 200 else text)


async def test_adapter_rank_above_max_lora_rank_is_500(model_server, tiny_model, tmp_path):
    """vllm/lora/peft_helper.py validate_legal: "LoRA rank {r} is greater than max_lora_rank {max}.";
    vllm/entrypoints/openai/models/serving.py load_lora_adapter answers it 500 InternalServerError.
    The stand-in's --max-lora-rank defaults to vLLM's 16 (vllm/config/lora.py)."""
    big = _make_adapter(tiny_model, tmp_path / "r32", r=32)
    async with aiohttp.ClientSession() as s:
        status, err = await _load(s, model_server, "r32", big)
        async with s.get(model_server.url + "/models") as r:
            ids = {m["id"] for m in (await r.json())["data"]}
    assert status == 500 and err["type"] == "InternalServerError" and err["code"] == 500
    assert err["message"] == "LoRA rank 32 is greater than max_lora_rank 16."
    assert "r32" not in ids


@pytest.mark.parametrize("config,message", [
    ({"use_dora": True}, "vLLM does not yet support DoRA."),
    ({"modules_to_save": ["lm_head"]}, "vLLM only supports modules_to_save being None."),
    ({"bias": "all"}, "Adapter bias is not supported."),
    ({"bias": "lora_only", "use_dora": True}, "vLLM does not yet support DoRA. Adapter bias is not supported."),
])
async def test_unsupported_adapter_features_are_500(model_server, adapter, tmp_path, config, message):
    """vllm/lora/peft_helper.py: _validate_features (modules_to_save, DoRA) then the bias check in
    validate_legal, joined with a space; 500 InternalServerError (entrypoints/openai/models/serving.py)."""
    async with aiohttp.ClientSession() as s:
        status, err = await _load(s, model_server, "bad", _variant(adapter, tmp_path, "v", **config))
    assert (status, err["type"], err["message"]) == (500, "InternalServerError", message)


async def test_target_module_the_model_lacks_is_500(model_server, adapter, tmp_path):
    """vllm/lora/lora_model.py from_local_checkpoint: safetensors keys on a module the model cannot
    take LoRA on → "While loading {dir}, expected target modules in [...] but received [...]"."""
    import torch
    from safetensors.torch import save_file

    bad = _variant(adapter, tmp_path, "fused", target_modules=["qkv_fused"])
    save_file({"base_model.model.model.layers.0.self_attn.qkv_fused.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.0.self_attn.qkv_fused.lora_B.weight": torch.zeros(64, 4)},
              str(bad / "adapter_model.safetensors"))
    async with aiohttp.ClientSession() as s:
        status, err = await _load(s, model_server, "fused", bad)
    assert status == 500 and err["message"].startswith(f"While loading {bad}, expected target modules in [")
    assert "but received ['model.layers.0.self_attn.qkv_fused']" in err["message"]
    assert "'q_proj'" in err["message"] and "'lm_head'" not in err["message"]


async def test_missing_adapter_is_404_not_found(model_server, tmp_path):
    """vllm/exceptions.py LoRAAdapterNotFoundError: "Loading lora {name} failed: No adapter found for
    {path}", answered 404 by vllm/entrypoints/openai/models/serving.py load_lora_adapter."""
    async with aiohttp.ClientSession() as s:
        status, err = await _load(s, model_server, "ghost", tmp_path / "nowhere")
    assert (status, err["type"]) == (404, "NotFoundError")
    assert err["message"] == f"Loading lora ghost failed: No adapter found for {tmp_path / 'nowhere'}"


async def test_failed_inplace_load_keeps_the_old_adapter_serving(model_server, adapter, tmp_path):
    """vllm/entrypoints/openai/models/serving.py load_lora_adapter registers the new LoRARequest only
    after engine_client.add_lora succeeded: a failed load_inplace leaves the old adapter serving."""
    broken = _variant(adapter, tmp_path, "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    chat = {"model": "keep", "messages": [{"role": "user", "content": "How tall is the oak?"}],
            "max_tokens": 8, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        try:
            assert (await _load(s, model_server, "keep", adapter))[0] == 200
            status, before = await _post(s, model_server.url + "/chat/completions", chat)
            assert status == 200
            status, err = await _load(s, model_server, "keep", broken, inplace=True)
            assert status == 500 and err["type"] == "InternalServerError"
            status, after = await _post(s, model_server.url + "/chat/completions", chat)
            assert status == 200
            assert json.loads(after)["choices"][0]["message"] == json.loads(before)["choices"][0]["message"]
            async with s.get(model_server.url + "/models") as r:
                listed = {m["id"]: m for m in (await r.json())["data"]}
            assert listed["keep"]["root"] == str(adapter)
        finally:
            await _post(s, model_server.url + "/unload_lora_adapter", {"lora_name": "keep"})


async def test_post_without_json_content_type_is_400(model_server):
    """vllm/entrypoints/utils.py validate_json_request: a media type other than application/json is
    a RequestValidationError, which vLLM's api_server answers 400 BadRequestError."""
    async with aiohttp.ClientSession() as s:
        for path in ("/chat/completions", "/load_lora_adapter"):
            async with s.post(model_server.url + path, data=b'{"messages": []}',
                              headers={"Content-Type": "text/plain"}) as r:
                body = await r.json()
            assert r.status == 400 and "Only 'application/json' is allowed" in body["error"]["message"]


async def test_empty_messages_fail_in_the_chat_template_as_in_vllm(model_server):
    """vllm/entrypoints/openai/chat_completion/protocol.py: `messages` is a plain list (no minimum), so []
    reaches the chat template (vllm/entrypoints/chat_utils.py apply_hf_chat_template →
    tokenizer.apply_chat_template). transformers refuses an empty conversation with a ValueError, which
    vllm/entrypoints/openai/chat_completion/serving.py answers 400 BadRequestError, f"{e} {e.__cause__}"."""
    from transformers import AutoTokenizer

    async with aiohttp.ClientSession() as s:
        status, text = await _post(s, model_server.url + "/chat/completions", {"messages": [], "max_tokens": 3})
    err = json.loads(text)["error"]
    assert status == 400 and err["type"] == "BadRequestError"
    try:  # the message is the tokenizer's own
        AutoTokenizer.from_pretrained(model_server_model(model_server)).apply_chat_template(
            [], add_generation_prompt=True)
    except ValueError as e:
        assert err["message"] == f"{e} {e.__cause__}"
    else:  # a transformers that renders [] would have generated
        raise AssertionError(f"this transformers renders an empty conversation; the server said {err}")


def model_server_model(server):
    import urllib.request

    with urllib.request.urlopen(server.url + "/models") as r:
        return json.loads(r.read())["data"][0]["root"]


async def test_served_name_is_the_model_argument_verbatim(model_server, tiny_model):
    """vllm/engine/arg_utils.py: served_model_name defaults to --model as given; /v1/models lists it
    (vllm/entrypoints/openai/models/serving.py show_available_models) and responses echo it."""
    async with aiohttp.ClientSession() as s:
        async with s.get(model_server.url + "/models") as r:
            base = (await r.json())["data"][0]
        status, text = await _post(s, model_server.url + "/chat/completions",
                                   {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert base["id"] == str(tiny_model) and base["parent"] is None and base["max_lora_rank"] == 16
    assert json.loads(text)["model"] == str(tiny_model)


async def test_finish_reason_length_and_stop_reason(model_server):
    """vllm/v1/engine/detokenizer.py + vllm/v1/core/sched/utils.py check_stop: max_tokens reached →
    finish_reason "length", stop_reason None; a stop string → "stop" with stop_reason = the string,
    cut from the text (serving_chat.py copies both into the choice)."""
    msgs = [{"role": "user", "content": "Tell me about the tall oak."}]
    async with aiohttp.ClientSession() as s:
        _, text = await _post(s, model_server.url + "/chat/completions",
                              {"messages": msgs, "max_tokens": 5, "ignore_eos": True, "temperature": 0})
        long = json.loads(text)
        choice = long["choices"][0]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("length", None)
        assert long["usage"]["completion_tokens"] == 5
        word = choice["message"]["content"].split()[1] if len(choice["message"]["content"].split()) > 1 else None
        if word:
            _, text = await _post(s, model_server.url + "/chat/completions",
                                  {"messages": msgs, "max_tokens": 5, "ignore_eos": True, "temperature": 0,
                                   "stop": [word]})
            choice = json.loads(text)["choices"][0]
            assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", word)
            assert word not in choice["message"]["content"]


async def test_version_endpoint_names_the_stand_in(model_server):
    """vllm/entrypoints/openai/api_server.py GET /version → {"version": vllm.__version__}; the stand-in
    answers its own string, which `server_info.vllm_version` reads as "not vLLM"."""
    async with aiohttp.ClientSession() as s:
        async with s.get(server_info.root_url(model_server.url) + "/version") as r:
            body = await r.json()
    assert r.status == 200 and body["version"].startswith("simkit-model-server")
    assert server_info.vllm_version(body) is None
    assert server_info.vllm_version({"version": "0.32.1"}) == (0, 32)
    assert server_info.vllm_version({"version": "0.33.0rc1.dev5"}) == (0, 33)


def test_sticky_load_inplace_warning_before_vllm_033():
    """Before vLLM 0.33 a LoRARequest loaded with load_inplace kept the flag and the engine re-read
    the adapter every step (vllm/lora/request.py, worker_manager.py); warn only where it applies."""
    assert server_info.version_warnings((0, 32), inplace_reloads=True)
    assert not server_info.version_warnings((0, 33), inplace_reloads=True)
    assert not server_info.version_warnings((0, 32), inplace_reloads=False)
    assert not server_info.version_warnings(None, inplace_reloads=True)  # the stand-in


def test_generation_config_supplies_unset_sampling_parameters(tmp_path):
    """vllm/config/model.py get_diff_sampling_param (`--generation-config auto`): repetition_penalty,
    temperature, top_k, top_p, min_p and max_new_tokens (→ max_tokens) from generation_config.json are
    the defaults; a request's own value wins (vllm/entrypoints/openai/chat_completion/protocol.py)."""
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 7,
         "eos_token_id": 2, "do_sample": True}))
    defaults = generation_defaults(str(tmp_path))
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 7}
    server = ModelServer(None, "m", default_max_tokens=128)
    server.runner = SimpleNamespace(generation_defaults=defaults)
    assert server.sampling({}) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.0,
                                   "repetition_penalty": 1.1, "max_tokens": 7}
    assert server.sampling({"temperature": 0, "max_tokens": 3})["temperature"] == 0.0
    assert server.sampling({"temperature": 0, "max_tokens": 3})["max_tokens"] == 3
    server.runner = SimpleNamespace(generation_defaults=generation_defaults(str(tmp_path / "none")))
    assert server.sampling({}) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                   "repetition_penalty": 1.0, "max_tokens": 128}


def test_max_lora_rank_flag_takes_vllms_values():
    """vllm/config/lora.py: max_lora_rank is a MaxLoRARanks Literal[1, 8, 16, 32, 64, 128, 256, 320, 512],
    default 16."""
    from simkit.config import config_from_args
    from simkit.modelserver.server import ModelServerConfig

    p = argparse.ArgumentParser()
    register_cli(p.add_subparsers())
    rank = lambda *a: config_from_args(ModelServerConfig, p.parse_args(["model-server", "--model", "m", *a])).max_lora_rank  # noqa: E731
    assert rank() == 16 and rank("--max-lora-rank", "320") == 320
    with pytest.raises(SystemExit):
        p.parse_args(["model-server", "--model", "m", "--max-lora-rank", "24"])
