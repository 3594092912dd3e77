"""Tiny random transformers Llamas for the import/export tests (norm weights off 1, so mixing them up shows)."""

from __future__ import annotations

import torch


def random_hf_llama(seed: int = 0, lm_head_std: float | None = None, **config):
    """``LlamaForCausalLM(LlamaConfig(**config))`` in eval mode, seeded; RMSNorm weights drawn from U(0.5, 1.5)
    and, with ``lm_head_std``, the output head from N(0, lm_head_std)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "lm_head" in name and lm_head_std is not None:
                p.normal_(0, lm_head_std)
    return model
