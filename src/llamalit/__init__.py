"""llamalit: train a small Llama from scratch and instruction-tune it with LoRA."""

__version__ = "0.1.0"
