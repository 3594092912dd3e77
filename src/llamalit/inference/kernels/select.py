"""Kernel or PyTorch for fp32 CPU decoding: chosen by a short timed probe on this machine, cached with the kernel.

A kernel tuned on one CPU can lose to PyTorch's own decode step on another (issue 25: 89 against 135 tok/s on
one 2-core Xeon). So unless told, :func:`use_kernel` times both on a fixed small model of the stories15M layer
shape (about 0.3 s, at the first fp32 CPU decode of the process's first choice) and takes the faster. The
choice is cached as JSON beside the compiled library (one file per library, so per source, flags, compiler
and CPU) and per thread count; later processes read it back.

Override: ``LLAMALIT_DECODE_KERNEL=1`` (kernel), ``=0`` (PyTorch), ``=auto`` or unset (the probe), or
``decode_weights(model, kernel=True/False)`` in code. ``LLAMALIT_DECODE_PROBE=1`` re-runs the probe.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path

import torch

from llamalit.inference.kernels import ENV_SWITCH

log = logging.getLogger(__name__)

ENV_REPROBE = "LLAMALIT_DECODE_PROBE"
PROBE_VERSION = 2
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def switch() -> bool | None:
    """The environment's say: True (kernel), False (PyTorch), None (auto: the probe decides).

    Raises ValueError naming the variable for a value that is none of these."""
    value = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value in ("", "auto"):
        return None
    raise ValueError(f"{ENV_SWITCH}={value!r}: use 1 (the compiled kernel), 0 (PyTorch's decode) or auto")


def use_kernel(flag: bool | None, model: torch.nn.Module | None = None) -> bool:
    """Whether fp32 CPU decoding should take the compiled kernel: ``flag`` when given, else the environment
    (:func:`switch`), else the probe's cached choice for the current thread count. A model that is not fp32 on
    the CPU never takes the kernel, so no probe runs for it (True is returned: the kernel is simply not built)."""
    if flag is not None:
        return flag
    forced = switch()
    if forced is not None:
        return forced
    if model is not None and not all(p.dtype == torch.float32 and p.device.type == "cpu"
                                     for p in model.parameters()):
        return True
    return probe_choice(torch.get_num_threads())["kernel"]


@functools.cache
def probe_choice(threads: int) -> dict:
    """{"kernel": bool, "kernel_threads", "kernel_tok_s", "torch_tok_s", "threads", ...}: cached on disk beside
    the library. With more than one thread the kernel is also timed on one, and the faster team is kept."""
    from llamalit.inference.kernels import build_decode_kernel, load_decode_kernel

    lib = load_decode_kernel()
    if lib is None:
        return {"kernel": False, "reason": "the kernel does not build here"}
    path = _choice_path(build_decode_kernel(), threads)
    if os.environ.get(ENV_REPROBE, "") != "1":
        try:
            cached = json.loads(path.read_text())
            if cached.get("version") == PROBE_VERSION and isinstance(cached.get("kernel"), bool):
                return cached
        except (OSError, ValueError):
            pass
    with torch.inference_mode(False), torch.no_grad():  # generate() may ask from inside inference mode
        result = {**measure(), "threads": threads, "version": PROBE_VERSION}
    log.info("decode probe (%d threads): kernel %.0f tok/s, PyTorch %.0f tok/s: using %s", threads,
             result["kernel_tok_s"], result["torch_tok_s"], "the kernel" if result["kernel"] else "PyTorch")
    try:
        from llamalit.utils.fileio import atomic_write_json

        atomic_write_json(path, result)
    except OSError as e:  # a read-only cache: the choice holds for this process only
        log.warning("could not cache the decode probe's choice in %s: %s", path, e)
    return result


def _choice_path(lib_path: Path, threads: int) -> Path:
    return lib_path.with_name(f"{lib_path.stem}.choice-t{threads}.json")


def probe_model() -> torch.nn.Module:
    """The probe's model: stories15M's layer shape (dim 288, 6 heads, hidden 768), 2 layers, an 8000 head."""
    from llamalit.model.llama import Llama, ModelConfig

    with torch.random.fork_rng():  # the caller's random stream stays as it was
        torch.manual_seed(0)
        return Llama(ModelConfig(dim=288, n_layers=2, n_heads=6, n_kv_heads=6, vocab_size=8000,
                                 multiple_of=32, max_seq_len=64)).eval()


def measure(tokens: int = 24, rounds: int = 3) -> dict:
    """Best tokens/s of the kernel and of PyTorch's decode step on :func:`probe_model`, rounds alternating
    (a burst of load from other processes then hits both alike)."""
    from llamalit.inference.decode import DecodeWeights

    model = probe_model()
    paths = {"kernel": DecodeWeights(model, kernel=True), "torch": DecodeWeights(model, kernel=False)}
    if paths["kernel"].kernel is None:
        return {"kernel": False, "kernel_tok_s": 0.0, "torch_tok_s": 0.0}
    threads = torch.get_num_threads()
    runs = {"kernel": threads, "torch": threads}
    if threads > 1:  # a team waits for its slowest thread: on a busy machine one thread can be faster
        runs["kernel_1"] = 1
    best = {name: float("inf") for name in runs}
    kernel = paths["kernel"].kernel
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, n in runs.items():
                caches = model.new_caches(1)
                tok = torch.tensor([1])
                kernel.threads = n
                t0 = time.perf_counter()
                for pos in range(tokens):
                    logits = kernel.step(tok, pos, caches) if name != "torch" else paths["torch"].step(tok, pos, caches)
                    tok = logits.argmax(-1)
                if r:  # round 0 warms every path up
                    best[name] = min(best[name], time.perf_counter() - t0)
    rate = {name: tokens / seconds for name, seconds in best.items()}
    team = "kernel_1" if rate.get("kernel_1", 0.0) > rate["kernel"] else "kernel"
    return {"kernel": rate[team] >= rate["torch"], "kernel_threads": runs[team],
            "kernel_tok_s": round(rate[team], 1), "torch_tok_s": round(rate["torch"], 1),
            "all_tok_s": {name: round(v, 1) for name, v in rate.items()}}


def kernel_threads(flag: bool | None) -> int | None:
    """Threads the kernel should use: the probe's best team when it chose (``flag`` None, no environment
    switch), else None (torch's thread count)."""
    if flag is not None or switch() is not None:
        return None
    return probe_choice(torch.get_num_threads()).get("kernel_threads")
