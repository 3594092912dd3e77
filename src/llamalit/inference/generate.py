"""Sampling from a Llama with a KV cache: temperature, top-k, top-p, EOS stop, seeded.

After the prompt's forward, each new token goes through ``llamalit.inference.decode``: on CUDA a static-shape step
replayed from a CUDA graph, elsewhere :func:`~llamalit.inference.decode.decode_step` (the CPU kernel when it builds; greedy decoding on the kernel
takes its greedy step, which returns the argmax ids of its logits directly).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch

from llamalit.inference.decode import StaticDecoder, decode_step, decode_weights, greedy_kernel
from llamalit.model.llama import Llama


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus (smallest set of mass >= top_p)."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p  # keep a token while the mass before it is short of p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab). temperature 0 means greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None = None,
                        top_p: float | None = None, seed: int | None = None) -> None:
    """Raise ValueError naming the setting and its value when a sampling setting is out of range.

    Valid: ``max_new_tokens`` an int >= 1; ``temperature`` a finite number >= 0 (0 = greedy);
    ``top_k`` None or an int >= 1; ``top_p`` None or a number in (0, 1] (1 = off); ``seed`` None or an int.
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1 (the number of tokens "
                         "to generate)")
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r}: must be a number >= 0 (0 = greedy, 1 = the model's "
                         "distribution)")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: must be an integer >= 1 (keep the k most likely tokens), or null "
                         "to keep all")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r}: must be a number in (0, 1] (nucleus mass; 1 = off), or null")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed={seed!r}: must be an integer, or null for a random sample")


def _check_args(model: Llama, prompt_len: int, max_new_tokens: int, temperature: float,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> None:
    if prompt_len == 0:
        raise ValueError("generate: the prompt is empty; pass at least one token (e.g. BOS)")
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, seed)
    if prompt_len + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"generate: prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_len + max_new_tokens} exceeds the model's max_seq_len={model.cfg.max_seq_len}; "
            "shorten the prompt or lower max_new_tokens"
        )


def generate_stream(model: Llama, prompt_ids: list[int] | list[list[int]], max_new_tokens: int,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    eos_id: int | None = None, seed: int | None = None,
                    static_decode: bool | None = None) -> Iterator[int | list[int]]:
    """Yield new token ids as they are produced: an int per step for one prompt, a list for a batch.

    A batch is a list of equal-length prompts. Generation stops once every row has sampled
    ``eos_id``; a finished row yields ``eos_id`` again (as padding) until the rest finish.
    Bad settings raise ValueError here, before the first token is asked for. ``static_decode``: the
    static-shape step (:class:`~llamalit.inference.decode.StaticDecoder`, captured in a CUDA graph on CUDA);
    None: on CUDA only. Both give the same tokens.
    """
    batched = bool(prompt_ids) and isinstance(prompt_ids[0], (list, tuple))
    rows = [list(p) for p in prompt_ids] if batched else [list(prompt_ids)]
    if len({len(r) for r in rows}) > 1:
        raise ValueError("generate: prompts in a batch must have equal length")
    _check_args(model, len(rows[0]), max_new_tokens, temperature, top_k, top_p, seed)
    if static_decode is None:
        static_decode = model.output.weight.device.type == "cuda"
    return _stream(model, rows, batched, max_new_tokens, temperature, top_k, top_p, eos_id, seed, static_decode)


@torch.inference_mode()
def _stream(model: Llama, rows: list[list[int]], batched: bool, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, eos_id: int | None,
            seed: int | None, static_decode: bool) -> Iterator[int | list[int]]:
    device = model.output.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        caches = model.new_caches(len(rows))
        weights = decode_weights(model, kernel=False if static_decode else None)
        static = None
        if static_decode and weights is not None:  # else (e.g. LoRA-wrapped layers) the ordinary step
            static = StaticDecoder(weights, caches, len(rows), device, graph=device.type == "cuda")
        # greedy on the CPU kernel: its step writes the next ids (the argmax of its logits) into `chosen`
        kernel = greedy_kernel(model, weights) if temperature == 0.0 and static is None else None
        chosen = torch.empty(len(rows), dtype=torch.long) if kernel is not None else None
        tokens = torch.tensor(rows, dtype=torch.long, device=device)
        if tokens.shape[1] == 1 and static is None and weights is not None and weights.kernel is not None:
            logits = decode_step(model, tokens, 0, caches, weights)  # a 1-token prompt: one kernel step
        else:
            logits = model.output(model.hidden(tokens, 0, caches)[:, -1])
        pos = tokens.shape[1]
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator) if logits is not None else chosen
            if eos_id is not None:
                nxt = nxt.masked_fill(finished, eos_id)
                finished |= nxt == eos_id
            ids = nxt.tolist()
            if not batched:
                if ids[0] == eos_id:
                    return
                yield ids[0]
            else:
                if bool(finished.all()):
                    if any(i != eos_id for i in ids):
                        yield ids
                    return
                yield ids
            if step + 1 < max_new_tokens:
                if static is not None:
                    logits = static.step(nxt, pos)
                elif kernel is not None and kernel.greedy(nxt, pos, caches, chosen):
                    logits = None
                else:
                    logits = decode_step(model, nxt[:, None], pos, caches, weights)
                pos += 1
    finally:
        model.train(was_training)


def generate(model: Llama, prompt_ids: list[int] | list[list[int]], max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None,
             static_decode: bool | None = None) -> list[int] | list[list[int]]:
    """New tokens only (the EOS that stops a row is not included). A batch gives one list per row."""
    steps = list(generate_stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                                 static_decode))
    if prompt_ids and isinstance(prompt_ids[0], (list, tuple)):
        return [_until_eos([ids[row] for ids in steps], eos_id) for row in range(len(prompt_ids))]
    return steps


def _until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids
