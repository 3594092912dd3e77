"""``build_model``: the one way to get a Llama with (or without) LoRA adapters.

A model of a config at random init, or a loaded checkpoint (a path, URL or Hub id, or a model already
in memory), then LoRA layers when the LoRA settings say so. Training, resuming, exporting and every
checkpoint reader that restores adapters build their model here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from llamalit.lora import LoraConfig, apply_lora
from llamalit.masks import check_backend
from llamalit.model import Llama, ModelConfig, rope_tables


def model_config(cfg: ModelConfig | Mapping) -> ModelConfig:
    """``cfg`` as a ``ModelConfig`` (a mapping's keys that are not model shape, e.g. ``quantize``, dropped)."""
    return cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)


def lora_config(cfg: LoraConfig | Mapping | None) -> LoraConfig | None:
    """The adapter settings to apply, or None: no settings, an empty mapping, or ``enabled: false``.

    A mapping without ``enabled`` (an adapter's saved settings) means LoRA.
    """
    if cfg is None or isinstance(cfg, LoraConfig):
        return cfg
    if not cfg or not cfg.get("enabled", True):
        return None
    return LoraConfig.from_dict(cfg)


def set_max_seq_len(model: Llama, max_seq_len: int) -> None:
    """Grow (or shrink) the RoPE tables; RoPE is not learned, so a longer context needs only new tables."""
    if max_seq_len == model.cfg.max_seq_len:
        return
    model.cfg.max_seq_len = max_seq_len
    cos, sin = rope_tables(model.cfg.head_dim, max_seq_len, model.cfg.rope_theta)
    model.freqs_cos = cos.to(model.freqs_cos.device)
    model.freqs_sin = sin.to(model.freqs_sin.device)


def build_model(model_cfg: ModelConfig | Mapping | None, lora_cfg: LoraConfig | Mapping | None = None,
                init_from: str | Path | Llama | None = None,
                load: Callable[[str | Path], Llama] | None = None, attention: str | None = None) -> Llama:
    """A Llama of ``model_cfg`` (random init), or ``init_from`` loaded; then LoRA per ``lora_cfg``.

    ``init_from``: a checkpoint (path, URL or Hub id, read by ``load``, default
    :func:`llamalit.checkpoints.load_checkpoint`) or a model in memory (used, and wrapped, in place).
    With ``init_from`` the checkpoint fixes the shape; ``model_cfg`` (may be None) only lengthens the
    context to its ``max_seq_len``. ``lora_cfg``: a ``LoraConfig``, a mapping (a run's ``lora``
    section, off when ``enabled`` is false), or None for no adapters. ``attention``: how packed rows are
    masked (``auto``, ``flex`` or ``dense``, :class:`~llamalit.model.Llama`'s argument); None keeps a
    loaded model's and gives a new one ``auto``.
    """
    if init_from is None:
        if model_cfg is None:
            raise ValueError("build_model: give model_cfg (the shape of a new model) or init_from (a checkpoint)")
        model = Llama(model_config(model_cfg), attention=attention or "auto")
    else:
        model = init_from if isinstance(init_from, Llama) else _load(init_from, load)
        want = model_cfg.max_seq_len if isinstance(model_cfg, ModelConfig) else (model_cfg or {}).get("max_seq_len")
        if want:
            set_max_seq_len(model, max(model.cfg.max_seq_len, int(want)))
        if attention is not None:  # the loader built it; the backend is checked against the loaded heads
            model.attention_backend = check_backend(attention, model.cfg.head_dim)
    lora = lora_config(lora_cfg)
    if lora is not None:
        apply_lora(model, lora)
    return model


def _load(ref: str | Path, load: Callable[[str | Path], Llama] | None) -> Llama:
    if load is None:
        # checkpoints readers build their models here (with init_from a model), so the loader is imported late
        from llamalit.checkpoints import load_checkpoint as load
    return load(ref)
