"""LoRA (Hu et al. 2021): low-rank adapters on a Llama's linear layers, merge, and adapter files.

``apply_lora`` swaps each targeted ``nn.Linear`` for a :class:`LoRALinear` that keeps the base
``weight`` under its own name, so ``layers.0.attention.wq.weight`` is still that key and a base
checkpoint loads into the wrapped model with only the adapter keys (``...wq.lora_A``,
``...wq.lora_B``) missing. Adapter files: PEFT's (``adapter_model.safetensors`` + ``adapter_config.json``,
which ``peft.PeftModel.from_pretrained`` loads onto the base's Hugging Face export) and ours,
``llamalit_adapter.json`` (the base, the LoraConfig, the model shape, the base's fingerprint).

A 4-bit base (bitsandbytes ``Linear4bit``, from ``llamalit.model.quantize``) is wrapped by
:class:`QLoRALinear` instead: it keeps the base layer as a child (``wq.base``) and calls it,
adapters in the base's ``compute_dtype`` (bf16). Adapter keys are the same as on a plain base,
so a QLoRA adapter loads into the bf16 model (that is how it is merged: ``checkpoints.merged``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
# Linear layers of our Llama, by the last component of their module name.
LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


@dataclass(frozen=True)
class LoraConfig:
    """Adapter settings: rank r, scaling alpha / r, dropout on the LoRA path, targeted module names."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, str):  # "wq,wk" from a command line
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        object.__setattr__(self, "targets", tuple(str(t) for t in targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank!r}: must be an int >= 1 "
                             "(lora=none has rank 0: check lora.enabled before building a LoraConfig)")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout={self.dropout!r}: must be in [0, 1)")
        if not self.targets:
            raise ValueError(f"LoraConfig.targets is empty; name modules among {list(LINEAR_NAMES)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d) -> LoraConfig:
        """Build from a dict or DictConfig, ignoring keys that are not fields (``enabled``, ...)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in names})

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


class LoRALinear(nn.Module):
    """``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T``; W (and b) are the frozen base tensors.

    ``weight_tied`` marks a base weight shared with another module (the tied output head); its
    LoRA path is still applied in forward, but it is never merged in place (see :func:`merge_lora`).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 weight_tied: bool = False):
        super().__init__()
        if is_quantized(base):
            raise TypeError(f"LoRALinear: the base {type(base).__name__} is a 4-bit layer; wrap it with "
                            "QLoRALinear (apply_lora picks it)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: ties and state-dict names survive
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init; B = 0: a no-op at start
        self.lora_dropout = nn.Dropout(dropout)
        self.weight_tied = weight_tied
        self.merged = False
        self.train(base.training)  # a wrapper made after model.eval() must not drop out

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update (out, in): B @ A * alpha / r."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return out + lora * self.scaling

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold the update into the base weight in place (fast inference); :meth:`unmerge_` undoes it."""
        if self.weight_tied:
            raise ValueError("this layer's weight is tied to another module (the embedding); merging in "
                             "place would change that module too: use merge_lora(model), which unties it")
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.lora_dropout.p}, merged={self.merged}")


def is_quantized(layer: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear (``Linear4bit`` or a subclass; its weight has a ``quant_state``)."""
    return hasattr(getattr(layer, "weight", None), "quant_state") or \
        any(c.__name__ == "Linear4bit" for c in type(layer).__mro__)


class QLoRALinear(LoRALinear):
    """LoRA on a frozen 4-bit base: ``y = base(x) + (alpha / r) * dropout(x) A^T B^T`` (QLoRA).

    The base layer stays a child (``<name>.base``: its weight and bitsandbytes quant-state keys
    live there) and is called as is; A and B are created in ``base.compute_dtype`` (bf16) on the
    base's device; the LoRA path runs in their dtype and is added in the output's dtype. It cannot
    be merged in place (the base is 4-bit): merge into a bf16 reload of the base instead
    (``llamalit.checkpoints.merged.export_merged_hf``).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 weight_tied: bool = False):
        nn.Module.__init__(self)
        if not is_quantized(base):
            raise TypeError(f"QLoRALinear wraps a 4-bit layer; got {type(base).__name__}: use LoRALinear")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dtype = getattr(base, "compute_dtype", None) or torch.bfloat16
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.weight_tied = weight_tied
        self.merged = False
        self.train(base.training)

    @property
    def weight(self) -> torch.Tensor:
        """The base's packed 4-bit weight (bitsandbytes ``Params4bit``)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        lora = F.linear(F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return out + (lora * self.scaling).to(out.dtype)

    def _refuse_merge(self) -> None:
        raise ValueError(_MERGE_4BIT)

    def merge_(self) -> None:
        self._refuse_merge()

    def unmerge_(self) -> None:
        self._refuse_merge()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base=4-bit"


_MERGE_4BIT = ("cannot merge LoRA into a 4-bit (bitsandbytes NF4) base: folding B@A into quantized weights would "
               "re-quantize them and lose the update. Merge into a bf16 reload of the base instead: "
               "llamalit.checkpoints.merged.export_merged_hf(base_dir, lora_state_dict(model), lora_cfg, out_dir) "
               "(or save_adapter(...) and load it onto the unquantized base)")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap each ``nn.Linear`` whose name ends in one of ``cfg.targets``; freeze everything else.

    A 4-bit base layer (``llamalit.model.quantize``) gets a :class:`QLoRALinear`, a plain one a
    :class:`LoRALinear`. In place; returns ``model``. Load base weights before calling this (or load them after with
    ``strict=False``: only the adapter keys are then missing).
    """
    if lora_layers(model):
        raise ValueError("model already has LoRA adapters; merge_lora(model) first or build a fresh model")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    available = sorted({name.rpartition(".")[2] for name in linears})
    unmatched = [t for t in cfg.targets if t not in available]
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched}: no module named so in model; "
                         f"available linears: {available}")
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in linears.items():
        if name.rpartition(".")[2] in cfg.targets:
            cls = QLoRALinear if is_quantized(base) else LoRALinear
            wrapped = cls(base, cfg.rank, cfg.alpha, cfg.dropout, weight_tied=uses[id(base.weight)] > 1)
            _set_submodule(model, name, wrapped)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold B @ A * alpha / r into each base weight and put back a plain ``nn.Linear`` (in place).

    A tied output head gets its own merged weight: the embedding is left unchanged and
    ``model.cfg.tie_embeddings`` becomes False, so the merged model saves and loads as an untied one.
    The result is a plain model: every parameter trainable again, as :func:`apply_lora` froze them.
    """
    layers = lora_layers(model)
    quantized = [name for name, layer in layers.items() if isinstance(layer, QLoRALinear)]
    if quantized:  # checked before anything changes
        raise ValueError(f"merge_lora: {quantized[0]} (and {len(quantized) - 1} more): {_MERGE_4BIT}")
    untied = False
    for name, layer in layers.items():
        if layer.merged:  # already folded in place
            weight = layer.weight
        else:  # a new tensor: the base tensor may be shared (tied embedding) and must not change
            weight = nn.Parameter(layer.weight + layer.delta_weight(), requires_grad=False)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        plain.weight, plain.bias = weight, layer.bias
        untied = untied or layer.weight_tied
        _set_submodule(model, name, plain)
    cfg = getattr(model, "cfg", None)
    if untied and getattr(cfg, "tie_embeddings", False):
        model.cfg = replace(cfg, tie_embeddings=False)
    if layers:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``<module>.lora_A`` / ``<module>.lora_B``) of ``model``."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(ADAPTER_SUFFIXES)}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model already wrapped by :func:`apply_lora`; strict about keys and shapes."""
    params = dict(model.named_parameters())
    expected = {k for k in params if k.endswith(ADAPTER_SUFFIXES)}
    if not expected:
        raise ValueError("model has no LoRA adapters: call apply_lora(model, cfg) before loading them")
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    bad_shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(params[k].shape)}"
                  for k in sorted(expected & sd.keys()) if sd[k].shape != params[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(
            "adapter does not fit this model (were rank/targets the same as when it was saved?): "
            f"missing {missing}, unexpected {unexpected}, shape mismatches {bad_shapes}"
        )
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("model has adapters merged in place; unmerge_() them before loading new ones")
    for k in expected:
        params[k].copy_(sd[k])


def adapter_num_params(model_cfg, lora_cfg: LoraConfig) -> int:
    """Adapter parameters that ``apply_lora`` adds to a Llama of shape ``model_cfg`` (no model built)."""
    c = model_cfg
    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"wq": (c.dim, q_out), "wk": (c.dim, kv_out), "wv": (c.dim, kv_out), "wo": (q_out, c.dim),
              "w1": (c.dim, c.hidden_dim), "w2": (c.hidden_dim, c.dim), "w3": (c.dim, c.hidden_dim)}
    unknown = [t for t in lora_cfg.targets if t not in LINEAR_NAMES]
    if unknown:
        raise ValueError(f"LoRA targets {unknown}: not a Llama linear; choose among {list(LINEAR_NAMES)}")
    per_layer = sum(sum(shapes[t]) for t in lora_cfg.targets if t in shapes) * c.n_layers
    head = c.dim + c.vocab_size if "output" in lora_cfg.targets else 0
    return lora_cfg.rank * (per_layer + head)
