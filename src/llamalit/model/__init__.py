"""The model: the llama2.c Llama (``llama.py``) and what changes how it trains: LoRA, 4-bit base layers,
packed-row masks, the output head's loss, and ``build_model`` (a model with or without adapters).

``from llamalit.model import ModelConfig, Llama`` is the public path (docs/CONTRACT.md).
"""

from llamalit.model.llama import (
    Attention,
    FeedForward,
    KVCache,
    Llama,
    ModelConfig,
    RMSNorm,
    TransformerBlock,
    apply_rope,
    counted_positions,
    rope_tables,
)

__all__ = [
    "Attention", "FeedForward", "KVCache", "Llama", "ModelConfig", "RMSNorm", "TransformerBlock",
    "apply_rope", "counted_positions", "rope_tables",
]
