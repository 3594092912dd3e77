"""4-bit base weights for QLoRA (Dettmers et al. 2023): bitsandbytes ``Linear4bit``, NF4, double quantization.

Order for QLoRA: load the base (``load_hf(dir, dtype=torch.bfloat16)``), :func:`quantize_linears`,
then ``apply_lora``: the adapters wrap the 4-bit layers and stay in ``compute_dtype``. Needs
``pip install 'llamalit[qlora]'`` (bitsandbytes) and a CUDA GPU; weights are quantized as they
move to the GPU.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

QUANT_KINDS = ("nf4",)
_NEEDS = "pip install 'llamalit[qlora]' (bitsandbytes) on a machine with a CUDA GPU"


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or an error saying what is missing (the package or a CUDA GPU)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"quantize=nf4 (QLoRA) needs bitsandbytes and a CUDA GPU: {_NEEDS}; "
                          "or train without quantization (quantize=null)") from e
    if not torch.cuda.is_available():
        raise RuntimeError("quantize=nf4 (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit layers quantize and "
                           f"run on CUDA, and torch.cuda.is_available() is False here. Use {_NEEDS}; "
                           "or train without quantization (quantize=null)")
    return bnb


def quantize_linears(model: nn.Module, kind: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16,
                     skip: tuple[str, ...] = ("output",), device: str | torch.device | None = None) -> nn.Module:
    """Replace each plain ``nn.Linear`` (except names ending in ``skip``) by a 4-bit ``Linear4bit``, in place.

    NF4 with double quantization (``compress_statistics``), matmuls in ``compute_dtype``; the
    4-bit weights are frozen and live on ``device`` (default: the current CUDA device). Call it
    before ``apply_lora``. Returns ``model``.
    """
    if kind not in QUANT_KINDS:
        raise ValueError(f"quantize={kind!r}: choose one of {list(QUANT_KINDS)} (or null for none)")
    from llamalit.lora import lora_layers

    if lora_layers(model):
        raise ValueError("quantize_linears: the model already has LoRA adapters; quantize the base first, "
                         "then apply_lora")
    bnb = require_bitsandbytes()
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    targets = {name: m for name, m in model.named_modules()
               if type(m) is nn.Linear and name.rpartition(".")[2] not in skip}
    tied = [name for name, m in targets.items() if uses[id(m.weight)] > 1]
    if tied:
        raise ValueError(f"quantize_linears: {tied} share their weight with another module (the tied "
                         "embedding); keep them in skip")
    for name, lin in targets.items():
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type=kind,
                              device="meta")
        weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                   quant_type=kind, module=q)
        q._parameters["weight"] = weight.to(device)  # bitsandbytes quantizes here (sets q.quant_state too)
        if lin.bias is not None:
            q._parameters["bias"] = nn.Parameter(lin.bias.data.to(device, compute_dtype), requires_grad=False)
        q.train(lin.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The 4-bit layers of ``model`` by module name (``nn.Linear`` subclasses whose weight has a ``quant_type``)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and hasattr(m.weight, "quant_type")}
