"""Issue 25: the GPU training paths read against torch's and Lightning's sources, forced onto the CPU where they
can be (an ``aot_eager`` compile, bf16 autocast, fp16 with a GradScaler, a fused AdamW).

Flex attention has no backward on the CPU (torch raises), so the flex ``BlockMask`` is checked in the compiled
step's forward and loss; the backward of the same compiled step runs with the dense mask it must equal.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, Dataset

from llamalit.model.llama import IGNORE_INDEX, Llama, ModelConfig
from llamalit.training.module import (
    LlamaLitModule,
    batch_loss,
    check_cudagraph_accumulation,
    compile_step,
    eval_loss_impl,
    run_compiled_step,
)

VOCAB = 64
MODEL = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=VOCAB, multiple_of=8, max_seq_len=16)


class Rows(Dataset):
    def __init__(self, n: int = 16, seq: int = 12):
        self.x = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        y = self.x[i].roll(-1).clone()
        y[:3] = IGNORE_INDEX
        return {"input_ids": self.x[i], "labels": y}


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, **kw)


# 1. compile_mode=reduce-overhead with gradient accumulation


def test_cuda_graphs_with_gradient_accumulation_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"compile_mode=reduce-overhead with trainer.accumulate_grad_batches=8") as e:
        check_cudagraph_accumulation("reduce-overhead", "cuda", 8)
    assert "\n" not in str(e.value) and "accumulate_grad_batches=1" in str(e.value)
    check_cudagraph_accumulation("reduce-overhead", "cuda", 1)  # one micro-batch a step: the grads are read first
    check_cudagraph_accumulation("default", "cuda", 8)
    check_cudagraph_accumulation("reduce-overhead", "cpu", 8)  # no CUDA graphs off CUDA


def test_the_module_checks_the_trainers_accumulation_before_compiling(monkeypatch):
    """on_fit_start hands the mode, device and the Trainer's accumulation to the check, before any compile."""
    seen = []
    monkeypatch.setattr("llamalit.training.module.check_cudagraph_accumulation", lambda *a: seen.append(a))
    module = LlamaLitModule(MODEL.to_dict(), {}, compile=True, compile_mode="reduce-overhead")
    trainer = _trainer(max_steps=1, accumulate_grad_batches=8)
    module.trainer = trainer
    module.on_fit_start()
    assert seen == [("reduce-overhead", "cpu", 8)]


# 2. validation and evaluation use the counted-positions loss


def test_validation_never_runs_the_compiled_loss_eagerly(monkeypatch):
    """train.py writes loss_impl=compiled back into the run's settings: validation must still count positions."""
    assert eval_loss_impl("compiled", "cuda") == "plain" and eval_loss_impl("compiled", "cpu") == "chunked"
    assert eval_loss_impl("auto", "cpu") == "chunked" and eval_loss_impl("plain", "cpu") == "plain"
    impls = []
    real = batch_loss

    def spy(model, batch, accuracy=False, loss_impl="auto"):
        impls.append((model.training, loss_impl))
        return real(model, batch, accuracy, loss_impl)

    monkeypatch.setattr("llamalit.training.module.batch_loss", spy)
    module = LlamaLitModule(MODEL.to_dict(), {}, compile=False, loss_impl="compiled")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=2, limit_val_batches=2, val_check_interval=2,
                        num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(Rows(), batch_size=4), DataLoader(Rows(8), batch_size=4))
    assert {impl for training, impl in impls if training} == {"compiled"}
    assert {impl for training, impl in impls if not training} == {"chunked"}


# 3. the instruct default through the compiled step: bf16 autocast, head_dim 48, T = 349, packed rows


def _packed_batch(b: int, t: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (b, t), generator=g)
    y = torch.randint(0, vocab, (b, t), generator=g)
    segments, positions = torch.zeros(b, t, dtype=torch.long), torch.zeros(b, t, dtype=torch.long)
    for row, lengths in enumerate([(120, 100, 129), (200, 90, 59)][:b]):
        start = 0
        for doc, n in enumerate(lengths):
            segments[row, start:start + n] = doc
            positions[row, start:start + n] = torch.arange(n)
            y[row, start:start + 20] = IGNORE_INDEX  # each document's prompt
            y[row, start + n - 1] = IGNORE_INDEX  # its last position predicts nothing
            start += n
    return {"input_ids": x, "labels": y, "positions": positions, "segments": segments}


@pytest.mark.slow
def test_instruct_default_step_bf16_head_dim_48_packed_349_flex_and_dense():
    cfg = ModelConfig(dim=96, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=352)
    assert cfg.head_dim == 48
    batch = _packed_batch(2, 349, cfg.vocab_size)
    torch.manual_seed(0)
    dense, flex = Llama(cfg, attention="dense"), Llama(cfg, attention="flex")
    flex.load_state_dict(dense.state_dict())
    step = compile_step(backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the BlockMask is built inside the one fullgraph step (no backward of flex on the CPU: forward and loss)
        with torch.no_grad():
            flex_out = run_compiled_step(step, flex, batch, True, "compiled")
            dense_ref = batch_loss(dense, batch, True, "compiled")
        out = run_compiled_step(step, dense, batch, True, "compiled")
    torch.testing.assert_close(flex_out.loss, dense_ref.loss, rtol=2e-2, atol=2e-2)
    assert abs(int(flex_out.correct) - int(dense_ref.correct)) <= 2  # bf16 argmax ties may differ
    out.loss.backward()
    # the compiled bf16 step against the eager fp32 loss over counted positions
    ref_model = Llama(cfg, attention="dense")
    ref_model.load_state_dict(dense.state_dict())
    ref = batch_loss(ref_model, batch, False, "plain").loss
    ref.backward()
    torch.testing.assert_close(out.loss.float(), ref, rtol=2e-2, atol=2e-2)
    for (name, a), b in zip(ref_model.named_parameters(), dense.parameters()):
        assert b.grad is not None and b.grad.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


# 6. train/grad_norm under 16-mixed is the unscaled norm


def _logged_grad_norm(plugins: list) -> float:
    torch.manual_seed(0)
    module = LlamaLitModule(MODEL.to_dict(), {"fused": True, "warmup_steps": 1})
    trainer = _trainer(max_steps=1, log_every_n_steps=1, plugins=plugins, gradient_clip_val=100.0)
    trainer.fit(module, DataLoader(Rows(), batch_size=4))
    return float(trainer.callback_metrics["train/grad_norm"])


def test_grad_norm_under_16_mixed_is_the_true_norm():
    """A fused AdamW leaves 16-mixed's gradients scaled until its step: the logged norm must not be x 65536."""
    fp32 = _logged_grad_norm([])
    fp16 = _logged_grad_norm([MixedPrecision("16-mixed", "cpu")])
    assert fp32 > 0 and fp16 == pytest.approx(fp32, rel=0.05)
