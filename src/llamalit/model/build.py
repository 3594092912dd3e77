"""``build_model``: the one way to get a Llama with (or without) LoRA adapters.

A model of a config at random init, or a model already in memory (a checkpoint its reader loaded), then
LoRA layers when the LoRA settings say so. Training, resuming, exporting and every checkpoint reader that
restores adapters build their model here. It never reads files: the checkpoint readers sit above the model
and call it, so the dependency runs one way (``training.module.build_model`` loads a path, then builds).
"""

from __future__ import annotations

from collections.abc import Mapping

from llamalit.model.llama import Llama, ModelConfig, rope_tables
from llamalit.model.lora import LoraConfig, apply_lora
from llamalit.model.masks import check_backend


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
                init_from: Llama | None = None, attention: str | None = None) -> Llama:
    """A Llama of ``model_cfg`` (random init), or ``init_from``; then LoRA per ``lora_cfg``.

    ``init_from``: a model in memory (a loaded checkpoint; used, and wrapped, in place).
    With ``init_from`` the loaded model fixes the shape; ``model_cfg`` (may be None) only lengthens the
    context to its ``max_seq_len``. ``lora_cfg``: a ``LoraConfig``, a mapping (a run's ``lora``
    section, off when ``enabled`` is false), or None for no adapters. ``attention``: how packed rows are
    masked (``auto``, ``flex`` or ``dense``, :class:`~llamalit.model.llama.Llama`'s argument); None keeps a
    loaded model's and gives a new one ``auto``.
    """
    if init_from is None:
        if model_cfg is None:
            raise ValueError("build_model: give model_cfg (the shape of a new model) or init_from (a checkpoint)")
        model = Llama(model_config(model_cfg), attention=attention or "auto")
    else:
        if not isinstance(init_from, Llama):
            raise TypeError(f"build_model: init_from must be a loaded Llama, not {type(init_from).__name__}; "
                            "read a checkpoint with llamalit.checkpoints.load_checkpoint first")
        model = init_from
        want = model_cfg.max_seq_len if isinstance(model_cfg, ModelConfig) else (model_cfg or {}).get("max_seq_len")
        if want:
            set_max_seq_len(model, max(model.cfg.max_seq_len, int(want)))
        if attention is not None:  # the loader built it; the backend is checked against the loaded heads
            model.attention_backend = check_backend(attention, model.cfg.head_dim)
    lora = lora_config(lora_cfg)
    if lora is not None:
        apply_lora(model, lora)
    return model

