"""Reading and writing model weights: our format, llama2.c, Hugging Face, PEFT.

``load_checkpoint`` detects the format (the formats, in detection order, are
:data:`llamalit.checkpoints.registry.FORMATS`); the per-format readers and writers are re-exported here.
Shared helpers are in :mod:`llamalit.checkpoints.common`; a training run's export in
:mod:`llamalit.checkpoints.run_export`.
"""

from llamalit.checkpoints.common import CheckpointError
from llamalit.checkpoints.detect import find_tokenizer, load_checkpoint, load_peft
from llamalit.checkpoints.hf import load_hf, save_hf
from llamalit.checkpoints.llama2c import load_llama2c, read_llama2c_bin, save_llama2c_bin
from llamalit.checkpoints.native import load_model, save_model
from llamalit.checkpoints.peft import save_peft

__all__ = [
    "CheckpointError", "find_tokenizer", "load_checkpoint", "load_hf", "load_llama2c", "load_model",
    "load_peft", "read_llama2c_bin", "save_hf", "save_llama2c_bin", "save_model", "save_peft",
]
