"""trainer sft: real TRL SFTTrainer steps on the tiny model; adapter (+ merged weights) out;
the adapter is servable (loads into PEFT); plots work on SFT runs too."""
import json

import pytest

from trainer.config import SFTRunConfig
from trainer.metrics import read_metrics
from trainer.plot import plot_run
from trainer.sft import run_sft


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sft_on_env_writes_adapter_and_metrics(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = SFTRunConfig(model=str(tiny_model), out=str(tmp_path / "sft"), env="toy", limit=8, max_steps=4,
                       batch_size=4, max_length=256, lr=5e-3, merge=True, log_level="warning")
    adapter = run_sft(cfg)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    steps = [r for r in read_metrics(tmp_path / "sft") if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all("loss" in r for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "merged")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        b, p, m = base(ids).logits, peft(ids).logits, merged(ids).logits
    assert not torch.allclose(b, p)  # the adapter learned something
    assert torch.allclose(p, m, atol=1e-4)  # merged weights = base + adapter
    assert {"loss", "token_accuracy"} <= {x.stem for x in plot_run(tmp_path / "sft")}


def test_sft_from_jsonl_via_cli(tiny_model, tmp_path):
    from trainer.cli import main

    data = tmp_path / "conv.jsonl"
    conv = {"messages": [{"role": "system", "content": "Answer or ask."},
                         {"role": "user", "content": "How tall is it?"},
                         {"role": "assistant", "content": "Do you mean the oak or the tower?"}]}
    data.write_text("\n".join(json.dumps(conv) for _ in range(4)) + "\n")
    assert main(["sft", "--data", str(data), "--model", str(tiny_model), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "2", "--no-tensorboard", "--log-level", "warning"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "sft_config.yaml").is_file()


def test_sft_full_finetune_trains_every_weight_and_writes_a_model(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = SFTRunConfig(model=str(tiny_model), out=str(tmp_path / "full"), env="toy", n_conversations=8, max_steps=3,
                       batch_size=4, max_length=256, lr=1e-3, full_finetune=True, log_level="warning",
                       tensorboard=False)
    out = run_sft(cfg)
    assert out == (tmp_path / "full" / "model").resolve() and not (tmp_path / "full" / "adapter").exists()
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    base, tuned = (AutoModelForCausalLM.from_pretrained(p) for p in (tiny_model, out))
    b, t = dict(base.named_parameters()), dict(tuned.named_parameters())
    assert b.keys() == t.keys()  # a plain model, no LoRA modules
    changed = [k for k in b if not torch.equal(b[k], t[k])]
    assert any("mlp" in k for k in changed) and any("self_attn" in k for k in changed)  # every block's weights trained
    steps = [r for r in read_metrics(tmp_path / "full") if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    with pytest.raises(ValueError, match="drop merge"):
        SFTRunConfig(model=str(tiny_model), out=str(tmp_path / "x"), env="toy", full_finetune=True, merge=True)
