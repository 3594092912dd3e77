"""Random Llamas whose every weight matters: the kernel and engine tests compare decode paths on them."""

from __future__ import annotations

import torch

from llamalit.model.llama import Llama, ModelConfig


def attentive_llama(seed: int = 0, **config) -> Llama:
    """``Llama(ModelConfig(**config))`` in eval mode, seeded, every weight drawn from N(0, 0.3) and the norm
    weights from N(1, 0.3): large enough that each token's keys, values and RoPE position change the logits
    (default initialisation, or scaled-up embeddings, can drown attention out)."""
    torch.manual_seed(seed)
    model = Llama(ModelConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.3)
    return model
