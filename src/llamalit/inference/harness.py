"""Our own Llama as an lm-evaluation-harness model: :class:`LlamalitLM`, a ``lm_eval`` ``TemplateLM``.

Every checkpoint llamalit loads works (run and HF directories, LoRA adapters applied, llama2.c files, Hub ids):
:meth:`LlamalitLM.from_checkpoint` loads it as ``llamalit-generate`` does. Requests are batched on the device
(CUDA under bf16 autocast, the CPU in fp32), sorted longest first so that a batch wastes little padding.

- ``loglikelihood``: :func:`llamalit.inference.scoring.score_continuations`: a context shared by several
  continuations (multiple choice) runs once and its KV cache serves each continuation; only the continuation
  positions go through the output head. ``batch_size`` rows per forward, more short ones up to
  ``max_batch_tokens`` tokens when set. Contexts longer than the model's context lose their oldest tokens (one
  warning); ``truncate=False`` makes that an error. A continuation that cannot fit at all is always an error.
- ``loglikelihood_rolling``: the text without BOS, in disjoint windows of the model's context (the harness's
  ``get_rolling_token_windows``), the first conditioned on BOS.
- ``generate_until``: :func:`llamalit.inference.evaluation.generate_left_padded` (one KV-cached left-padded batch;
  fp32 on the CPU, the compiled decode step), stop strings checked as it goes, ``max_gen_toks``, greedy or sampled
  (``do_sample``, ``temperature``, ``top_k``, ``top_p``).

Text is encoded as Hugging Face's Llama tokenizer does: ``<s>`` and ``</s>`` in a string are BOS and EOS, and a
BOS goes in front unless the string already holds one (so a task can ask for our instruct form: the prompt,
then BOS).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from llamalit.inference.evaluation import generate_left_padded
from llamalit.inference.scoring import score_continuations
from llamalit.model.llama import Llama

MISSING = "lm-evaluation-harness is not installed; pip install llamalit[eval] (or pip install lm-eval)"
try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (
        Collator,
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
except ImportError as e:  # the CLI turns this into one error line
    raise ImportError(MISSING) from e

log = logging.getLogger("llamalit.harness")
GEN_KEYS = ("do_sample", "temperature", "top_k", "top_p")  # what generate_until honours besides until/max_gen_toks


class LlamalitLM(TemplateLM):
    """An lm_eval model over a :class:`~llamalit.model.llama.Llama` and its SentencePiece tokenizer."""

    def __init__(self, model: Llama, tokenizer: Any, device: str | torch.device = "cpu", batch_size: int = 8,
                 max_gen_toks: int | None = None, truncate: bool = True, name: str = "llamalit",
                 max_batch_tokens: int | None = None) -> None:
        super().__init__()
        if tokenizer.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'path', '')} has {tokenizer.vocab_size} pieces but the "
                             f"model's vocab_size is {model.cfg.vocab_size}; pass the tokenizer it was trained with")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.tok = tokenizer
        self._batch_size = int(batch_size)
        self.max_length = model.cfg.max_seq_len
        self._max_gen_toks = int(max_gen_toks) if max_gen_toks else min(256, self.max_length // 2)
        if max_batch_tokens is not None and int(max_batch_tokens) < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens!r}: must be an integer >= 1 (or unset)")
        self.max_tokens = int(max_batch_tokens) if max_batch_tokens else None  # more short rows per scoring forward
        self.truncate = bool(truncate)
        self.name = name
        self.bos_text, self.eos_text = tokenizer.sp.id_to_piece(tokenizer.bos_id), tokenizer.sp.id_to_piece(tokenizer.eos_id)
        self._special = re.compile(f"({re.escape(self.bos_text)}|{re.escape(self.eos_text)})")
        self._where: dict[tuple[str, str], str] = {}  # request args -> "task T doc D", for error messages

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, tokenizer: str | None = None, cache_dir: str | Path | None = None,
                        data_dir: str | Path | None = None, device: str | None = "auto", **kw: Any) -> LlamalitLM:
        """Load ``ckpt`` (anything :func:`~llamalit.checkpoints.load_checkpoint` reads) and its tokenizer: the
        one given, else the checkpoint's, else ``data_dir``'s, else Llama 2's for a 32000-piece model."""
        from llamalit.checkpoints.detect import fetch, load_checkpoint
        from llamalit.data.tokenizer import Tokenizer
        from llamalit.inference.loading import pick_tokenizer, resolve_device

        local = fetch(str(ckpt))
        model = load_checkpoint(local)
        settings = {"tokenizer": tokenizer, "paths": {"cache_dir": str(cache_dir or "~/.cache/llamalit")},
                    "data": {"dir": data_dir}}
        tok = Tokenizer(pick_tokenizer(settings, local, model.cfg.vocab_size))
        return cls(model, tok, device=resolve_device(device), name=str(ckpt), **kw)

    # --- what TemplateLM asks for -----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def get_model_info(self) -> dict:
        return {"model_name": self.name, "model_num_parameters": self.model.num_params(),
                "model_dtype": str(self.model.output.weight.dtype), "tokenizer": str(getattr(self.tok, "path", ""))}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string`` (see the module docstring for BOS); the last ``left_truncate_len`` if given."""
        ids: list[int] = []
        for part in self._special.split(string):
            if part == self.bos_text:
                ids.append(self.tok.bos_id)
            elif part == self.eos_text:
                ids.append(self.tok.eos_id)
            elif part:
                ids += self.tok.encode(part, bos=False, eos=False)
        add_bos = add_special_tokens if add_special_tokens is not None else self.tok.bos_id not in ids
        ids = [self.tok.bos_id, *ids] if add_bos else ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def _autocast(self) -> AbstractContextManager:
        if self._device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return nullcontext()

    # --- log-likelihoods --------------------------------------------------------------------------------
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._where = {tuple(r.args): f"task {r.task_name} doc {r.doc_id}" for r in requests}
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _fit(self, req: tuple | None, context: list[int], continuation: list[int]) -> list[int]:
        """The model's input for one request: context + continuation less its last token, cut to the context."""
        where = self._where.get(tuple(req), "a request") if req else "a rolling window"
        if len(continuation) > self.max_length:
            raise ValueError(f"{where}: the continuation is {len(continuation)} tokens, longer than the model's "
                             f"context of {self.max_length}; use a model with a longer max_seq_len or a shorter task")
        whole = context + continuation
        if len(whole) > self.max_length + 1:
            if not self.truncate:
                raise ValueError(f"{where}: context + continuation are {len(whole) - 1} tokens, more than the "
                                 f"model's context of {self.max_length}; lower num_fewshot, or truncate=true to cut "
                                 "the oldest context tokens as lm-eval's HFLM does")
            self._truncated += 1
        return whole[-(self.max_length + 1):-1]

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether it is the greedy continuation) for each request; requests that
        share a context run it once (:func:`~llamalit.inference.scoring.score_continuations`)."""
        self._truncated, inputs = 0, []
        for req, ctx, cont in requests:
            if cont:  # an empty continuation has probability 1 (as HFLM scores it)
                row = self._fit(req, ctx, cont)
                cut = len(row) - len(cont) + 1  # the prefix ends with the token that predicts the first target
                inputs.append((row[:cut], row[cut:], cont))
        answers = iter(score_continuations(self.model, inputs, self.batch_size, self.max_tokens,
                                                   self._autocast) if inputs else [])
        out = [next(answers) if cont else (0.0, True) for _, _, cont in requests]
        for (req, _, _), answer in zip(requests, out):
            if req is not None:
                self.cache_hook.add_partial("loglikelihood", req, answer)
        if self._truncated:
            log.warning("%d request(s) longer than the model's context of %d tokens lost their oldest context "
                        "tokens (truncate=false makes this an error)", self._truncated, self.max_length)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of the model's context, all windows batched."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0], add_special_tokens=False)
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows) if windows else []):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(req.args), total)
        return totals

    # --- generation -------------------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: dict, where: str) -> tuple[list[str], int, dict]:
        kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kw.pop("until", None), eos=self.eos_text)
        max_gen = int(kw.pop("max_gen_toks"))
        unknown = sorted(k for k in kw if k not in GEN_KEYS)
        if unknown:
            raise ValueError(f"{where}: generation_kwargs {unknown} are not supported by llamalit (it honours "
                             f"until, max_gen_toks and {', '.join(GEN_KEYS)}); drop them from the task")
        if not 1 <= max_gen < self.max_length:
            raise ValueError(f"{where}: max_gen_toks={max_gen} leaves no room for a prompt in the model's context "
                             f"of {self.max_length}; set a smaller max_gen_toks (gen_kwargs=max_gen_toks=N)")
        sample = bool(kw.get("do_sample")) and float(kw.get("temperature") if kw.get("temperature") is not None
                                                     else 1.0) > 0
        sampling = {"temperature": float(kw.get("temperature") or 1.0) if sample else 0.0,
                    "top_k": kw.get("top_k") if sample else None, "top_p": kw.get("top_p") if sample else None}
        return until, max_gen, sampling

    def _stop_check(self, until: list[str]) -> Callable[[list[list[int]]], list[bool]]:
        stops = [s for s in until if s]
        return lambda rows: [any(s in self.tok_decode(r) for s in stops) for r in rows]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Generated text for each ``(context, gen_kwargs)`` request, cut at the first stop string."""
        where = {id(r.args[0]): f"task {r.task_name} doc {r.doc_id}" for r in requests}
        encoded = {}
        for r in requests:
            encoded.setdefault(r.args[0], self.tok_encode(r.args[0]))
        collator = Collator([r.args for r in requests], sort_fn=lambda a: (-len(encoded[a[0]]), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        out, truncated = [], 0
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            label = where.get(id(contexts[0]), "a request")
            until, max_gen, sampling = self._generation_settings(all_kwargs[0], label)
            room = self.max_length - max_gen
            prompts = []
            for c in contexts:
                ids = encoded[c]
                if len(ids) > room:
                    if not self.truncate:
                        raise ValueError(f"{where.get(id(c), 'a request')}: the prompt is {len(ids)} tokens; with "
                                         f"max_gen_toks={max_gen} only {room} fit the model's context of "
                                         f"{self.max_length}; lower num_fewshot or max_gen_toks, or truncate=true")
                    truncated += 1
                prompts.append(ids[-room:])
            with self._autocast():
                new = generate_left_padded(self.model, prompts, [max_gen] * len(prompts), sampling["temperature"],
                                           sampling["top_k"], self.tok.eos_id, top_p=sampling["top_p"],
                                           stopped=self._stop_check(until))
            for context, gen_kwargs, ids in zip(contexts, all_kwargs, new):
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        if truncated:
            log.warning("%d prompt(s) lost their oldest tokens to fit the model's context of %d with room for "
                        "max_gen_toks (truncate=false makes this an error)", truncated, self.max_length)
        return collator.get_original(out)
