"""LlamaLitModule: the LightningModule that trains a Llama (from scratch, from a checkpoint, or with LoRA)."""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import asdict

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torchmetrics import MeanMetric

from llamalit.model import build
from llamalit.model.llama import IGNORE_INDEX, Llama, ModelConfig, counted_positions
from llamalit.model.lora import LoraConfig
from llamalit.model.losses import LossOutput, resolve_loss_impl
from llamalit.training.optim import OptimConfig, build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def build_model(model_cfg: ModelConfig | Mapping, lora_cfg: LoraConfig | Mapping | None = None,
                init_from: str | None = None, *, attention: str = "auto", quantize: str | None = None,
                gradient_checkpointing: bool = False) -> Llama:
    """The model a run trains: ``init_from`` loaded (any checkpoint ``load_checkpoint`` reads) or ``model_cfg`` at
    random init, then LoRA (:func:`llamalit.model.build.build_model`), with a quantized base (``model.quantize``, read straight into bf16) and
    recomputed block activations (``model.gradient_checkpointing``) around it."""
    if quantize and not init_from:
        raise ValueError(f"model.quantize={quantize} needs a pretrained base: set init_from=DIR")
    base = None
    if init_from:
        base = _load_quantized(init_from, kind=quantize) if quantize else _load(init_from)
    model = build.build_model(model_cfg, lora_cfg, base, attention=attention)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()  # a loaded base comes back in eval mode, and LoRA layers copy it (dropout off)


def _load(ref: str) -> Llama:
    from llamalit.checkpoints import load_checkpoint  # training sits above the checkpoint readers

    return load_checkpoint(ref)


def _load_quantized(ref: str, kind: str) -> Llama:
    """A base read straight into bf16 (one copy: ~14 GB for 7B, not float32's ~27 GB), its linears in 4 bits."""
    from llamalit.checkpoints.merged import load_base
    from llamalit.model.quantize import quantize_linears

    model = load_base(ref).train()
    quantize_linears(model, kind=kind)
    return model


def _at_least_one(n: torch.Tensor | int) -> torch.Tensor | int:
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)  # a tensor stays on its device


def batch_loss(model: Llama, batch: Mapping, accuracy: bool = False, loss_impl: str = "auto") -> LossOutput:
    """``model``'s loss on a batch of ``input_ids``/``labels`` (+ ``positions``/``segments`` when packed,
    + ``counted`` when :func:`add_counted_positions` ran before the batch moved to the device).

    With ``loss_impl="compiled"`` every position goes through the head (labels masked, static shapes) and
    ``counted`` is not read: this is the function :func:`compile_step` traces as one graph.
    """
    keys = ("positions", "segments") if loss_impl == "compiled" else ("positions", "segments", "counted")
    extra = {k: batch[k] for k in keys if k in batch}
    return model.loss_and_correct(batch["input_ids"], batch["labels"], accuracy=accuracy, loss_impl=loss_impl,
                                  **extra)


def add_counted_positions(batch: dict, pin: bool) -> dict:
    """Add ``counted`` (:func:`~llamalit.model.llama.counted_positions`) to a host batch, pinned when it goes to a GPU:
    its length is then known on the host, so the step never waits for the device to count (no sync)."""
    if isinstance(batch, dict) and "labels" in batch and "counted" not in batch and batch["labels"].device.type == "cpu":
        counted = counted_positions(batch["labels"])
        batch["counted"] = counted.pin_memory() if pin else counted
    return batch


def resolve_compile(setting: bool | None, device: torch.device) -> bool:
    """``compile``: true/false as given; null (the default) compiles on CUDA, where it pays for itself."""
    return device.type == "cuda" if setting is None else bool(setting)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TRACEABLE_LOSSES = ("compiled",)  # the others gather counted positions (data-dependent shapes) or are kernels


