"""Name, RoPE-layout and config mapping between llama2.c/llamalit and Hugging Face Llama.

llama2.c rotates adjacent channel pairs (2i, 2i+1) of each head; Hugging Face rotates the two
halves (i, i + head_dim/2). The same model in the two layouts differs by a per-head permutation
of the rows of wq and wk.
"""

from __future__ import annotations

import torch

from llamalit.model.llama import ModelConfig


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from adjacent-pair layout to half-split layout."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from half-split layout back to adjacent-pair layout."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(name: str) -> str:
    """The Hugging Face name of one of our parameter names (``layers.0.attention.wq.weight``...)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{idx}.{_LAYER_NAMES[rest]}"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face names and layout (wq/wk rows permuted).

    With tied embeddings ``lm_head.weight`` is omitted, as transformers saves tied models.
    """
    out = {}
    for name, t in sd.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if name.endswith("attention.wq.weight"):
            t = permute_to_hf(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_to_hf(t, cfg.n_kv_heads)
        out[hf_name(name)] = t
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> our names and layout. Unknown keys (rotary buffers) are skipped."""
    reverse = {}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            reverse[f"model.layers.{i}.{theirs}"] = f"layers.{i}.{ours}"
    reverse.update({v: k for k, v in _TOP_NAMES.items()})
    out = {}
    for name, t in sd.items():
        if name not in reverse:
            continue
        ours = reverse[name]
        if ours.endswith("attention.wq.weight"):
            t = permute_from_hf(t, cfg.n_heads)
        elif ours.endswith("attention.wk.weight"):
            t = permute_from_hf(t, cfg.n_kv_heads)
        out[ours] = t
    if "output.weight" not in out or cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def hf_config_dict(cfg: ModelConfig) -> dict:
    """A transformers ``LlamaConfig`` dict describing the same model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a Hugging Face ``config.json`` dict."""
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if k not in hf]
    if missing:
        raise ValueError(f"Hugging Face config.json lacks {missing}; is this a Llama config?")
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:  # newer transformers nest it in rope_parameters
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        vocab_size=hf["vocab_size"],
        hidden_dim=hf.get("intermediate_size"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
