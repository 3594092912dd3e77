"""Public path of the LoRA API (docs/CONTRACT.md); the code is in :mod:`llamalit.model.lora`."""

from llamalit.model.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)

__all__ = ["LoRALinear", "LoraConfig", "apply_lora", "load_lora_state_dict", "lora_state_dict", "merge_lora"]