def compile_step(mode: str | None = None, backend: str = "inductor"):
    """:func:`batch_loss` compiled as one graph: embedding, blocks, head and loss (``loss_impl="compiled"``),
    ``fullgraph=True`` so a graph break is an error rather than a silent slowdown, static shapes.

    ``mode`` (``compile_mode``): torch.compile's mode, default ``default``; ``reduce-overhead`` replays the
    step from CUDA graphs (for launch-bound small models; :func:`run_compiled_step` handles its buffers).
    """
    mode = mode or "default"
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if backend != "inductor":  # tests: another backend (e.g. aot_eager) takes no mode
        return torch.compile(batch_loss, fullgraph=True, dynamic=False, backend=backend)
    return torch.compile(batch_loss, fullgraph=True, dynamic=False, mode=mode)


def eval_loss_impl(setting: str, device_type: str) -> str:
    """The loss of validation and evaluation: eager (other shapes, no grad, eval mode: each would be another
    graph) over counted positions only. ``compiled`` (what ``auto`` resolves to for the compiled training step,
    and what train.py writes back into the run's settings) would run the head over every position eagerly
    and hold fp32 log-probabilities of all of them (~7 GB at 64 x 349 x 32000): it becomes what ``auto``
    resolves to uncompiled."""
    return resolve_loss_impl("auto" if setting == "compiled" else setting, device_type, False)


def check_cudagraph_accumulation(mode: str, device_type: str, accumulate: int) -> None:
    """Refuse ``compile_mode=reduce-overhead`` (CUDA graphs) on CUDA with gradient accumulation: the first
    micro-batch's gradients live in the graph's memory pool, which the next micro-batch's replay reuses, so
    they would be overwritten (or the replay fails) instead of accumulated."""
    if mode == "reduce-overhead" and device_type == "cuda" and int(accumulate) > 1:
        raise ValueError(f"compile_mode=reduce-overhead with trainer.accumulate_grad_batches={accumulate}: CUDA "
                         "graphs reuse the memory holding the accumulated gradients; set "
                         "trainer.accumulate_grad_batches=1 (a larger data.batch_size) or compile_mode=default")


def run_compiled_step(step, model: Llama, batch: Mapping, accuracy: bool, loss_impl: str,
                      cudagraphs: bool = False) -> LossOutput:
    """Call a :func:`compile_step` function on a batch (``counted`` dropped: the graph takes static shapes
    only). Under CUDA graphs the outputs live in the graph's buffers, which the next replay overwrites:
    they are cloned (autograd flows through the clone) and each call starts a new graph step."""
    batch = {k: v for k, v in batch.items() if k != "counted"}
    if not cudagraphs:
        return step(model, batch, accuracy, loss_impl)
    torch.compiler.cudagraph_mark_step_begin()
    out = step(model, batch, accuracy, loss_impl)
    return LossOutput(out.loss.clone(), None if out.correct is None else out.correct.clone())


def compile_blocks(model: Llama) -> None:
    """``torch.compile`` each transformer block in place (regional compilation): the fallback when the
    loss is not ``compiled`` (plain, chunked, liger, cce); the head and loss stay eager.
    """
    for layer in model.layers:
        layer.compile()


