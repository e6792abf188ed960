"""Completion-only LM head (trainer.models.completion_only_logits): the DPO loss, its gradients
and real TRL DPO / SFT steps on the tiny model match TRL's own CPU head, which projects every
position through the vocabulary.

Tolerances: float32 — loss and LoRA gradients to 1e-5 relative (the two heads do the same fp32
arithmetic per position; only the row blocking of the matmul differs); three optimizer steps'
losses to 1e-4 relative (Adam amplifies last-bit differences a little each step).
"""
import pytest
import torch

from trainer.config import RunConfig
from trainer.dpo import DPORun
from trainer.models import checkpointing_args, completion_only_logits, load_model, load_tokenizer, lora_config
from trainer.synthetic import toy_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dpo_trainer(tiny_model, tmp_path, name: str, steps: int = 3, dtype: str = "float32"):
    from datasets import Dataset
    from trl import DPOTrainer

    cfg = RunConfig(queue=str(tmp_path / "unused.db"), model=str(tiny_model), out=str(tmp_path / name),
                    max_steps=steps, batch_size=2, max_length=256, lr=1e-2, lora_dropout=0.0, dtype=dtype,
                    log_level="warning")
    args = DPORun(cfg).dpo_config()
    args.output_dir = str(tmp_path / name)
    torch.manual_seed(0)
    return DPOTrainer(model=load_model(str(tiny_model), dtype), args=args,
                      processing_class=load_tokenizer(str(tiny_model)),
                      train_dataset=Dataset.from_list([p.to_trl() for p in toy_pairs(2 * steps)]),
                      peft_config=lora_config(cfg))


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_completion_only_head_gives_the_same_dpo_loss_and_gradients(tiny_model, tmp_path, monkeypatch):
    import trl.kernels

    scored = []

    class Spy(trl.kernels.ChunkedLogProbFunction):  # counts the rows the completion-only head projects
        @classmethod
        def apply(cls, hidden, *rest):
            scored.append(hidden.shape[0])
            return super().apply(hidden, *rest)

    monkeypatch.setattr(trl.kernels, "ChunkedLogProbFunction", Spy)
    trainer = _dpo_trainer(tiny_model, tmp_path, "grads")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    mask = batch["completion_mask"]
    assert 0 < int(mask.sum()) < mask.numel() // 2  # mostly prompt: the case the head is for
    full_loss, full_grads = _loss_and_grads(trainer, batch)
    assert completion_only_logits(trainer)
    loss, grads = _loss_and_grads(trainer, batch)
    assert scored == [int(mask[:, 1:].sum())] * 2  # policy and reference forward, completion rows only
    assert torch.allclose(loss, full_loss, rtol=1e-5, atol=1e-6), (loss, full_loss)
    assert grads.keys() == full_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert torch.allclose(g, full_grads[name], rtol=1e-4, atol=1e-6 * full_grads[name].abs().max()), name


def test_completion_only_head_matches_full_over_real_dpo_steps(tiny_model, tmp_path):
    runs = {}
    for compact in (False, True):
        trainer = _dpo_trainer(tiny_model, tmp_path, f"steps{int(compact)}")
        if compact:
            assert completion_only_logits(trainer)
        trainer.train()
        runs[compact] = [(r["loss"], r["rewards/margins"], r["logps/chosen"])
                         for r in trainer.state.log_history if "loss" in r]
    assert len(runs[True]) == 3
    for got, want in zip(runs[True], runs[False]):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_completion_only_head_matches_full_in_sft(tiny_model, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trainer.sft import env_rows

    rows = env_rows("toy", "train", n_conversations=4)
    losses = {}
    for compact in (False, True):
        torch.manual_seed(0)
        args = SFTConfig(output_dir=str(tmp_path / f"sft{int(compact)}"), per_device_train_batch_size=2,
                         max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                         disable_tqdm=True, max_length=256, bf16=False, use_cpu=True,
                         **checkpointing_args(SFTConfig, False))
        tr = SFTTrainer(model=load_model(str(tiny_model), "float32"), args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=load_tokenizer(str(tiny_model)),
                        peft_config=lora_config(RunConfig(queue="q", model="m", out="o", lora_dropout=0.0)))
        if compact:
            assert completion_only_logits(tr)
        tr.train()
        losses[compact] = [r["loss"] for r in tr.state.log_history if "loss" in r]
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_frozen_base_weights_in_bf16_leave_an_autocast_step_unchanged(tiny_model, tmp_path):
    """trainer.models.frozen_weights_bf16: under CPU bf16 autocast the frozen linear weights are cast
    at every use; storing them in bf16 once gives the very values autocast computed with, so the DPO
    loss and the LoRA gradients are bit-identical, and the adapter and embeddings stay fp32."""
    from trainer.models import frozen_weights_bf16

    trainer = _dpo_trainer(tiny_model, tmp_path, "bf16base", dtype="bf16-mixed")
    assert completion_only_logits(trainer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want_grads = _loss_and_grads(trainer, batch)
    model = trainer.model
    n_layers = model.get_base_model().config.num_hidden_layers
    assert frozen_weights_bf16(model) == 7 * n_layers  # q, k, v, o, gate, up, down of each layer
    assert frozen_weights_bf16(model) == 0  # once
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(trainer, batch)
    assert torch.equal(loss, want_loss), (loss, want_loss)
    assert grads.keys() == want_grads.keys() and len(grads) > 0
    assert all(torch.equal(g, want_grads[name]) for name, g in grads.items())
