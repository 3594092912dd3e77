"""GGUF for llama.cpp, written with the ``gguf`` package (llama.cpp's own gguf-py): a whole model, or a LoRA
adapter alone as llama.cpp's adapter GGUF (``llama-cli --lora``, ``llama_cpp.Llama(lora_path=...)``).

What llama.cpp's ``llama`` architecture expects, and how this module meets it:

- Q/K rows in the Meta / llama2.c order (RoPE on adjacent pairs, ``LLAMA_ROPE_TYPE_NORM``): llama.cpp's
  ``convert_hf_to_gguf.py`` undoes Hugging Face's rotary permutation to get there, and our weights are already
  in that order (our HF import undoes it too), so they are written as they are. The tests prove it against
  llama.cpp's logits (and that the permuted layout does not match).
- A tied head is written as ``token_embd.weight`` alone: llama.cpp reuses it when ``output.weight`` is absent.
- The SentencePiece vocabulary as ``convert_hf_to_gguf.py``'s ``_create_vocab_sentencepiece`` builds it (pieces,
  scores, types; ``[PADn]`` entries up to the model's vocab size).
- ``q8_0`` quantizes the matrices; 1-D tensors (norms) stay f32, and a matrix whose rows are not whole Q8_0
  blocks is written f16, as the converter does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llamalit.model.llama import Llama
from llamalit.model.lora import lora_layers
from llamalit.utils.fileio import atomic_path

__all__ = ["DTYPES", "GGUFError", "GGUFVocab", "check_dtype", "gguf_tensor_name", "save_gguf",
           "read_gguf_metadata", "save_gguf_adapter", "sentencepiece_vocab"]

DTYPES = ("f32", "f16", "bf16", "q8_0")
_LAYER_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
                "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
                "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
_TOP_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


class GGUFError(ValueError):
    """A model, tokenizer or setting that llama.cpp's GGUF cannot hold: the message says what and what to do."""


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`DTYPES`, else a :class:`GGUFError` naming the choices."""
    if dtype not in DTYPES:
        raise GGUFError(f"dtype={dtype!r}: format=gguf writes one of {list(DTYPES)} (f16 by default)")
    return dtype


def gguf_tensor_name(key: str) -> str:
    """llama.cpp's name for one of our (llama2.c) state dict keys: ``layers.0.attention.wq.weight`` ->
    ``blk.0.attn_q.weight``."""
    parts = key.split(".")
    if parts[0] == "layers":
        module = ".".join(parts[2:-1])
        if module in _LAYER_NAMES:
            return f"blk.{parts[1]}.{_LAYER_NAMES[module]}.{parts[-1]}"
    elif len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise GGUFError(f"{key}: a tensor llama.cpp's llama architecture has no place for")


def _spm(tokenizer: Path):
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    sp = SentencePieceProcessor(model_file=str(tokenizer))
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer).read_bytes())
    return sp, proto


@dataclass
class GGUFVocab:
    """A SentencePiece-style ('llama') vocabulary as GGUF stores it: pieces, scores, llama.cpp token types,
    the special ids (-1: none) and the normalizer's two flags llama.cpp reads."""

    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int = -1
    pad_id: int = -1
    add_space_prefix: bool = True
    remove_extra_whitespaces: bool = False


def sentencepiece_vocab(tokenizer: str | Path, vocab_size: int) -> GGUFVocab:
    """The vocabulary of a SentencePiece BPE model, padded to ``vocab_size`` with unused ``[PADn]`` entries
    (``convert_hf_to_gguf.py``'s ``_create_vocab_sentencepiece``)."""
    import gguf

    sp, proto = _spm(Path(tokenizer))
    n = sp.vocab_size()
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise GGUFError(f"tokenizer {tokenizer}: a SentencePiece {kind} model; llama.cpp's 'llama' tokenizer "
                        "merges pieces as SentencePiece BPE does and would split text differently: "
                        "train the model with a BPE tokenizer (data.tokenizer=train:N does)")
    if n > vocab_size:
        raise GGUFError(f"tokenizer {tokenizer} has {n} pieces but the model's vocab_size is {vocab_size}; "
                        "pass the tokenizer the model was trained with (tokenizer=PATH)")
    types = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, kinds = [-10000.0] * vocab_size, [int(types.UNUSED)] * vocab_size
    for i in range(n):
        kind = types.NORMAL
        if sp.IsUnknown(i):
            kind = types.UNKNOWN
        elif sp.IsControl(i):
            kind = types.CONTROL
        elif sp.IsUnused(i):
            kind = types.UNUSED
        elif sp.IsByte(i):
            kind = types.BYTE
        elif proto.pieces[i].type == proto.pieces[i].USER_DEFINED:
            kind = types.USER_DEFINED
        tokens[i], scores[i], kinds[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), int(kind)
    spec = proto.normalizer_spec
    return GGUFVocab(tokens, scores, kinds, sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id(),
                     spec.add_dummy_prefix, spec.remove_extra_whitespaces)


def _qtypes(dtype: str):
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16), "bf16": (q.BF16, f.MOSTLY_BF16),
            "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}[check_dtype(dtype)]


