"""Batch-1 greedy generation speed on one model, measured in one run.

Variants (tokens/s of new tokens, prompt = [BOS]):
  kv          ours: ``llamalit.inference.generate.generate`` (KV cache + the one-token decode path; on CPU
              fp32 the compiled kernel of ``llamalit.inference.kernels`` when it builds; on CUDA the static step
              replayed from a CUDA graph, ``llamalit.inference.decode.StaticDecoder``)
  kv_step     CUDA only: ``generate(..., static_decode=False)``: the KV path without CUDA graphs
  kv_exact    ``kv`` without the int8 screen of the output head (LLAMALIT_DECODE_SCREEN=0): every greedy step
              reads the whole fp32 head (same ids; the screen only skips rows that cannot win)
  kv_torch    ``kv`` with the kernel switched off (LLAMALIT_DECODE_KERNEL=0): the PyTorch decode step
  kv_generic  ours: KV cache through the ordinary ``Llama.hidden`` forward (what decode_step replaces)
  recompute   ours: the whole prefix through the model for every new token, no cache
  hf          transformers ``LlamaForCausalLM.generate`` on the same weights (greedy, use_cache=True)
  llama_cpp   llama.cpp (llama-cpp-python) on the same weights exported by ``format=gguf`` (f32, the same
              precision as ours; a synthetic Llama-2-like vocabulary; llama.cpp's default f16 KV cache), same
              thread count, batch 1, greedy through its own sampler; skipped with a note when ``llama_cpp`` is
              not installed
  llama_cpp_q8  the same on the ``dtype=q8_0`` GGUF (what llama.cpp users mostly run; ids may differ)
  run_c       with ``--run-c PATH``: llama2.c's ``run.c`` compiled here like ``make runfast``
              (``gcc -Ofast -march=native``), on the same weights exported as a llama2.c ``.bin``,
              1 thread, greedy; its own "achieved tok/s" (timed from its second token) is reported
  run_c_omp   with ``--run-c PATH``, in the groups of more than one thread: the same ``run.c`` built with
              ``-fopenmp`` (llama2.c's ``make runomp``), ``OMP_NUM_THREADS`` = the group's threads
  static      CUDA only: ``DecodeWeights.static_step`` (static shapes, full-cache masked attention), eager
  cudagraph   CUDA only: ``StaticDecoder`` (``static`` replayed from a CUDA graph) in a loop that keeps the
              ids on the device: what ``kv`` does less its per-token host read
  compile     CUDA only: ``torch.compile(static_step, mode="reduce-overhead", fullgraph=True, dynamic=False)``

Random weights, vocab 32000, fp32 (on CUDA also ``--dtype bf16`` weights, or fp32 with ``tf32`` matmuls). ``match`` says whether a variant's ids equal ``kv``'s. Each
variant runs ``--repeats`` times after a warm-up and the fastest run is reported (shared machines).
Example: python scripts/bench_generate.py --json bench.json ; python scripts/bench_generate.py --quick
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from llamalit.inference.decode import DecodeWeights, StaticDecoder, decode_weights
from llamalit.inference.generate import generate
from llamalit.inference.kernels import ENV_SWITCH, SCREEN_SWITCH
from llamalit.model.llama import Llama, ModelConfig
from llamalit.utils.fileio import atomic_write_json

CPU_VARIANTS = ("kv", "kv_exact", "kv_torch", "kv_generic", "recompute", "hf", "llama_cpp", "llama_cpp_q8")
DTYPES = ("fp32", "bf16", "tf32")
CUDA_VARIANTS = ("kv", "kv_step", "kv_generic", "recompute", "hf", "static", "cudagraph", "compile")


def build_model(shape: str, tokens: int, device: str) -> Llama:
    """Random-weight model of a preset shape; max_seq_len raised to hold [BOS] + tokens if needed."""
    preset = ModelConfig.preset(shape)
    cfg = ModelConfig.preset(shape, max_seq_len=max(preset.max_seq_len, tokens + 1))
    torch.manual_seed(0)
    return Llama(cfg).to(device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def run_kv_exact(model: Llama, tokens: int) -> list[int]:
    with env(SCREEN_SWITCH, "0"):  # read when the model's packed weights are built (its first generate)
        return generate(model, [1], tokens, temperature=0.0)


def run_kv_torch(model: Llama, tokens: int) -> list[int]:
    with env(ENV_SWITCH, "0"):
        return generate(model, [1], tokens, temperature=0.0)


@torch.inference_mode()
def run_kv_generic(model: Llama, tokens: int) -> list[int]:
    caches = model.new_caches(1)
    tok = torch.tensor([[1]], device=model.output.weight.device)
    ids = []
    for pos in range(tokens):
        tok = model.output(model.hidden(tok, pos, caches)[:, -1]).argmax(-1, keepdim=True)
        ids.append(tok)
    return torch.cat(ids, 1)[0].tolist()


@torch.inference_mode()
def run_recompute(model: Llama, tokens: int) -> list[int]:
    seq = torch.tensor([[1]], device=model.output.weight.device)
    for _ in range(tokens):
        nxt = model.output(model.hidden(seq)[:, -1]).argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq[0, 1:].tolist()


def build_hf(model: Llama):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamalit.checkpoints.hf_layout import hf_config_dict, to_hf_state_dict

    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(model.cfg), attn_implementation="sdpa"))
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=not model.cfg.tie_embeddings)
    return hf.to(model.output.weight.device).eval()


@torch.inference_mode()
def run_hf(hf, tokens: int) -> list[int]:
    prompt = torch.tensor([[1]], device=hf.device)
    out = hf.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                      use_cache=True, pad_token_id=0, eos_token_id=None)
    return out[0, 1:].tolist()


@torch.inference_mode()
def run_static(model: Llama, tokens: int, mode: str) -> list[int]:
    """Greedy loop on device, ids never read back until the end: ``mode`` is eager, cudagraph or compile."""
    dev = model.output.weight.device
    w, caches = decode_weights(model, kernel=False), model.new_caches(1)
    tok = torch.ones(1, dtype=torch.long, device=dev)
    ids = torch.empty(tokens, dtype=torch.long, device=dev)
    decoder = StaticDecoder(w, caches, 1, dev, graph=mode == "cudagraph")
    step: Callable[[int], torch.Tensor] = lambda pos: decoder.step(tok, pos)  # noqa: E731
    if mode == "compile":
        # dynamic=False: a second model's shapes would otherwise turn its config ints symbolic (and SDPA's
        # enable_gqa a SymBool, which it refuses)
        fn = torch.compile(DecodeWeights.static_step, mode="reduce-overhead", fullgraph=True, dynamic=False)

        def step(pos: int) -> torch.Tensor:
            decoder.pos.fill_(pos)
            return fn(w, tok, decoder.pos, caches, decoder.positions)
    for i in range(tokens):
        nxt = step(i).argmax(-1)
        ids[i] = nxt[0]
        tok.copy_(nxt)
    return ids.tolist()


class RunC:
    """llama2.c's ``run.c`` built in a temp dir, with the model as a legacy ``.bin`` and a dummy tokenizer."""

    def __init__(self, source: str, model: Llama, cflags: str = "-Ofast -march=native", threads: int = 1):
        from llamalit.checkpoints.llama2c import save_llama2c_bin

        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if not cc:
            raise RuntimeError("--run-c needs a C compiler (gcc or $CC)")
        self.threads = threads
        if threads > 1:  # llama2.c's `make runomp`
            cflags += " -fopenmp"
        self.dir = tempfile.mkdtemp(prefix="bench_run_c_")
        self.exe, self.bin, self.tok = (os.path.join(self.dir, n) for n in ("run", "model.bin", "tok.bin"))
        subprocess.run([cc, *cflags.split(), "-o", self.exe, source, "-lm"], check=True, capture_output=True)
        save_llama2c_bin(model, self.bin, version=0)
        with open(self.tok, "wb") as f:  # run.c reads vocab_size (score, length, bytes) entries
            f.write(struct.pack("<i", 8))
            for i in range(model.cfg.vocab_size):
                piece = f"t{i}".encode()
                f.write(struct.pack("<fi", 0.0, len(piece)) + piece)

    def run(self, tokens: int) -> float:
        """Seconds for ``tokens`` new tokens at run.c's own achieved tok/s."""
        done = subprocess.run([self.exe, self.bin, "-t", "0", "-n", str(tokens + 1), "-z", self.tok],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(self.threads)})
        found = re.search(r"achieved tok/s: ([0-9.]+)", done.stderr)
        if not found:
            raise RuntimeError(f"run.c printed no tok/s: {done.stderr[-300:]}")
        return tokens / float(found.group(1))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class LlamaCpp:
    """llama.cpp through llama-cpp-python on ``model`` written as a GGUF (our ``format=gguf`` writer)."""

    def __init__(self, model: Llama, threads: int, dtype: str = "f32"):
        import llama_cpp

        from llamalit.checkpoints.gguf import GGUFVocab, save_gguf

        n = model.cfg.vocab_size  # Llama 2's layout: <unk> <s> </s>, 256 byte pieces, then words
        pieces = [b"<unk>", b"<s>", b"</s>", *(f"<0x{b:02X}>".encode() for b in range(256))]
        pieces += [f"\u2581w{i}".encode() for i in range(n - len(pieces))]
        types = [2, 3, 3, *[6] * 256, *[1] * (n - 259)]  # gguf.TokenType: UNKNOWN, CONTROL, BYTE, NORMAL
        self.dir = tempfile.mkdtemp(prefix="bench_llama_cpp_")
        path = save_gguf(model, os.path.join(self.dir, "model.gguf"),
                         GGUFVocab(pieces, [0.0] * n, types, bos_id=1, eos_id=2, unk_id=0), dtype=dtype)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.cfg.max_seq_len, n_threads=threads,
                                   n_threads_batch=threads, n_batch=64, verbose=False)

    def run(self, tokens: int) -> list[int]:
        ids = []
        for token in self.llm.generate([1], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                       reset=True):
            ids.append(int(token))
            if len(ids) == tokens:
                return ids
        return ids

    def close(self) -> None:
        self.llm.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def timed(fn: Callable[[], list[int]], device: str) -> tuple[float, list[int]]:
    _sync(device)
    t0 = time.perf_counter()
    ids = fn()
    _sync(device)
    return time.perf_counter() - t0, ids


