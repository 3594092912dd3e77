"""Callbacks: throughput/MFU, and text samples from fixed prompts at each validation."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

from llamalit.model.llama import IGNORE_INDEX, Llama


def peak_flops(device: torch.device, configured: float | None = None,
               dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak dense FLOP/s of the device for ``dtype`` matmuls (MFU's denominator), or None when unknown (CPU)
    and not configured. Lightning's :func:`get_available_flops` knows the GPUs, except the H200: it matches
    only device names with "SXM1"/"NVL1" (the driver says "NVIDIA H200") and lists its sparse peak, so an
    H200 gets the H100 SXM's dense figures from the same table (the same tensor cores)."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    if "h200" not in torch.cuda.get_device_name(device).lower():
        return get_available_flops(device, dtype)
    from lightning.fabric.utilities.throughput import _CUDA_FLOPS

    if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
        dtype = "tfloat32"  # as get_available_flops does on Ampere and later
    return _CUDA_FLOPS.get("h100 sxm", {}).get(dtype)


def compute_dtype(precision: str | int | None) -> torch.dtype:
    """The matmul dtype of a Trainer ``precision`` setting (``bf16-mixed`` -> bfloat16, ...)."""
    text = str(precision)
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float64 if text.startswith("64") else torch.float32


class SpeedMonitor(L.Callback):
    """Logs tokens/s (input tokens, all ranks), useful tokens/s (those that carry loss) and MFU every
    ``log_every`` optimizer steps.

    Wall time over a window of steps needs no GPU sync: queued kernels finish within the window. The
    useful-token count stays on the device and is read once per window. (Lightning's ``ThroughputMonitor``
    synchronizes CUDA after every micro-batch and counts every token alike; its peak-FLOPs table,
    :func:`peak_flops`, is what MFU is measured against here.)
    """

    def __init__(self, log_every: int = 10, peak_flops_per_s: float | None = None, warmup_steps: int = 3):
        self.log_every = log_every
        # steady state: the first ``warmup_steps`` optimizer steps of each fit (compiling, allocator and cache
        # warm-up; again after a resume) are left out of steady_tokens_per_s
        self.warmup_steps = warmup_steps
        self.steady_tokens = 0
        self.steady_time_s = 0.0
        self._steady_from = 0
        self.configured_peak = peak_flops_per_s
        self.tokens_seen = 0
        self.useful_tokens_seen = 0  # labels != -100: prompts and padding excluded (read at each log)
        self._useful: torch.Tensor | None = None  # this window's count on this rank, on the device
        self._world = 1
        self.train_time_s = 0.0  # wall time of training batches (validation excluded), for the summary
        self._mark: float | None = None  # end of the last batch counted in train_time_s
        self._window_tokens = 0
        self._window_start: float | None = None
        self._last_step = -1
        self._pause = 0.0
        self.tokens_per_s: float | None = None
        self.mfu: float | None = None
        self._peak: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # once per fit: the device and precision do not change within it (and an unknown GPU warns once)
        self._peak = peak_flops(pl_module.device, self.configured_peak, compute_dtype(trainer.precision))
        self._steady_from = trainer.global_step + self.warmup_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._window_start is None:
            self._window_start = self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = batch["input_ids"].numel() * trainer.world_size
        self.tokens_seen += n
        self._window_tokens += n
        self._world = trainer.world_size
        # host-side count when the module added one (no device op at all), else counted on the device
        counted = batch["counted"].numel() if "counted" in batch else (batch["labels"] != IGNORE_INDEX).sum()
        self._useful = counted if self._useful is None else self._useful + counted
        now = time.perf_counter()
        self.train_time_s += now - self._mark
        if trainer.global_step > self._steady_from:  # this micro-batch belongs to a step after the warm-up
            self.steady_tokens += n
            self.steady_time_s += now - self._mark
        self._mark = now
        step = trainer.global_step
        if step == self._last_step or step % self.log_every:
            return
        self._last_step = step
        elapsed = now - self._window_start
        self.tokens_per_s = self._window_tokens / max(elapsed, 1e-9)
        useful = self._take_useful()
        metrics = {"perf/tokens_per_s": self.tokens_per_s, "perf/tokens_seen": float(self.tokens_seen),
                   "perf/useful_tokens_per_s": useful / max(elapsed, 1e-9)}
        model: Llama = pl_module.model
        peak = self._peak
        if peak:
            seq = batch["input_ids"].shape[1]
            flops = model.flops_per_token(seq) * self.tokens_per_s / trainer.world_size
            self.mfu = flops / peak
            metrics["perf/mfu"] = self.mfu
        pl_module.log_dict(metrics, on_step=True, rank_zero_only=True)
        self._window_tokens = 0
        self._window_start = now

    def _take_useful(self) -> int:
        """This window's useful tokens on all ranks (one device sync), added to ``useful_tokens_seen``."""
        n = int(self._useful) * self._world if self._useful is not None else 0
        self._useful = None
        self.useful_tokens_seen += n
        return n

    def on_train_end(self, trainer, pl_module) -> None:
        self._take_useful()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._pause = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        paused = time.perf_counter() - self._pause  # validation time does not count as training time
        if self._window_start is not None:
            self._window_start += paused
            self._mark += paused

    def state_dict(self) -> dict[str, Any]:
        self._take_useful()  # a checkpoint mid-window: fold the window in first
        return {"tokens_seen": self.tokens_seen, "useful_tokens_seen": self.useful_tokens_seen,
                "train_time_s": self.train_time_s, "steady_tokens": self.steady_tokens,
                "steady_time_s": self.steady_time_s}

    @property
    def steady_tokens_per_s(self) -> float | None:
        """Input tokens/s after each fit's first ``warmup_steps`` steps; None when no step came after them."""
        return self.steady_tokens / self.steady_time_s if self.steady_time_s > 0 else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = state_dict.get("tokens_seen", 0)
        self.useful_tokens_seen = state_dict.get("useful_tokens_seen", 0)
        self.train_time_s = state_dict.get("train_time_s", 0.0)
        self.steady_tokens = state_dict.get("steady_tokens", 0)
        self.steady_time_s = state_dict.get("steady_time_s", 0.0)


