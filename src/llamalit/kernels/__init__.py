"""A C++ CPU kernel for one-token fp32 decoding, compiled on first use and called through ctypes.

``decode_cpu.cpp`` runs a whole :meth:`llamalit.model.Llama.decode_step` (embedding to logits) on
weights packed by :func:`pack_rows`, streaming each matrix once at close to memory bandwidth. It is
built with the system C++ compiler (``$CXX``, else ``c++``; ``-O3 -march=native -fopenmp``, under a
second on the dev CPU) into ``$LLAMALIT_KERNEL_DIR`` (default ``~/.cache/llamalit/kernels``), one
file per source, flags, compiler and CPU. No compiler, or a failed build: :func:`load_decode_kernel`
logs why once and returns None, and decoding keeps the PyTorch path. ``LLAMALIT_DECODE_KERNEL=0``
turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from llamalit.fileio import atomic_path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_cpu.cpp")
PANEL = 64  # rows per packed panel; PANEL in decode_cpu.cpp
ABI_VERSION = 1  # llk_abi_version() in decode_cpu.cpp
ENV_SWITCH = "LLAMALIT_DECODE_KERNEL"
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17"]
_P = ctypes.POINTER
_i64, _f32p = ctypes.c_int64, _P(ctypes.c_float)


def kernel_enabled(flag: bool | None = None) -> bool:
    """``flag`` when given, else the environment switch (``LLAMALIT_DECODE_KERNEL=0`` means off)."""
    if flag is not None:
        return flag
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def kernel_dir() -> Path:
    """Where built kernels are cached: ``$LLAMALIT_KERNEL_DIR``, else ``$XDG_CACHE_HOME/llamalit/kernels``."""
    if os.environ.get("LLAMALIT_KERNEL_DIR"):
        return Path(os.environ["LLAMALIT_KERNEL_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "llamalit" / "kernels"


def _cpu_tag() -> str:
    """The CPU's feature flags: a library built with -march=native must not run on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_decode_kernel(out_dir: Path | None = None) -> Path:
    """Compile decode_cpu.cpp (if not already cached) and return the shared library's path.

    Raises RuntimeError naming the compiler and its output when no compiler is found or it fails.
    """
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"C++ compiler {cxx!r} does not run: {e}") from e
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join(
        [source, " ".join(_FLAGS).encode(), version.encode(), _cpu_tag().encode()])).hexdigest()[:16]
    lib = (out_dir or kernel_dir()) / f"decode_cpu-{key}.so"
    if lib.exists():
        return lib
    log.info("compiling the llamalit decode kernel into %s", lib)
    errors = []
    for extra in (["-fopenmp"], []):  # no OpenMP (e.g. clang without libomp): one thread only
        try:
            with atomic_path(lib) as tmp:  # a failed build raises here: no half-written library
                cmd = [cxx, *_FLAGS, *extra, "-o", str(tmp), str(SOURCE)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise _BuildError(f"$ {' '.join(cmd)}\n{done.stderr.strip()[-2000:]}")
            return lib
        except _BuildError as e:
            errors.append(str(e))
    raise RuntimeError("compiling the decode kernel failed:\n" + "\n".join(errors))


class _BuildError(Exception):
    pass


@functools.cache
def load_decode_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, built on first use; None (logged once) when it cannot be built."""
    try:
        lib = ctypes.CDLL(str(build_decode_kernel()))
        if lib.llk_abi_version() != ABI_VERSION:
            raise RuntimeError(f"kernel ABI {lib.llk_abi_version()} != {ABI_VERSION}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("llamalit decode kernel unavailable, using the PyTorch path "
                    "(LLAMALIT_DECODE_KERNEL=0 skips the attempt): %s", e)
        return None
    lib.llk_gemv.argtypes = [_f32p, _i64, _i64, _f32p, _i64, _f32p, ctypes.c_int, ctypes.c_int]
    lib.llk_gemv.restype = None
    lib.llk_step.argtypes = [_P(_Model), _P(_i64), _i64, _i64, _P(_f32p), _P(_f32p), _f32p, ctypes.c_int]
    lib.llk_step.restype = None
    return lib


class _Model(ctypes.Structure):
    """LlkModel in decode_cpu.cpp."""

    _fields_ = [(name, _i64) for name in ("dim", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                          "vocab", "max_seq_len")] + [
        ("eps", ctypes.c_float), ("embedding", _f32p), ("layers", _P(_f32p)), ("norm", _f32p),
        ("output", _f32p), ("cos", _f32p), ("sin", _f32p)]


def _ptr(t: torch.Tensor) -> ctypes._Pointer:
    return ctypes.cast(t.data_ptr(), _f32p)


def pack_rows(w: torch.Tensor) -> torch.Tensor:
    """W (rows, n) as panels of PANEL rows stored input-major: (ceil(rows / PANEL), n, PANEL), zero-padded."""
    rows, n = w.shape
    panels = -(-rows // PANEL)
    padded = torch.zeros(panels * PANEL, n, dtype=w.dtype, device=w.device)
    padded[:rows] = w
    return padded.view(panels, PANEL, n).transpose(1, 2).contiguous()


def gemv(x: torch.Tensor, packed: torch.Tensor, rows: int) -> torch.Tensor:
    """``x @ W.T`` for x (B, n) float32 and ``packed = pack_rows(W)``; needs the kernel loaded."""
    lib = load_decode_kernel()
    if lib is None:
        raise RuntimeError("the decode kernel is not available (see the warning logged above)")
    x = x.float().contiguous()
    if packed.dtype != torch.float32 or packed.shape[1] != x.shape[1] or packed.shape[0] * PANEL < rows:
        raise ValueError(f"gemv: packed {tuple(packed.shape)} does not fit x {tuple(x.shape)}, rows={rows}")
    y = torch.empty(x.shape[0], rows)
    lib.llk_gemv(_ptr(x), x.shape[0], x.shape[1], _ptr(packed), rows, _ptr(y), 0, torch.get_num_threads())
    return y


class DecodeKernel:
    """Packed weights of one fp32 CPU model and the compiled step over them.

    ``layers`` holds, per layer, (attention_norm weight, wq|wk|wv, wo, ffn_norm weight, w1|w3, w2)
    as plain (out, in) matrices; they are packed here (one copy of the weights). The tensors whose
    pointers the kernel reads are kept alive by this object.
    """

    def __init__(self, lib: ctypes.CDLL, *, dim: int, hidden: int, n_heads: int, n_kv_heads: int,
                 eps: float, embedding: torch.Tensor, layers: list[tuple[torch.Tensor, ...]],
                 norm: torch.Tensor, output: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        self.lib = lib
        with torch.no_grad():
            self.keep = [embedding.contiguous(), norm.contiguous(), pack_rows(output),
                         cos.contiguous(), sin.contiguous()]
            for an, wqkv, wo, fn, w13, w2 in layers:
                self.keep += [an.contiguous(), pack_rows(wqkv), pack_rows(wo), fn.contiguous(),
                              pack_rows(w13), pack_rows(w2)]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in self.keep):
            raise ValueError("DecodeKernel: every weight must be a float32 CPU tensor")
        self.layer_ptrs = (_f32p * (len(self.keep) - 5))(*[_ptr(t) for t in self.keep[5:]])
        self.vocab, self.n_kv_heads, self.head_dim = output.shape[0], n_kv_heads, dim // n_heads
        self.max_seq_len = cos.shape[0]
        self.model = _Model(dim, hidden, len(layers), n_heads, n_kv_heads, self.head_dim, self.vocab,
                            self.max_seq_len, eps, _ptr(self.keep[0]), self.layer_ptrs,
                            _ptr(self.keep[1]), _ptr(self.keep[2]), _ptr(self.keep[3]), _ptr(self.keep[4]))

    def accepts(self, caches: list) -> bool:
        """True when the caches are float32, contiguous, on the CPU and shaped for this model."""
        shape = (self.n_kv_heads, self.max_seq_len, self.head_dim)
        return len(caches) == len(self.layer_ptrs) // 6 and all(
            t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
            and tuple(t.shape[1:]) == shape
            for c in caches for t in (c.k, c.v))

    def step(self, tok: torch.Tensor, pos: int, caches: list) -> torch.Tensor:
        """Logits (B, vocab) for token ids ``tok`` (B,) at ``pos``; k and v of ``pos`` go into ``caches``."""
        tok = tok.to(torch.int64).contiguous()
        if not 0 <= pos < self.max_seq_len:
            raise ValueError(f"position {pos} is outside 0..{self.max_seq_len - 1}")
        if tok.numel() and not 0 <= int(tok.min()) <= int(tok.max()) < self.vocab:
            raise ValueError(f"token ids must be in 0..{self.vocab - 1}, got {tok.tolist()}")
        batch = tok.shape[0]
        if any(c.k.shape[0] != batch for c in caches):
            raise ValueError(f"caches hold batch {caches[0].k.shape[0]}, tokens have {batch} rows")
        k = (_f32p * len(caches))(*[_ptr(c.k) for c in caches])
        v = (_f32p * len(caches))(*[_ptr(c.v) for c in caches])
        logits = torch.empty(batch, self.vocab)
        self.lib.llk_step(ctypes.byref(self.model), ctypes.cast(tok.data_ptr(), _P(_i64)), batch, pos,
                          k, v, _ptr(logits), torch.get_num_threads())
        return logits
