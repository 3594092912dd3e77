"""AdamW with decay groups, and the warmup + cosine (or constant/linear) learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn


@dataclass
class OptimConfig:
    """Optimizer and schedule settings; defaults follow llama2.c's train.py."""

    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 1000
    warmup_ratio: float | None = None  # when set, overrides warmup_steps as a fraction of max_steps
    schedule: str = "cosine"  # cosine | linear | constant
    fused: bool | None = None  # None: fused on CUDA
    paged: bool = False  # bitsandbytes' PagedAdamW (QLoRA)

    @classmethod
    def from_dict(cls, d: Mapping) -> OptimConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"optim: unknown keys {sorted(unknown)}; known keys are {sorted(names)}")
        return cls(**dict(d))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (dim >= 2: matmuls, embeddings) and not (norms, biases)."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: is every parameter frozen?")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; fused when every parameter is on CUDA (unless told)."""
    groups = param_groups(model, cfg.weight_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    fused = on_cuda if cfg.fused is None else cfg.fused
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.paged:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("optim.paged=true needs bitsandbytes: pip install 'llamalit[qlora]'") from e
        return bnb.optim.PagedAdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the decay schedule."""
    warmup = cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        warmup = math.ceil(cfg.warmup_ratio * max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if step >= max_steps:
        return cfg.min_lr
    progress = (step - warmup) / max(1, max_steps - warmup)
    if cfg.schedule == "linear":
        coeff = 1.0 - progress
    elif cfg.schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}: choose cosine, linear or constant")
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR meant to be stepped once per optimizer step (so accumulation does not skew it)."""
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"optim.schedule={cfg.schedule!r}: choose cosine, linear or constant")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.lr)