def with_dtype(model: Llama, dtype: str) -> Llama:
    """CUDA generation precision: ``fp32`` as built, ``bf16`` weights (and caches), ``tf32`` fp32 weights with
    TF32 matmuls (set for the group by :func:`bench_one`)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    return model.to(torch.bfloat16) if dtype == "bf16" else model


def bench_one(shape: str, device: str, threads: int, tokens: int, variants: list[str],
              repeats: int = 1, run_c: str | None = None, dtype: str = "fp32") -> list[dict]:
    """Rows of one (shape, device, threads) group; the repeats go round-robin over the variants
    (a burst of load on a shared machine then hits every variant alike) and the fastest counts."""
    if device == "cpu":
        torch.set_num_threads(threads)
    model = with_dtype(build_model(shape, tokens, device), dtype if device != "cpu" else "fp32")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device != "cpu" and dtype == "tf32"
    hf = build_hf(model) if "hf" in variants else None
    # its own copy: switching one model between layouts would rebuild its decode weights every run
    torch_model = copy.deepcopy(model) if "kv_torch" in variants else None
    exact_model = copy.deepcopy(model) if "kv_exact" in variants else None
    if run_c and device == "cpu":
        variants = [*variants, "run_c" if threads == 1 else "run_c_omp"]
    runner = RunC(run_c, model, threads=threads) if {"run_c", "run_c_omp"} & set(variants) else None
    llamas: dict[str, LlamaCpp] = {}
    for name, dtype in (("llama_cpp", "f32"), ("llama_cpp_q8", "q8_0")):
        if name in variants:
            try:
                llamas[name] = LlamaCpp(model, threads, dtype)
            except ImportError:
                print(f"note: llama_cpp is not installed (pip install llama-cpp-python): no {name} column")
                variants = [v for v in variants if v != name]
    fns: dict[str, Callable[[int], list[int]]] = {
        "kv": lambda n: generate(model, [1], n, temperature=0.0),
        "kv_step": lambda n: generate(model, [1], n, temperature=0.0, static_decode=False),
        "kv_torch": lambda n: run_kv_torch(torch_model, n),
        "kv_exact": lambda n: run_kv_exact(exact_model, n),
        "kv_generic": lambda n: run_kv_generic(model, n),
        "recompute": lambda n: run_recompute(model, n),
        "hf": lambda n: run_hf(hf, n),
        "static": lambda n: run_static(model, n, "eager"),
        "cudagraph": lambda n: run_static(model, n, "cudagraph"),
        "compile": lambda n: run_static(model, n, "compile"),
        "run_c": lambda n: runner.run(n),
        "run_c_omp": lambda n: runner.run(n),
        "llama_cpp": lambda n: llamas["llama_cpp"].run(n),
        "llama_cpp_q8": lambda n: llamas["llama_cpp_q8"].run(n),
    }
    load_before = os.getloadavg()[0]  # other processes on the machine: the noise of this group
    runs: dict[str, list[tuple[float, list[int] | None]]] = {name: [] for name in variants}
    errors: dict[str, str] = {}
    for r in range(repeats):
        for name in variants:
            if name in errors:
                continue
            try:
                if r == 0:
                    fns[name](8 if name != "compile" else tokens)  # warm-up (compile: also traces)
                if name in ("run_c", "run_c_omp"):
                    runs[name].append((runner.run(tokens), None))
                else:
                    runs[name].append(timed(functools.partial(fns[name], tokens), device))
            except Exception as e:  # record and go on: one failing variant should not lose the table
                errors[name] = f"{type(e).__name__}: {e}"[:300]
    if runner is not None:
        runner.close()
    for llama in llamas.values():
        llama.close()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    rows, ref = [], None
    for name in variants:
        row = dict(shape=shape, device=device, threads=threads if device == "cpu" else None,
                   variant=name, tokens=tokens, dtype=dtype if device != "cpu" else "fp32")
        if name in errors:
            row.update(seconds=None, tok_s=None, error=errors[name])
        else:
            seconds, ids = min(runs[name], key=lambda run: run[0])
            if name == "kv":
                ref = ids
                weights = decode_weights(model)
                row.update(kernel=weights is not None and weights.kernel is not None)
            row.update(seconds=round(seconds, 4), tok_s=round(tokens / seconds, 1), repeats=repeats,
                       all_tok_s=[round(tokens / run[0], 1) for run in runs[name]],
                       median_tok_s=round(tokens / statistics.median(run[0] for run in runs[name]), 1),
                       load_avg_1min=load,
                       match=None if ref is None or ids is None or name == "kv" else ids == ref,
                       repeats_agree=all(run[1] == ids for run in runs[name]))
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict) -> str:
    where = row["device"] + (f" x{row['threads']}" if row["threads"] else f" {row.get('dtype', 'fp32')}")
    speed = (f"{row['tok_s']:>9.1f} | {row['median_tok_s']:>9.1f}" if row.get("tok_s")
             else "   failed |          ")
    extra = row.get("error") or ("" if row.get("match") is None else f"ids match kv: {row['match']}")
    if "kernel" in row:
        extra = f"compiled kernel: {row['kernel']}"
    return f"| {row['shape']:<11} | {where:<8} | {row['variant']:<12} | {speed} | {extra} |"


def _group(r: dict) -> tuple:
    return r["shape"], r["device"] + ("" if r["threads"] else " " + r.get("dtype", "fp32")), r["threads"]


def summary(rows: list[dict]) -> list[str]:
    """Ratios per (shape, device, threads): kv / recompute and kv / hf."""
    lines = []
    groups = {_group(r) for r in rows}
    for key in sorted(groups, key=str):
        speed = {r["variant"]: r.get("tok_s") for r in rows if _group(r) == key}
        kv = speed.get("kv")
        parts = [f"{v}: {kv / speed[v]:.2f}x" for v in ("llama_cpp", "llama_cpp_q8", "run_c", "run_c_omp", "recompute",
                                                          "hf", "kv_exact", "kv_torch", "kv_generic")
                 if kv and speed.get(v)]
        load = next((r.get("load_avg_1min") for r in rows if _group(r) == key
                     and r.get("load_avg_1min")), None)
        lines.append(f"{key[0]} {key[1]} threads={key[2]}: kv vs " + ", ".join(parts)
                     + (f" (load average {load[0]} -> {load[1]})" if load else ""))
    return lines


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="new tokens per run (default 256)")
    p.add_argument("--shapes", default="stories15m,stories110m", help="comma-separated presets")
    p.add_argument("--threads", default="1,all", help="CPU thread counts, comma-separated; 'all' = every core")
    p.add_argument("--devices", default="auto", help="cpu, cuda, or auto (cpu plus cuda when present)")
    p.add_argument("--variants", default="", help=f"subset of {','.join(CUDA_VARIANTS)} (default: all that apply)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per variant; the fastest counts")
    p.add_argument("--dtype", default="fp32",
                   help=f"CUDA precision(s), comma-separated, of {','.join(DTYPES)} (the CPU rows stay fp32)")
    p.add_argument("--quick", action="store_true", help="32 tokens, stories15m only, 1 thread")
    p.add_argument("--json", default=None, help="write the rows and run details to this JSON file")
    p.add_argument("--run-c", default=None, metavar="PATH",
                   help="llama2.c run.c source: adds the run_c variant (CPU, 1 thread) and run_c_omp "
                        "(OpenMP, the groups of more than one thread)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.shapes, args.threads = 32, "stories15m", "1"
    all_threads = os.cpu_count() or 1
    threads = [all_threads if t.strip() == "all" else int(t) for t in args.threads.split(",")]
    devices = ["cpu", "cuda"] if args.devices == "auto" else args.devices.split(",")
    devices = [d for d in devices if d != "cuda" or torch.cuda.is_available()]

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {all_threads} cores, "
          f"{args.tokens} new tokens, batch 1, greedy, fp32")
    print("| shape       | where    | variant    | best tok/s | median |   |")
    rows = []
    for device in devices:
        names = CPU_VARIANTS if device == "cpu" else CUDA_VARIANTS
        if args.variants:
            names = [v for v in args.variants.split(",") if v in names]
        for shape in args.shapes.split(","):
            for t in threads if device == "cpu" else [0]:
                for dtype in ["fp32"] if device == "cpu" else args.dtype.split(","):
                    rows += bench_one(shape, device, t, args.tokens, list(names), args.repeats, args.run_c, dtype)
    lines = summary(rows)
    print("\n".join(lines))
    if args.json:
        import transformers

        atomic_write_json(args.json, {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "llama_cpp_python": _version("llama_cpp_python"),
            "cpu_count": all_threads,
            "cuda_device": torch.cuda.get_device_name() if "cuda" in devices else None,
            "rows": rows, "summary": lines,
        })


if __name__ == "__main__":
    main()
