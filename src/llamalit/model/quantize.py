"""4-bit base weights for QLoRA (Dettmers et al. 2023): bitsandbytes ``Linear4bit``, NF4, double quantization.

Order for QLoRA: load the base (``load_hf(dir, dtype=torch.bfloat16)``), :func:`quantize_linears`,
then ``apply_lora``: the adapters wrap the 4-bit layers and stay in ``compute_dtype``. Needs
``pip install 'llamalit[qlora]'`` (bitsandbytes). Weights are quantized as they move to the
device: a CUDA GPU when there is one, else the CPU (bitsandbytes 0.50.2 quantizes and runs
4-bit layers on the CPU, slowly: good for tests, not for training a 7B model).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

QUANT_KINDS = ("nf4",)
CPU_BLOCK = 64  # on the CPU, in_features must be a multiple of this (see quantize_linears)
_NEEDS = "pip install 'llamalit[qlora]' (bitsandbytes)"


def default_device() -> torch.device:
    """Where 4-bit weights go unless told: the current CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _probe_4bit(bnb, device: torch.device, quant_type: str = "nf4") -> None:
    """Quantize and run a 64x64 ``Linear4bit`` on ``device``; raises whatever bitsandbytes raises."""
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type=quant_type,
                              device="meta")
    weight = bnb.nn.Params4bit(torch.ones(64, 64), requires_grad=False, quant_type=quant_type, module=layer)
    layer._parameters["weight"] = weight.to(device)
    with torch.no_grad():
        layer(torch.ones(1, 64, device=device, dtype=torch.bfloat16))


def require_bitsandbytes(device: str | torch.device | None = None):
    """The ``bitsandbytes`` module once it has shown it can do 4-bit on ``device`` (default :func:`default_device`).

    Errors say what is missing: the package, a CUDA GPU (``device="cuda"`` without one), or a
    bitsandbytes version that can quantize on the CPU.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"model.quantize=nf4 (QLoRA) needs bitsandbytes: {_NEEDS}; "
                          "or train without quantization (model.quantize=null)") from e
    device = torch.device(device) if device is not None else default_device()
    version = getattr(bnb, "__version__", "?")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.quantize=nf4 on device {device}: torch.cuda.is_available() is False here. Use a "
                           "machine with a CUDA GPU, or device='cpu' (bitsandbytes 0.50.2 quantizes on the CPU), "
                           "or train without quantization (model.quantize=null)")
    try:
        _probe_4bit(bnb, device)
    except Exception as e:  # old versions raise RuntimeError, NotImplementedError, AssertionError, ...
        where = "the CPU" if device.type == "cpu" else str(device)
        raise RuntimeError(
            f"model.quantize=nf4: bitsandbytes {version} cannot quantize/run 4-bit layers on {where} "
            f"({type(e).__name__}: {e}). Upgrade it (pip install -U 'bitsandbytes>=0.50'; 0.50.2 runs 4-bit on "
            "the CPU) or use a machine with a CUDA GPU; or train without quantization (model.quantize=null)") from e
    return bnb


def quantize_linears(model: nn.Module, kind: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16,
                     skip: tuple[str, ...] = ("output",), device: str | torch.device | None = None) -> nn.Module:
    """Replace each plain ``nn.Linear`` (except names ending in ``skip``) by a 4-bit ``Linear4bit``, in place.

    NF4 with double quantization (``compress_statistics``), matmuls in ``compute_dtype``; the
    4-bit weights are frozen and live on ``device`` (default: the current CUDA device, else the
    CPU); the bias (if any) is kept in ``compute_dtype``. Call it before ``apply_lora``. Returns ``model``.
    """
    if kind not in QUANT_KINDS:
        raise ValueError(f"model.quantize={kind!r}: choose one of {list(QUANT_KINDS)} (or null for none)")
    from llamalit.model.lora import lora_layers

    if lora_layers(model):
        raise ValueError("quantize_linears: the model already has LoRA adapters; quantize the base first, "
                         "then apply_lora")
    device = torch.device(device) if device is not None else default_device()
    bnb = require_bitsandbytes(device)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    targets = {name: m for name, m in model.named_modules()
               if type(m) is nn.Linear and name.rpartition(".")[2] not in skip}
    tied = [name for name, m in targets.items() if uses[id(m.weight)] > 1]
    if tied:
        raise ValueError(f"quantize_linears: {tied} share their weight with another module (the tied "
                         "embedding); keep them in skip")
    odd = [f"{name} (in_features={m.in_features})" for name, m in targets.items() if m.in_features % CPU_BLOCK]
    if device.type == "cpu" and odd:
        raise ValueError(f"quantize_linears on the CPU: {odd[:3]} have in_features not a multiple of {CPU_BLOCK}; "
                         "bitsandbytes' CPU 4-bit kernels give wrong results for such shapes (seen with 0.50.2: "
                         "in_features 32, 96, 160). Real Llama shapes are multiples of 64; quantize on a CUDA GPU "
                         "or use model.quantize=null")
    for name, lin in targets.items():
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type=kind,
                              device="meta")
        weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                   quant_type=kind, module=q)
        q._parameters["weight"] = weight.to(device)  # bitsandbytes quantizes here (sets q.quant_state too)
        if lin.bias is not None:
            q._parameters["bias"] = nn.Parameter(lin.bias.data.to(device, compute_dtype), requires_grad=False)
        # bitsandbytes' CPU inference fast path repacks the weight in place at the first eval forward without
        # grad; it fails for in_features < 64 and its kernel has no backward (later training gets wrong
        # gradients through it, with only a warning). Off: CPU eval uses the same path as training.
        q.support_avx512bf16_for_cpu = False
        q.train(lin.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The 4-bit layers of ``model`` by module name (``nn.Linear`` subclasses whose weight has a ``quant_type``)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and hasattr(m.weight, "quant_type")}