def enable_gradient_checkpointing(model: Llama) -> None:
    """Recompute each transformer block's activations in backward instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        block_forward = type(layer).forward.__get__(layer)
        layer.forward = functools.partial(checkpoint, block_forward, use_reentrant=False)


class LlamaLitModule(L.LightningModule):
    """Trains :func:`build_model`'s Llama with cross-entropy over counted positions (label != -100).

    Built by Hydra from the ``module:`` node of ``conf/train.yaml``, whose fields are the run's settings:
    ``model_cfg`` (``model``: the shape; ignored but for ``max_seq_len`` with ``init_from``), ``optim_cfg``
    (``optim``), ``lora_cfg`` (``lora``; None or ``enabled: false`` for none), ``init_from`` (a base
    checkpoint), ``compile`` (None: on CUDA), ``compile_mode``, ``loss_impl``, ``attention``, and
    ``quantize`` / ``gradient_checkpointing`` (``model.*``). They are saved in every checkpoint, the model
    shape as built. The learning-rate schedule spans ``trainer.estimated_stepping_batches``.
    """

    def __init__(self, model_cfg: ModelConfig | Mapping, optim_cfg: OptimConfig | Mapping | None = None,
                 lora_cfg: LoraConfig | Mapping | None = None, init_from: str | None = None, *,
                 compile: bool | None = None, compile_mode: str | None = None, loss_impl: str = "auto",
                 attention: str = "auto", quantize: str | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        self.model = build_model(model_cfg, lora_cfg, init_from, attention=attention, quantize=quantize,
                                 gradient_checkpointing=gradient_checkpointing)
        self.optim_cfg = optim_cfg if isinstance(optim_cfg, OptimConfig) else OptimConfig.from_dict(optim_cfg or {})
        self.lora_cfg = build.lora_config(lora_cfg)
        self.init_from = str(init_from) if init_from else None
        self.compile_setting, self.compile_mode = compile, compile_mode
        self.quantize = quantize
        self.loss_impl = str(loss_impl or "auto")  # llamalit.model.losses: auto | compiled | plain | chunked | liger | cce
        # plain values only (a checkpoint loads with weights_only=True); the model shape as built (a base's)
        self.save_hyperparameters({
            "model_cfg": self.model.cfg.to_dict(), "optim_cfg": asdict(self.optim_cfg),
            "lora_cfg": self.lora_cfg.to_dict() if self.lora_cfg else None, "init_from": self.init_from,
            "compile": compile, "compile_mode": compile_mode, "loss_impl": self.loss_impl, "attention": attention,
            "quantize": quantize, "gradient_checkpointing": bool(gradient_checkpointing)})
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()
        self.train_acc = MeanMetric()
        self._acc_window = -1  # the optimizer step train_acc holds micro-batches of
        # First step whose loss was not finite, kept on the device so the check needs no sync per step.
        # Not a buffer: DDP would overwrite each rank's value with rank 0's at every forward.
        self._bad_step: torch.Tensor | None = None
        self._pending_rng: dict | None = None  # RNG states of a restored checkpoint, applied at the next batch
        # A LoRA run on an init_from base checkpoints the adapters only: the frozen base comes from init_from.
        self._base_keys = frozen_base_keys(self)
        self.strict_loading = not self._base_keys  # on_load_checkpoint checks the keys itself
        self._compiled = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def on_fit_start(self) -> None:
        setting = self.compile_setting
        if setting is None and self.quantize:
            setting = False  # auto stays off for 4-bit bases: bitsandbytes layers under compile are unmeasured
        compiled = resolve_compile(setting, self.device)
        self._train_impl = resolve_loss_impl(self.loss_impl, self.device.type, compiled)
        self._eval_impl = eval_loss_impl(self.loss_impl, self.device.type)
        if not compiled or self._compiled:
            return
        if self._train_impl in TRACEABLE_LOSSES:
            mode = self.compile_mode or "default"
            if self._trainer is not None:
                check_cudagraph_accumulation(mode, self.device.type, self.trainer.accumulate_grad_batches)
        self._compiled = True
        if self._train_impl in TRACEABLE_LOSSES:
            self._step = compile_step(mode)
            self._step_cudagraphs = mode == "reduce-overhead" and self.device.type == "cuda"
            log.info("compiling the training step as one graph (loss_impl=%s, compile_mode=%s)", self._train_impl, mode)
        else:
            compile_blocks(self.model)
            log.info("compiling each transformer block (loss_impl=%s cannot be traced)", self._train_impl)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return add_counted_positions(batch, pin=self.device.type == "cuda")

    def _loss(self, batch: Mapping, accuracy: bool) -> tuple[LossOutput, torch.Tensor | int]:
        """The batch's loss (and correct count), and how many positions it counted: in training through the
        one compiled graph when compile is on, eagerly otherwise and in validation."""
        n = batch["counted"].numel() if "counted" in batch else (batch["labels"] != IGNORE_INDEX).sum()
        step = getattr(self, "_step", None)
        if self.training and step is not None:
            # always with the correct count: one graph, not a second compile at the first logging step (the
            # argmax is one more reduction over the logits the loss reads anyway)
            out = run_compiled_step(step, self.model, batch, True, self._train_impl,
                                    cudagraphs=getattr(self, "_step_cudagraphs", False))
            return out, n
        impl = getattr(self, "_train_impl" if self.training else "_eval_impl", None) or self.loss_impl
        return batch_loss(self.model, batch, accuracy, impl), n

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        logging = self._logging_step()  # an argmax over every counted logit is not free: only when it is logged
        out, n = self._loss(batch, accuracy=logging)
        self._check_finite(out.loss)
        # not prog_bar: Lightning converts progress-bar metrics to floats after every micro-batch (a GPU sync);
        # StepProgressBar shows train/loss instead, read once per refresh
        self.log("train/loss", out.loss, on_step=True)
        if logging:
            # the mean over this optimizer step's micro-batches, as a tensor: a Metric object logged on_step
            # is read from its forward() value, which update() never sets (train/acc was never written)
            if self._acc_window != self.global_step:
                self.train_acc.reset()
                self._acc_window = self.global_step
            self.train_acc.update(out.correct / _at_least_one(n), n)
            self.log("train/acc", self.train_acc.compute(), on_step=True, on_epoch=False)
        return out.loss

    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's metrics to the logger (every log_every_n_steps)."""
        connector = getattr(self._trainer, "_logger_connector", None) if self._trainer is not None else None
        return bool(getattr(connector, "should_update_logs", True))

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        out, n = self._loss(batch, accuracy=True)
        self.val_loss.update(out.loss, n)
        self.val_acc.update(out.correct / _at_least_one(n), n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss), "val/acc": self.val_acc.compute()},
                      prog_bar=True, sync_dist=False)
        self.val_loss.reset()
        self.val_acc.reset()

    # None: check at once on CPU, deferred to every log_every_n_steps (and the end) on accelerators.
    defer_finite_check: bool | None = None

    def _check_finite(self, loss: torch.Tensor) -> None:
        step = self.global_step
        defer = loss.device.type != "cpu" if self.defer_finite_check is None else self.defer_finite_check
        if not defer:
            if not torch.isfinite(loss):
                raise FloatingPointError(self._nan_message(step, float(loss)))
            return
        if self._bad_step is None or self._bad_step.device != loss.device:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._bad_step < 0)
        # full_like fills on the device: no host-to-device copy, so no sync; the check syncs every log interval.
        self._bad_step.copy_(torch.where(bad, torch.full_like(self._bad_step, step), self._bad_step))
        if step % max(1, self.trainer.log_every_n_steps) == 0:
            self._raise_if_bad()

    def _raise_if_bad(self) -> None:
        if self._bad_step is not None and int(self._bad_step) >= 0:
            raise FloatingPointError(self._nan_message(int(self._bad_step), float("nan")))

    def on_train_end(self) -> None:
        self._raise_if_bad()  # a non-finite loss after the last periodic check still fails the run

    @staticmethod
    def _nan_message(step: int, value: float) -> str:
        return (f"training loss became {value} at optimizer step {step}; stopping. Try a lower optim.lr, "
                "trainer.gradient_clip_val=1.0, precision 32, or check the data shards.")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._logging_step():
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            # 16-mixed with a fused AdamW: Lightning left the gradients scaled (the step unscales them); the
            # logged norm is the true one
            _unscale_once(self.trainer.precision_plugin, optimizer)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm, on_step=True)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip as Lightning does, also for a fused AdamW under mixed precision, which Lightning refuses.

        A fused optimizer unscales inside its step, so Lightning's AMP plugin does not unscale before clipping and
        will not clip at all. bf16-mixed has no scaler: the gradients are clipped as they are. 16-mixed
        unscales them here first; the scaler then hands the fused step no scale and its inf check.
        """
        plugin = self.trainer.precision_plugin
        if not (gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False)
                and isinstance(plugin, MixedPrecision)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        _unscale_once(plugin, optimizer)
        params = list(plugin.main_params(optimizer))
        if GradClipAlgorithmType(gradient_clip_algorithm or "norm") == GradClipAlgorithmType.VALUE:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, self.total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_steps(self) -> int:
        """Optimizer steps the run makes (what the schedule spans): ``trainer.max_steps``, or fewer when
        ``trainer.max_epochs`` ends the run first (accumulation and devices counted)."""
        steps = self.trainer.estimated_stepping_batches
        if math.isinf(steps):
            raise ValueError("the learning-rate schedule needs a length: set trainer.max_steps or trainer.max_epochs")
        return int(steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning does not keep RNG states; an exact resume needs them (dropout, sampling).
        checkpoint["rng_states"] = rng_states()
        if self._base_keys:
            sd = checkpoint["state_dict"]
            checkpoint["base_fingerprint"] = {k: float(sd[k].detach().double().sum()) for k in self._base_keys}
            checkpoint["state_dict"] = {k: v for k, v in sd.items() if k not in self._base_keys}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Applied at the first training batch, not now: between this restore and that batch Lightning
        # consumes random numbers that the uninterrupted run did not (a new DataLoader iterator draws a seed).
        self._pending_rng = checkpoint.get("rng_states")
        if self._base_keys:
            self._check_adapter_checkpoint(checkpoint)

    def _check_adapter_checkpoint(self, checkpoint: dict) -> None:
        """Strict loading for a checkpoint without the frozen base: the other keys match, the base is the same."""
        have = set(checkpoint["state_dict"]) - self._base_keys
        want = set(self.state_dict()) - self._base_keys
        if have != want:
            raise ValueError(f"checkpoint does not fit this LoRA run (same lora.rank/targets?): missing "
                             f"{sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]}")
        saved = checkpoint.get("base_fingerprint")
        if saved is None:  # a checkpoint with the full model: its base weights load as they are
            return
        sd = self.state_dict()
        changed = [k for k in sorted(self._base_keys)
                   if not math.isclose(saved.get(k, math.nan), float(sd[k].detach().double().sum()), rel_tol=1e-9)]
        if changed:
            raise ValueError(f"init_from={self.init_from} is not the base this checkpoint was trained "
                             f"on (weights differ: {changed[:3]}); point init_from at the original base model")

    def on_train_batch_start(self, batch: Mapping, batch_idx: int) -> None:
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None


def _unscale_once(plugin, optimizer: torch.optim.Optimizer) -> None:
    """Unscale ``optimizer``'s gradients by a mixed-precision plugin's GradScaler, unless done since its last
    update (unscale_ refuses a second call); no scaler (bf16-mixed, 32): nothing to do."""
    from torch.amp.grad_scaler import OptState

    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


def frozen_base_keys(module: LlamaLitModule) -> set[str]:
    """State-dict keys of a LoRA run's frozen parameters, when ``init_from`` can rebuild them (else empty)."""
    if not (module.lora_cfg and module.init_from):
        return set()
    trainable = {f"model.{n}" for n, p in module.model.named_parameters(remove_duplicate=False) if p.requires_grad}
    # every other entry, 4-bit bases' quantization state (absmax, quant_map, ...) included
    return {k for k in module.state_dict() if k.startswith("model.") and k not in trainable}


def rng_states() -> dict:
    """torch (CPU and CUDA), Python and NumPy global RNG states, as tensors and plain values."""
    np_state = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate()),
              "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping) -> None:
    """Restore what :func:`rng_states` captured (missing entries are left as they are)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        name, keys, *rest = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value
