"""Instruction adherence of a model: prompt it with held-out TinyStories instructions, score its stories.

The prompt goes through the same code path as the instruct shards (the shortened prompt, encoded
without BOS, then BOS: the model continues with the story), so the model is asked exactly what it
was trained on. Stories are scored by :mod:`llamalit.inference.adherence` (requested words used, checkable
features present) and averaged.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from llamalit.data.text_formats import DataFormatError, read_records, text_for_kind
from llamalit.inference.adherence import aggregate, parse_prompt, score_story
from llamalit.inference.decode import decode_weights
from llamalit.inference.generate import generate, sample_next
from llamalit.model.llama import Llama

VAL_SHARD = "data00"  # TinyStories convention: shard 0 is the validation split


def instruction_prompt(record: Mapping, path: str | Path = "<records>", index: int = 0) -> str:
    """The shortened prompt of a TinyStories record, exactly as the instruct shards hold it."""
    prompt, _ = text_for_kind("instruct", "tinystories", record, Path(path), index)
    return prompt


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt tokens as in the instruct shards: the prompt without BOS, then BOS (the story starts next)."""
    return list(tokenizer.encode(prompt, bos=False, eos=False)) + [tokenizer.bos_id]


def requested(record: Mapping, prompt: str) -> tuple[list[str], list[str]]:
    """(words, features) a record asks for: its ``instruction`` lists, else parsed from the prompt."""
    instruction = record.get("instruction") or {}
    words, features = instruction.get("words"), instruction.get("features")
    if words is None or features is None:
        parsed_words, parsed_features = parse_prompt(prompt)
        words = parsed_words if words is None else words
        features = parsed_features if features is None else features
    return [str(w) for w in words], [str(f) for f in features]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_left_padded(model: Llama, prompts: Sequence[Sequence[int]], steps: Sequence[int],
                         temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
                         generator: torch.Generator | None = None, top_p: float | None = None,
                         stopped: Callable[[list[list[int]]], list[bool]] | None = None,
                         check_every: int = 8) -> list[list[int]]:
    """New tokens for prompts of any lengths in one batch: row ``i`` gets up to ``steps[i]`` tokens (stopping
    after ``eos_id``, which is not returned).

    The prompts are left-padded into one KV-cached batch; each row attends only to its own tokens at its own
    RoPE positions, so greedy results are those of generating each prompt alone. Steps run on the compiled CPU
    kernel when :func:`~llamalit.inference.decode.decode_weights` picks it (fp32 on the CPU), else on the fused
    PyTorch step, else (LoRA-wrapped layers) on the model's forward. ``stopped`` (needs
    ``eos_id``): every ``check_every`` steps it gets each row's tokens so far and says which rows are done
    (say, a stop string appeared); those rows get no more tokens, and the batch ends once all are done.
    """
    device = model.output.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width, rows = int(lengths.max()), len(prompts)
    if width + max(steps) > model.cfg.max_seq_len:
        raise ValueError(f"longest prompt ({width}) + steps ({max(steps)}) exceed max_seq_len={model.cfg.max_seq_len}")
    pad = width - lengths  # (B,)
    tokens = torch.zeros(rows, width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
    cols = torch.arange(width, device=device)
    positions = (cols[None] - pad[:, None]).clamp(min=0)
    own = cols[None, :] >= pad[:, None]  # (B, keys): a row's real tokens
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # a padding query sees itself only (a row of all-masked keys would give NaN); real queries never see padding
    mask = causal & (own[:, None, :] | torch.eye(width, dtype=torch.bool, device=device))
    was_training = model.training
    model.eval()
    try:
        weights = decode_weights(model)  # the compiled CPU step when it builds and is the faster here
        kernel = weights.kernel if weights is not None else None
        # the kernel's caches span max_seq_len; otherwise prompt + steps (zeroing max_seq_len cost up to 10%)
        caches = model.new_caches(rows, length=None if kernel is not None else width + max(steps))
        if kernel is not None and not kernel.accepts(caches):
            kernel = None
        logits = model.output(model.hidden(tokens, 0, caches, positions=positions, mask=mask[:, None])[:, -1])
        cap = torch.tensor(list(steps), device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        chosen = torch.empty(rows, dtype=torch.long) if kernel is not None and temperature == 0.0 else None
        out = []
        for step in range(max(steps)):
            nxt = chosen.clone() if logits is None else sample_next(logits, temperature, top_k, top_p, generator=generator)
            done |= cap <= step
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            out.append(nxt)
            if stopped is not None and eos_id is not None and (step + 1) % check_every == 0:
                so_far = torch.stack(out, dim=1).tolist()
                done |= torch.tensor(stopped([_until_stop(r, eos_id) for r in so_far]), device=device)
            if step + 1 == max(steps) or bool(done.all()):
                break
            if kernel is not None:  # row b sees cache columns pad[b]..width + step
                if chosen is not None:  # greedy: the step writes the argmax of its logits into `chosen`
                    kernel.greedy(nxt, width + step, caches, chosen, rope_pos=lengths + step, first_key=pad)
                    logits = None
                else:
                    logits = kernel.step(nxt, width + step, caches, rope_pos=lengths + step, first_key=pad)
                continue
            own = torch.cat([own, torch.ones(rows, 1, dtype=torch.bool, device=device)], dim=1)
            if weights is not None:  # fused projections (decode_weights), a quarter fewer ops per step
                logits = weights.step(nxt, width + step, caches, rope_pos=lengths + step, visible=own[:, None, None, :])
            else:  # e.g. LoRA-wrapped layers
                h = model.hidden(nxt[:, None], width + step, caches, positions=(lengths + step)[:, None],
                                 mask=own[:, None, None, :])
                logits = model.output(h[:, -1])
    finally:
        model.train(was_training)
    ids = torch.stack(out, dim=1).tolist()
    return [_until_stop(row[:n], eos_id) for row, n in zip(ids, steps)]


def _until_stop(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def evaluate_adherence(model: torch.nn.Module, tokenizer: Any, records: Sequence[Mapping],
                       max_new_tokens: int = 200, temperature: float = 0.0, seed: int = 0,
                       limit: int | None = None, batch_size: int = 8, n_examples: int = 3,
                       top_k: int | None = None, batching: str = "auto") -> dict:
    """Generate a story for each record's instruction and score how well it follows it.

    ``records``: TinyStories-schema dicts (``instruction`` with ``prompt:``, ``words``, ``features``).
    Prompts are generated ``batch_size`` at a time on the model's device: ``batching="padded"`` puts prompts of
    any length in a batch (:func:`generate_left_padded`), ``"length"`` only prompts of equal token length (the
    CPU's decode kernel serves them), ``"auto"`` padded on CUDA, by length elsewhere. Greedy results depend on
    neither. Each batch is sampled with seed ``seed + index of its first record``.
    Returns :func:`llamalit.inference.adherence.aggregate`'s means (``adherence``, ``word_recall``,
    ``feature_rate``, ``feature/<Name>``, ``n_stories``) plus ``skipped`` (prompts that leave no room
    in the context), ``new_tokens``, ``seconds``, ``settings`` and ``examples`` (the first
    ``n_examples`` rows: prompt, words, features, story, scores).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records = list(records)[:limit] if limit is not None else list(records)
    context = model.cfg.max_seq_len
    items, skipped = [], 0
    for i, record in enumerate(records):
        prompt = instruction_prompt(record, index=i)
        ids = prompt_ids(tokenizer, prompt)
        if len(ids) >= context:
            skipped += 1
            continue
        words, features = requested(record, prompt)
        items.append({"index": i, "prompt": prompt, "ids": ids, "words": words, "features": features})

    if batching == "auto":
        batching = "padded" if _model_device(model).type == "cuda" else "length"
    if batching not in ("padded", "length"):
        raise ValueError(f"batching={batching!r}: choose auto, padded or length")
    start, new_tokens = time.perf_counter(), 0
    for batch in (_padded_batches(items, batch_size, max_new_tokens, context) if batching == "padded"
                  else _length_batches(items, batch_size)):
        steps = [min(max_new_tokens, context - len(it["ids"])) for it in batch]
        prompts = [it["ids"] for it in batch]
        if batching == "padded":
            generator = torch.Generator(device=_model_device(model)).manual_seed(seed + batch[0]["index"])
            outs = generate_left_padded(model, prompts, steps, temperature, top_k, tokenizer.eos_id, generator)
        else:
            out = generate(model, prompts if len(batch) > 1 else prompts[0], steps[0], temperature=temperature,
                           top_k=top_k, eos_id=tokenizer.eos_id, seed=seed + batch[0]["index"])
            outs = out if len(batch) > 1 else [out]
        for it, ids in zip(batch, outs):
            it["story"] = tokenizer.decode(ids).strip()
            new_tokens += len(ids)
    seconds = time.perf_counter() - start

    scores = []
    for it in items:
        it["score"] = score_story(it["story"], it["words"], it["features"])
        scores.append(it["score"])
    result = aggregate(scores)
    result.update({
        "skipped": skipped,
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "settings": {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                     "top_k": top_k, "n_records": len(records)},
        "examples": [{"prompt": it["prompt"], "words": it["words"], "features": it["features"],
                      "story": it["story"], **{k: it["score"][k] for k in
                                               ("adherence", "word_recall", "feature_rate", "words_missing")}}
                     for it in items[:n_examples]],
    })
    return result


def _length_batches(items: list[dict], batch_size: int) -> list[list[dict]]:
    """Prompts of equal token length together, ``batch_size`` at most."""
    by_length: dict[int, list[dict]] = {}
    for item in items:
        by_length.setdefault(len(item["ids"]), []).append(item)
    return [group[b:b + batch_size] for group in by_length.values() for b in range(0, len(group), batch_size)]


def _padded_batches(items: list[dict], batch_size: int, max_new_tokens: int, context: int) -> list[list[dict]]:
    """Prompts by length, ``batch_size`` at most a batch, each batch's longest prompt + its most steps in context."""
    batches: list[list[dict]] = []
    for item in sorted(items, key=lambda it: len(it["ids"])):
        batch = batches[-1] if batches else None
        steps = min(max_new_tokens, context - len(item["ids"]))
        if batch and len(batch) < batch_size and len(item["ids"]) + max(
                steps, *(min(max_new_tokens, context - len(it["ids"])) for it in batch)) <= context:
            batch.append(item)
        else:
            batches.append([item])
    return batches


def _validation_file(data: Mapping | str | Path, cache_dir: str | Path | None) -> Path:
    """The JSON file of the validation shard of a data config, a source directory, or a file."""
    if isinstance(data, Mapping):  # a dict or DictConfig
        from llamalit.data.download import default_cache_dir
        from llamalit.data.prepare import data_settings, source_files

        cfg = data_settings(data)
        if cfg["format"] != "tinystories":
            raise ValueError(f"data.format={cfg['format']!r}: adherence needs TinyStories-format records "
                             "(instruction with words and features); use data=synthetic or tinystories_instruct")
        files, chunked = source_files(cfg, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
        if chunked:
            return files[0]
        names = list(cfg["val_shards"]) or [VAL_SHARD]
        val = [f for f in files if f.name.split(".")[0] in names]
        if not val:
            raise FileNotFoundError(f"data.source={cfg['source']!r}: no validation shard {names} among "
                                    f"{[f.name for f in files][:8]}")
        return val[0]
    path = Path(data).expanduser()
    if path.is_dir():
        candidate = path / f"{VAL_SHARD}.json"
        if not candidate.is_file():
            found = sorted(path.glob("data*.json")) or sorted(path.rglob(f"{VAL_SHARD}.json"))
            if not found:
                raise FileNotFoundError(f"{path}: no {VAL_SHARD}.json (the validation shard) and no data*.json; "
                                        "give a TinyStories-format directory or JSON file")
            candidate = found[0]
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory; give a directory of data*.json, a JSON "
                                "file, or a data config")
    return path


def held_out_records(data: Mapping | str | Path, n: int | None = 100, seed: int = 0,
                     cache_dir: str | Path | None = None) -> list[dict]:
    """Up to ``n`` records of the validation shard (``data00``), chosen at random with ``seed``, in file order.

    ``data``: a data config (``data=synthetic`` or ``tinystories_instruct``: the source is generated
    or downloaded as preparing the data would), a directory of ``data*.json``, or one JSON file.
    ``n=None`` takes every record. Records lacking an instruction raise a :class:`DataFormatError`.
    """
    path = _validation_file(data, cache_dir)
    records = read_records(path)
    chosen = range(len(records))
    if n is not None and n < len(records):
        chosen = sorted(random.Random(seed).sample(range(len(records)), n))
    out = []
    for i in chosen:
        text_for_kind("instruct", "tinystories", records[i], path, i)  # raises on a malformed record
        out.append(records[i])
    if not out:
        raise DataFormatError(f"{path}: no records to evaluate on")
    return out
