"""Reading and writing model weights: our format, llama2.c, Hugging Face, PEFT.

``load_checkpoint`` detects the format; the per-format readers and writers are re-exported here.
"""

from llamalit.checkpoints.detect import find_tokenizer, load_checkpoint
from llamalit.checkpoints.hf import load_hf, save_hf
from llamalit.checkpoints.llama2c import CheckpointError, load_llama2c, read_llama2c_bin, save_llama2c_bin
from llamalit.checkpoints.native import load_model, save_model
from llamalit.checkpoints.peft import load_peft, save_peft

__all__ = [
    "CheckpointError", "find_tokenizer", "load_checkpoint", "load_hf", "load_llama2c", "load_model",
    "load_peft", "read_llama2c_bin", "save_hf", "save_llama2c_bin", "save_model", "save_peft",
]