class StepProgressBar(TQDMProgressBar):
    """The TQDM bar, refreshed every ``refresh_steps`` optimizer steps rather than every micro-batch.

    Each refresh reads the logged loss back from the device, a host sync that drains the GPU's queue of
    kernels: with ``accumulate_grad_batches=8`` a per-batch bar would do that 8 times an optimizer step.
    ``train/loss`` is logged without ``prog_bar`` (Lightning would read a progress-bar metric back after every
    micro-batch, whatever the refresh rate) and shown here from the callback metrics, at refreshes only.
    """

    def __init__(self, refresh_steps: int = 10, **kwargs: Any):
        super().__init__(refresh_rate=refresh_steps, **kwargs)
        self.refresh_steps = refresh_steps

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._refresh_rate = max(1, self.refresh_steps * trainer.accumulate_grad_batches)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if done and self.train_progress_bar is not None:
            # resumed mid-epoch: Lightning skips on_train_epoch_start, where the bar gets its total (no total,
            # no ETA); the bar starts at the batches already done, so the ETA counts only the ones to come
            total = trainer.num_training_batches
            if trainer.max_steps is not None and trainer.max_steps > 0:
                remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
                total = min(total, done + remaining)
            bar = self.train_progress_bar
            bar.reset(total=convert_inf(total))
            bar.initial = bar.n = done
            bar.set_description(f"Epoch {trainer.current_epoch}")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict]:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss") if trainer.training else None
        if isinstance(loss, torch.Tensor):
            items["train/loss"] = round(float(loss), 4)
        return items


class SampleCallback(L.Callback):
    """Generates from fixed prompts after each validation, eagerly (a compiled run compiles nothing for it);
    prints them and logs a wandb table.

    For instruct data a prompt is encoded without BOS and followed by BOS, as in the shards.
    """

    def __init__(self, prompts: Sequence[str] = (), max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0, every_n_val: int = 1):
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.every_n_val = every_n_val
        self._n_val = 0
        self.last_samples: list[tuple[str, str]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit":  # the best checkpoint validated after training: its samples were printed
            return
        self._n_val += 1
        if not self.prompts or trainer.sanity_checking or (self._n_val - 1) % self.every_n_val:
            return
        if trainer.global_rank != 0 or type(trainer.strategy).__name__ == "FSDPStrategy":
            return  # FSDP: rank 0 alone cannot run a sharded model (the exported model is whole)
        dm = trainer.datamodule
        if dm is None or not getattr(dm, "tokenizer_path", None):
            return
        # eagerly: compiled blocks would compile again for inference mode and for every new cache length
        with torch.compiler.set_stance("force_eager"):
            self.last_samples = sample_texts(pl_module.model, dm.tokenizer_path, self.prompts,
                                             instruct=dm.manifest.get("kind") == "instruct",
                                             max_new_tokens=self.max_new_tokens,
                                             temperature=self.temperature, top_k=self.top_k, seed=self.seed)
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_text"):
            logger.log_text(key="samples", columns=["step", "prompt", "sample"],
                            data=[[trainer.global_step, p, s] for p, s in self.last_samples])
        for p, s in self.last_samples:
            print(f"\n[sample, step {trainer.global_step}] {p}\n  -> {s}", flush=True)


def sample_texts(model: Llama, tokenizer_path: str, prompts: Sequence[str], instruct: bool,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, generated text) pairs; generation stops at EOS or the model's context."""
    from llamalit.data.tokenizer import Tokenizer
    from llamalit.inference.generate import generate

    tok = Tokenizer(tokenizer_path)
    out = []
    for prompt in prompts:
        ids = tok.encode(prompt, bos=False, eos=False) + [tok.bos_id] if instruct else tok.encode(prompt, bos=True, eos=False)
        budget = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
        if budget < 1:
            continue
        new = generate(model, ids, budget, temperature=temperature, top_k=top_k, eos_id=tok.eos_id, seed=seed)
        out.append((prompt, tok.decode(new)))
    return out