def _add_tensor(writer, name: str, tensor: torch.Tensor, dtype: str) -> int | None:
    """Write ``tensor`` as ``name`` in ``dtype`` (1-D tensors in f32); return its row length when it could not
    be quantized and was written f16 instead, as ``convert_hf_to_gguf.py`` does."""
    import gguf

    data = tensor.detach().to("cpu", torch.float32).numpy()
    qtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 else _qtypes(dtype)[0]
    try:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        return None
    except gguf.QuantError:  # rows that are not whole Q8_0 blocks
        writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16),
                          raw_dtype=gguf.GGMLQuantizationType.F16)
        return data.shape[-1]


def _finish(writer, fallbacks: dict[str, int | None], dtype: str) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    names = [name for name, row in fallbacks.items() if row]
    if names:
        rows = sorted({fallbacks[n] for n in names})
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        print(f"note: {names[0]}{more}: rows of {rows} are not whole {dtype} blocks of 32; written as f16, as "
              "llama.cpp's converter does", file=sys.stderr)


def _model_tensors(model: Llama) -> Iterator[tuple[str, torch.Tensor]]:
    tied = model.cfg.tie_embeddings or model.output.weight is model.tok_embeddings.weight
    for key, tensor in model.state_dict().items():
        if key == "output.weight" and tied:  # llama.cpp reuses token_embd.weight when output.weight is absent
            continue
        yield gguf_tensor_name(key), tensor


def save_gguf(model: Llama, path: str | Path, tokenizer: str | Path | GGUFVocab, dtype: str = "f16",
              chat_template: str | None = None, name: str | None = None) -> Path:
    """Write ``model`` (plain, LoRA merged) with its SentencePiece ``tokenizer`` (a ``.model`` path, or a
    :class:`GGUFVocab`) as a llama.cpp GGUF at ``path`` (atomically). ``dtype``: one of :data:`DTYPES`;
    ``chat_template``: a Jinja template for ``tokenizer.chat_template``."""
    import gguf

    if lora_layers(model):
        raise GGUFError("save_gguf: the model holds LoRA adapters; merge them (merge_lora) or write the adapter "
                        "alone with save_gguf_adapter")
    cfg, (_, ftype) = model.cfg, _qtypes(dtype)
    vocab = tokenizer if isinstance(tokenizer, GGUFVocab) else sentencepiece_vocab(tokenizer, cfg.vocab_size)
    if len(vocab.tokens) != cfg.vocab_size:
        raise GGUFError(f"the vocabulary has {len(vocab.tokens)} entries but the model's vocab_size is "
                        f"{cfg.vocab_size}")
    path, fallbacks = Path(path), {}
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or path.stem)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab.tokens)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.types)
        for add, token_id in ((w.add_bos_token_id, vocab.bos_id), (w.add_eos_token_id, vocab.eos_id),
                              (w.add_unk_token_id, vocab.unk_id), (w.add_pad_token_id, vocab.pad_id)):
            if token_id >= 0:
                add(token_id)
        w.add_add_bos_token(True)  # prompts start with BOS, as our generate and training rows do
        w.add_add_eos_token(False)
        w.add_add_space_prefix(vocab.add_space_prefix)
        w.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
        if chat_template:
            w.add_chat_template(chat_template)
        for tensor_name, tensor in _model_tensors(model):
            fallbacks[tensor_name] = _add_tensor(w, tensor_name, tensor, dtype)
        _finish(w, fallbacks, dtype)
    return path


def save_gguf_adapter(model: Llama, path: str | Path, dtype: str = "f32", name: str | None = None) -> Path:
    """Write the LoRA adapters of ``model`` alone as llama.cpp's adapter GGUF (``general.type=adapter``,
    ``adapter.type=lora``, ``adapter.lora.alpha``; ``<tensor>.lora_a`` (r, in) and ``<tensor>.lora_b``
    (out, r), as ``convert_lora_to_gguf.py`` writes them). llama.cpp scales each by alpha / r, as we do."""
    import gguf

    layers = lora_layers(model)
    if not layers:
        raise GGUFError("the checkpoint holds no LoRA adapters; export the model itself (adapter=false)")
    tied = [k for k, layer in layers.items() if k == "output" and (layer.weight_tied or model.cfg.tie_embeddings)]
    if tied:
        raise GGUFError("the adapter trains the output head, which this model ties to the token embedding; "
                        "llama.cpp's adapter GGUF cannot hold that (it reuses token_embd for the head): export "
                        "the merged model instead (adapter=false)")
    if any(layer.merged for layer in layers.values()):
        raise GGUFError("the adapters are already merged into the weights; export the model itself (adapter=false)")
    alphas = {float(layer.alpha) for layer in layers.values()}
    if len(alphas) > 1:
        raise GGUFError(f"the adapters have different alphas {sorted(alphas)}; llama.cpp's adapter GGUF holds "
                        "one: export the merged model instead (adapter=false)")
    _qtypes(dtype)
    path, fallbacks = Path(path), {}
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alphas.pop())
        w.add_name(name or path.stem)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for module, layer in layers.items():
            base = gguf_tensor_name(f"{module}.weight")
            for part, tensor in (("lora_a", layer.lora_A), ("lora_b", layer.lora_B)):
                fallbacks[f"{base}.{part}"] = _add_tensor(w, f"{base}.{part}", tensor, dtype)
        _finish(w, fallbacks, dtype)
    return path


def read_gguf_metadata(path: str | Path) -> dict[str, object]:
    """Every key of a GGUF file with its value (arrays as lists; token lists left out), for checks and tests."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    meta: dict[str, object] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            meta[key] = field.contents() if len(field.data) < 64 else f"<{len(field.data)} items>"
        else:
            meta[key] = field.contents()
    return meta

