"""LlamaLitModule: optimizer groups, the schedule under accumulation, the NaN guard, metrics."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, Dataset

from llamalit.model.llama import Llama, ModelConfig
from llamalit.training.module import LlamaLitModule, compile_blocks, resolve_compile
from llamalit.training.optim import OptimConfig, build_optimizer, lr_at, param_groups

VOCAB = 64


class RandomRows(Dataset):
    def __init__(self, n: int, seq: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        y = self.x[i].roll(-1).clone()
        y[:3] = -100  # a masked "prompt"
        return {"input_ids": self.x[i], "labels": y}


MODEL = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=VOCAB, multiple_of=8, max_seq_len=16)
OPTIM = {"warmup_steps": 3, "lr": 1e-2, "min_lr": 1e-3}


def make_module(lora: dict | None = None, model: dict | None = None, **optim) -> LlamaLitModule:
    return LlamaLitModule({**MODEL.to_dict(), **(model or {})}, {**OPTIM, **optim}, lora)


def fit(module: LlamaLitModule, callbacks=(), max_steps: int = 10, **trainer_kw) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                        max_steps=max_steps, **trainer_kw)
    trainer.fit(module, DataLoader(RandomRows(64, 12), batch_size=4))
    return trainer


def test_param_groups_decay_only_matrices_and_only_trainable():
    module = make_module()
    model = module.model
    model.layers[0].attention.wq.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.layers[0].attention.wq.weight) not in decay_ids | no_decay_ids
    assert id(model.norm.weight) in no_decay_ids and id(model.layers[0].ffn_norm.weight) in no_decay_ids
    assert id(model.tok_embeddings.weight) in decay_ids and id(model.layers[0].feed_forward.w1.weight) in decay_ids
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # The tied embedding/output weight is one parameter, listed once.
    assert len(decay_ids) == len(decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    optimizer = build_optimizer(model, module.optim_cfg)
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_lr_schedule_values():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_at(10, cfg, 100) == pytest.approx(1.0)
    assert lr_at(55, cfg, 100) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    const = OptimConfig(lr=2e-4, warmup_ratio=0.03, schedule="constant")
    assert lr_at(2, const, 100) == pytest.approx(2e-4)
    assert lr_at(50, const, 100) == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(50, OptimConfig(schedule="bogus", warmup_steps=0), 100)


class LrRecorder(L.Callback):
    def __init__(self):
        self.lrs: list[float] = []
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_scheduler_steps_per_optimizer_step_under_accumulation():
    module = make_module()
    rec = LrRecorder()
    fit(module, [rec], max_steps=8, accumulate_grad_batches=4)
    expected = [lr_at(s, module.optim_cfg, 8) for s in range(8)]
    assert rec.batches == 32
    assert rec.lrs == pytest.approx(expected)
    assert rec.lrs[2] == pytest.approx(1e-2)  # warmup end
    assert lr_at(8, module.optim_cfg, 8) == pytest.approx(1e-3)  # the end of the schedule


def test_schedule_spans_the_steps_the_trainer_will_make():
    """The schedule's length is Lightning's estimated_stepping_batches: max_steps, or fewer when max_epochs ends
    the run first (64 rows in batches of 4 with accumulation 4: 4 optimizer steps an epoch)."""
    module = make_module(warmup_steps=1)
    rec = LrRecorder()
    fit(module, [rec], max_steps=100, max_epochs=2, accumulate_grad_batches=4)
    assert module.trainer.estimated_stepping_batches == 8 == len(rec.lrs)
    assert rec.lrs == pytest.approx([lr_at(s, module.optim_cfg, 8) for s in range(8)])
    assert rec.lrs[-1] < 2e-3  # decayed to near min_lr, not a 100-step schedule's ~9.9e-3


def test_nan_loss_stops_the_run_naming_the_step():
    module = make_module()
    real = module.model.hidden

    def poisoned(tokens, **kw):
        h = real(tokens, **kw)
        return h * float("nan") if module.global_step == 3 else h

    module.model.hidden = poisoned
    with pytest.raises(FloatingPointError, match="step 3"):
        fit(module)


def test_training_reduces_loss_and_validation_metrics():
    module = make_module(lr=3e-2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=30)
    loader = DataLoader(RandomRows(8, 12), batch_size=4)  # memorisable
    before = trainer.validate(module, loader, verbose=False)[0]
    trainer.fit(module, loader)
    after = trainer.validate(module, loader, verbose=False)[0]
    assert before["val/loss"] == pytest.approx(math.log(VOCAB), abs=0.2)
    assert after["val/loss"] < before["val/loss"] - 1.0
    assert after["val/ppl"] == pytest.approx(math.exp(after["val/loss"]), rel=1e-4)
    assert 0.0 <= after["val/acc"] <= 1.0 and after["val/acc"] > before["val/acc"]


def test_validation_loss_is_token_weighted_cross_entropy():
    module = make_module()
    loader = DataLoader(RandomRows(6, 12), batch_size=4)  # batches of 4 and 2 rows
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    got = trainer.validate(module, loader, verbose=False)[0]["val/loss"]
    ds = loader.dataset
    x = torch.stack([ds[i]["input_ids"] for i in range(6)])
    y = torch.stack([ds[i]["labels"] for i in range(6)])
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(module.model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    assert got == pytest.approx(float(ref), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        module = LlamaLitModule(MODEL, OPTIM, gradient_checkpointing=ckpt)
        batch = RandomRows(2, 12)[0]
        x, y = batch["input_ids"][None], batch["labels"][None]
        module.model.loss(x, y).backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-7)


def test_quantize_without_a_base_is_refused():
    with pytest.raises(ValueError, match="init_from"):
        LlamaLitModule(MODEL, OPTIM, quantize="nf4")


def test_compile_defaults_to_cuda_only():
    assert resolve_compile(None, torch.device("cuda")) and not resolve_compile(None, torch.device("cpu"))
    assert resolve_compile(True, torch.device("cpu")) and not resolve_compile(False, torch.device("cuda"))


@pytest.mark.slow
def test_compiled_blocks_match_eager_loss_and_grads():
    """Regional compilation (each block) changes no result, packed rows included (inductor on the CPU)."""
    torch.manual_seed(0)
    eager = Llama(ModelConfig.preset("tiny"))
    compiled = Llama(ModelConfig.preset("tiny"))
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    segments = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    positions = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, -1)
    for kw in ({}, {"positions": positions, "segments": segments}):
        for m in (eager, compiled):
            m.zero_grad()
            m.loss(x, y, **kw).backward()
        torch.testing.assert_close(compiled.loss(x, y, **kw), eager.loss(x, y, **kw), rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_model_from_module_state_rebuilds_the_trained_model(lora):
    """What an FSDP run exports: the gathered LightningModule state dict as one plain (LoRA) model."""
    from llamalit.checkpoints.lightning_ckpt import run_settings
    from llamalit.training.run import model_from_module_state

    adapter = {"enabled": True, "rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["wq", "wv"]}
    module = make_module(lora=adapter if lora else None)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # trained-looking weights, LoRA B no longer zero
    rebuilt = model_from_module_state(run_settings(module.hparams), module.state_dict())
    x = torch.randint(0, module.model.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), module.model.eval()(x), rtol=0, atol=0)
    assert type(rebuilt.layers[0].attention.wq).__name__ == ("LoRALinear" if lora else "Linear")


def test_progress_bar_reads_metrics_once_per_refresh_steps_not_per_micro_batch():
    """Each bar refresh reads the logged loss from the device (a GPU sync): with accumulation 4 and
    refresh_steps 2, 6 optimizer steps (24 micro-batches) refresh 3 times, not 12 or 24."""
    from llamalit.training.callbacks import StepProgressBar

    bar = StepProgressBar(refresh_steps=2)
    reads, shown = [], []
    get_metrics = bar.get_metrics

    def spy(trainer, module):
        reads.append(trainer.global_step)
        shown.append(get_metrics(trainer, module))
        return shown[-1]

    bar.get_metrics = spy
    module = make_module()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[bar], max_steps=6, accumulate_grad_batches=4, limit_val_batches=0)
    trainer.fit(module, DataLoader(RandomRows(64, 12), batch_size=2))
    # plus one read where Lightning thinks the epoch ends (its total ignores accumulation) and one at the end
    assert bar.refresh_rate == 8 and {2, 4, 6} <= set(reads) and len(reads) <= 5, reads
    assert all(isinstance(items["train/loss"], float) for items in shown)  # shown, though not a prog_bar metric
    # Lightning reads prog_bar metrics back after every micro-batch: the training step must log none
    assert not trainer.progress_bar_metrics, trainer.progress_bar_metrics


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fused_adamw_is_clipped_under_mixed_precision_as_a_plain_loop_clips(precision):
    """Lightning refuses gradient_clip_val with a fused AdamW under AMP (every CUDA run crashed at its first step).
    The module clips itself: the weights after 3 steps equal a plain loop's (autocast, unscale for 16-mixed's
    GradScaler, clip_grad_norm_, unfused AdamW, the schedule)."""
    from itertools import islice

    from llamalit.training.module import batch_loss
    from llamalit.training.optim import build_scheduler

    clip, steps = 0.05, 3
    torch.manual_seed(0)
    module = make_module(fused=True)
    ref = copy.deepcopy(module.model)
    start = [p.detach().clone() for p in ref.parameters()]
    # Lightning turns precision="16-mixed" into bf16 on the CPU: the plugin given as such keeps fp16 + GradScaler
    trainer = fit(module, max_steps=steps, plugins=[MixedPrecision(precision, "cpu")], gradient_clip_val=clip)
    assert trainer.optimizers[0].defaults["fused"] and trainer.global_step == steps
    assert (trainer.precision_plugin.scaler is not None) == (precision == "16-mixed")

    opt = build_optimizer(ref, OptimConfig.from_dict({**OPTIM, "fused": False}))
    sched = build_scheduler(opt, module.optim_cfg, steps)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    for batch in islice(DataLoader(RandomRows(64, 12), batch_size=4), steps):
        with torch.autocast("cpu", dtype=dtype):
            loss = batch_loss(ref, batch, loss_impl=module._train_impl).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        assert torch.nn.utils.clip_grad_norm_(ref.parameters(), clip) > clip  # the clip is active
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        sched.step()
    assert any(not torch.equal(p, s) for p, s in zip(ref.parameters(), start))  # no step was skipped as inf
    for (name, a), b in zip(module.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_the_module_node_builds_the_module_from_the_run_settings(tmp_path):
    """conf/train.yaml's ``module:`` node takes the user-facing keys as given on the command line; ``train()``
    instantiates it with the device settings' resolved values in those keys (build_module)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from llamalit.cli import CONF_DIR
    from llamalit.training.run import build_module

    overrides = ["model=tiny", "model.dim=64", "model.gradient_checkpointing=true", "optim.lr=0.1", "lora=qkvo",
                 "compile=false", "compile_mode=reduce-overhead", "attention=dense", "loss_impl=plain",
                 f"run_dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    module = instantiate(cfg.module)
    hp = module.hparams
    assert hp["model_cfg"] == module.model.cfg.to_dict() and module.model.cfg.dim == 64
    assert module.optim_cfg.lr == 0.1 and module.lora_cfg.rank == 2 and hp["lora_cfg"]["targets"] == ["wq", "wk",
                                                                                                       "wv", "wo"]
    assert (hp["compile"], hp["compile_mode"], hp["attention"], hp["loss_impl"], hp["gradient_checkpointing"]) == \
        (False, "reduce-overhead", "dense", "plain", True)
    assert module.model.attention_backend == "dense" and hp["init_from"] is None and hp["quantize"] is None

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved = {**resolved, "compile": True, "attention": "auto", "optim": {**resolved["optim"], "fused": True}}
    module = build_module(cfg, resolved)
    assert (module.hparams["compile"], module.model.attention_backend, module.optim_cfg.fused) == (True, "auto", True)
    assert resolved["module"]["compile"] is True  # what the logger records is what the module got
