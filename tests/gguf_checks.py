"""llama.cpp (llama-cpp-python) as the client of our GGUF: its logits, greedy tokens, perplexity and tokenizer set
beside ours. Shared by the GGUF tests and ``scripts/bench_generate.py``-style checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llamalit.inference.generate import generate
from llamalit.model import Llama


def load_llama_cpp(path: Path, n_ctx: int, lora: Path | None = None, threads: int = 2):
    """``llama_cpp.Llama`` on ``path`` keeping every position's logits (``logits_all``), its KV cache in f32 as
    ours is (llama.cpp's default f16 cache alone moves logits by ~1e-4..1e-2)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads,
                           n_threads_batch=threads, verbose=False, seed=0, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32, **({"lora_path": str(lora)} if lora else {}))


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (len(ids), vocab) for ``ids`` fed from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def our_logits(model: Llama, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """``n`` tokens from llama.cpp's own sampler at temperature 0 (greedy), EOS not special-cased."""
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def our_greedy(model: Llama, ids: list[int], n: int) -> list[int]:
    return generate(model, ids, max_new_tokens=n, temperature=0.0)


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean next-token cross-entropy of ``ids`` under ``logits`` (position t predicts t + 1)."""
    logp = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), dim=-1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return float(torch.exp(nll.mean()))


def rounded(model: Llama, dtype: torch.dtype) -> Llama:
    """A copy of ``model`` whose matrices went through ``dtype`` and back (what a f16 / bf16 GGUF holds; norms
    stay f32 there too)."""
    twin = fresh_copy(model)
    with torch.no_grad():
        for p in twin.parameters():
            if p.dim() > 1:
                p.copy_(p.to(dtype).float())
    return twin


def fresh_copy(model: Llama) -> Llama:
    """A new ``Llama`` with ``model``'s weights (``copy.deepcopy`` would also copy the decode kernel's cache)."""
    twin = Llama(model.cfg)
    twin.load_state_dict(model.state_dict())
    return twin.eval()
