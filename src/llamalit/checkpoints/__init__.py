"""Reading and writing model weights: our format, llama2.c, Hugging Face, PEFT."""
