"""LlamaLitModule: the LightningModule that trains a Llama (from scratch, from a checkpoint, or with LoRA)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from llamalit.model import Llama, ModelConfig, rope_tables
from llamalit.training.optim import OptimConfig, build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def set_max_seq_len(model: Llama, max_seq_len: int) -> None:
    """Grow (or shrink) the RoPE tables; RoPE is not learned, so a longer context needs only new tables."""
    if max_seq_len == model.cfg.max_seq_len:
        return
    model.cfg.max_seq_len = max_seq_len
    cos, sin = rope_tables(model.cfg.head_dim, max_seq_len, model.cfg.rope_theta)
    model.freqs_cos = cos.to(model.freqs_cos.device)
    model.freqs_sin = sin.to(model.freqs_sin.device)


def build_model(cfg: Mapping) -> Llama:
    """The model a run trains: ``init_from`` loaded (or ``cfg['model']`` at random init), then LoRA if enabled."""
    model_cfg = ModelConfig.from_dict(cfg["model"])
    if cfg.get("init_from"):
        from llamalit.checkpoints import load_checkpoint

        model = load_checkpoint(cfg["init_from"])
        set_max_seq_len(model, max(model.cfg.max_seq_len, model_cfg.max_seq_len))
    else:
        model = Llama(model_cfg)
    lora = cfg.get("lora") or {}
    if lora.get("enabled"):
        from llamalit.lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig.from_dict(lora))
    return model


class LlamaLitModule(L.LightningModule):
    """Trains ``build_model(cfg)`` with cross-entropy over counted positions (label != -100).

    ``cfg`` is the resolved run config as a plain dict (keys ``model``, ``optim``, ``lora``,
    ``init_from``, ``trainer.max_steps``, ``compile``); it is saved in every checkpoint.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.model = build_model(cfg)
        cfg = {**cfg, "model": self.model.cfg.to_dict()}  # the checkpoint describes the real shape
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.optim_cfg = OptimConfig.from_dict(cfg.get("optim") or {})
        self.max_steps = int(cfg["trainer"]["max_steps"])
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()
        self.train_acc = MeanMetric()
        # First step whose loss was not finite, kept on device so the check needs no sync per step.
        self.register_buffer("_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)
        self._forward = self.model.counted_logits
        if cfg.get("compile"):
            self._forward = torch.compile(self.model.counted_logits, dynamic=None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def _logits(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {"positions": batch["positions"]} if "positions" in batch else {}
        return self._forward(batch["input_ids"], batch["labels"], **extra)

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        logits, targets = self._logits(batch)
        loss = F.cross_entropy(logits.float(), targets)
        self._check_finite(loss)
        with torch.no_grad():
            self.train_acc.update((logits.argmax(-1) == targets).float().mean(), targets.numel())
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        logits, targets = self._logits(batch)
        n = targets.numel()
        self.val_loss.update(F.cross_entropy(logits.float(), targets), n)
        self.val_acc.update((logits.argmax(-1) == targets).float().mean(), n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss), "val/acc": self.val_acc.compute()},
                      prog_bar=True, sync_dist=False)
        self.val_loss.reset()
        self.val_acc.reset()

    def _check_finite(self, loss: torch.Tensor) -> None:
        step = self.global_step
        if loss.device.type == "cpu":
            if not torch.isfinite(loss):
                raise FloatingPointError(self._nan_message(step, float(loss)))
            return
        bad = ~torch.isfinite(loss.detach()) & (self._bad_step < 0)
        self._bad_step.copy_(torch.where(bad, torch.tensor(step, device=loss.device), self._bad_step))
        if step % max(1, self.trainer.log_every_n_steps) == 0 and int(self._bad_step) >= 0:
            raise FloatingPointError(self._nan_message(int(self._bad_step), float("nan")))

    @staticmethod
    def _nan_message(step: int, value: float) -> str:
        return (f"training loss became {value} at optimizer step {step}; stopping. Try a lower optim.lr, "
                "trainer.gradient_clip_val=1.0, precision 32, or check the data shards.")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm, on_step=True)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning does not keep RNG states; an exact resume needs them (dropout, sampling).
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states") or {}
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
