"""A C++ CPU kernel for one-token fp32 decoding, compiled on first use and called through ctypes.

``decode_cpu.cpp`` runs a whole :func:`llamalit.inference.decode.decode_step` (embedding to logits) on
weights packed by :func:`pack_rows` into one arena on transparent huge pages (:func:`huge_page_arena`),
streaming each matrix once at close to memory bandwidth; greedy steps (:meth:`DecodeKernel.greedy`) return the argmax
of the logits without making them, reading an int8 copy of the output head and only the candidate rows in fp32. It is
built with the system C++ compiler (``$CXX``, else ``c++``; ``-O3 -march=native -fopenmp``) into ``$LLAMALIT_KERNEL_DIR``
(default ``~/.cache/llamalit/kernels``, mode 0700), one file per source, flags, compiler, CPU and torch version, with its
sha256 beside it: a cached library is loaded only from a directory only this user can write and only when its
sha256 is the recorded one (:func:`build_decode_kernel`). No compiler, or a failed build: :func:`load_decode_kernel`
logs why once and returns None, and decoding keeps the PyTorch path. ``LLAMALIT_DECODE_KERNEL=0``
turns the kernel off. A step's rows may sit at one position (``generate()``), at one column with their own RoPE
positions and first keys (left-padded batches: the harness), or each at a column of its own (the serving engine's
slots); batched products load each weight vector once for a block of rows.

The same library serves the harness's scoring on the CPU: attention for small heads (``llk_attention``,
:mod:`llamalit.inference.kernels.attention`) and the targets' log-probabilities (``llk_pick_logprobs``,
:mod:`llamalit.inference.kernels.logprobs`); the switch turns those off too.
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
import tempfile
from pathlib import Path

import torch

from llamalit.utils.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_cpu.cpp")
PANEL = 64  # rows per packed panel; PANEL in decode_cpu.cpp
ABI_VERSION = 9  # llk_abi_version() in decode_cpu.cpp
ENV_SWITCH = "LLAMALIT_DECODE_KERNEL"
SCREEN_SWITCH = "LLAMALIT_DECODE_SCREEN"  # 0: greedy steps read the whole fp32 head (no int8 screen)
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


def private_kernel_dir(path: Path | None = None) -> Path:
    """``path`` (default :func:`kernel_dir`), made with mode 0700 if absent, when only this user can write it.

    A library is loaded from a directory that nobody else can write (owned by this user, not group- or
    other-writable); otherwise one is built afresh in a new private temp directory, and a line says why.
    """
    path = Path(path or kernel_dir())
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.stat()
        problem = (f"owned by uid {st.st_uid}, not this user ({os.getuid()})" if st.st_uid != os.getuid() else
                   f"writable by others (mode {st.st_mode & 0o777:o})" if st.st_mode & 0o022 else None)
    except OSError as e:
        problem = f"not usable ({e})"
    if problem is None:
        return path
    fresh = Path(tempfile.mkdtemp(prefix="llamalit-kernels-"))
    log.warning("not loading a decode kernel from %s: it is %s; building one in %s instead (chmod 700 %s, or set "
                "LLAMALIT_KERNEL_DIR to a directory only you can write)", path, problem, fresh, path)
    return fresh


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trusted(lib: Path) -> bool:
    """Whether ``lib`` is the library this build wrote: its sha256 is the one recorded beside it at build time."""
    record = lib.with_name(lib.name + ".sha256")
    try:
        return lib.is_file() and record.read_text().strip() == _sha256(lib)
    except OSError:
        return False


def build_decode_kernel(out_dir: Path | None = None) -> Path:
    """Compile decode_cpu.cpp (if not already cached) and return the shared library's path.

    The library's name is a hash of the source, flags, compiler, CPU and torch version; a cached one is used
    only from a directory only this user can write (:func:`private_kernel_dir`) and when its sha256 matches the
    one recorded beside it (``NAME.so.sha256``) when it was built: anything else is rebuilt.
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
        [source, " ".join(_FLAGS).encode(), version.encode(), _cpu_tag().encode(),
         torch.__version__.encode()])).hexdigest()[:16]
    lib = private_kernel_dir(out_dir) / f"decode_cpu-{key}.so"
    if trusted(lib):
        return lib
    if lib.exists():
        log.warning("%s does not match the sha256 recorded when it was built: rebuilding it", lib)
    log.info("compiling the llamalit decode kernel into %s", lib)
    errors = []
    for extra in (["-fopenmp"], []):  # no OpenMP (e.g. clang without libomp): one thread only
        try:
            with atomic_path(lib) as tmp:  # a failed build raises here: no half-written library
                cmd = [cxx, *_FLAGS, *extra, "-o", str(tmp), str(SOURCE)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise _BuildError(f"$ {' '.join(cmd)}\n{done.stderr.strip()[-2000:]}")
                digest = _sha256(tmp)
            atomic_write_text(lib.with_name(lib.name + ".sha256"), digest + "\n")
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
    # plain addresses (ints): the per-token call converts no ctypes objects
    _vp = ctypes.c_void_p
    lib.llk_step.argtypes = [_vp, _vp, _i64, _i64, _vp, _vp, _vp, ctypes.c_int, _vp, _vp, _vp, _vp]
    lib.llk_step.restype = _i64
    lib.llk_exp.argtypes = [_vp, _i64, _vp]
    lib.llk_exp.restype = None
    lib.llk_advise_huge.argtypes = [_vp, _i64]
    lib.llk_advise_huge.restype = ctypes.c_int
    lib.llk_attention.argtypes = [_vp, *[_i64] * 3, _vp, *[_i64] * 3, _vp, *[_i64] * 3, _vp, *[_i64] * 3, _vp,
                                  *[_i64] * 6, ctypes.c_float, ctypes.c_int]
    lib.llk_attention.restype = None
    lib.llk_pick_logprobs.argtypes = [_vp, _i64, _i64, _vp, _vp, _vp, ctypes.c_int]
    lib.llk_pick_logprobs.restype = None
    return lib


class _Model(ctypes.Structure):
    """LlkModel in decode_cpu.cpp."""

    _fields_ = [(name, _i64) for name in ("dim", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                          "vocab", "max_seq_len")] + [
        ("eps", ctypes.c_float), ("embedding", _f32p), ("layers", _P(_f32p)), ("norm", _f32p),
        ("output", _f32p), ("cos", _f32p), ("sin", _f32p), ("stream_output", _i64),
        ("output_q", ctypes.c_void_p), ("output_scale", ctypes.c_void_p)]


def _ptr(t: torch.Tensor) -> ctypes._Pointer:
    return ctypes.cast(t.data_ptr(), _f32p)


def pack_rows(w: torch.Tensor) -> torch.Tensor:
    """W (rows, n) as panels of PANEL rows stored input-major: (ceil(rows / PANEL), n, PANEL), zero-padded."""
    rows, n = w.shape
    panels = -(-rows // PANEL)
    padded = torch.zeros(panels * PANEL, n, dtype=w.dtype, device=w.device)
    padded[:rows] = w
    return padded.view(panels, PANEL, n).transpose(1, 2).contiguous()


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (rows, n), scale float32 (rows,)) with w ~ scale[:, None] * q: per row, scale = max|w| / 127 and
    q = w / scale rounded to nearest (|w - scale q| <= scale / 2, the bound the kernel's greedy screen uses)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.where(scale[:, None] > 0, w / scale[:, None], torch.zeros((), dtype=w.dtype))
    return q.round().clamp(-127, 127).to(torch.int8), scale.contiguous()


def screen_bound_holds(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether every row keeps the bounds the kernel's greedy screen assumes (checked in float64):
    ``|w - scale q| <= scale / 2 (1 + 2^-10)`` and ``|w| <= 127 scale (1 + 2^-10)``. Fails only for
    weights near the float32 underflow (a subnormal or zero scale on a nonzero row)."""
    w, s = w.detach().double(), scale.double()[:, None]
    slack = 1 + 2.0 ** -10
    return bool(((w - s * q.double()).abs() <= s * 0.5 * slack).all() and (w.abs() <= s * 127 * slack).all())


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


STREAM_OUTPUT_BYTES = 8 << 20  # output heads this large are read with non-temporal prefetches
HUGE_PAGE = 2 << 20  # bytes: a transparent huge page on x86-64 / most arm64 kernels


def huge_page_arena(numel: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """An uninitialised float32 buffer of ``numel`` starting on a 2 MiB boundary, advised for huge pages.

    Must be filled after this call (the advice applies to pages not yet touched). ``lib`` is the
    kernel library (for ``llk_advise_huge``); without it, or where the OS refuses, plain pages.
    """
    span = -(-numel * 4 // HUGE_PAGE) * HUGE_PAGE
    buf = torch.empty((span + HUGE_PAGE) // 4)
    start = (-buf.data_ptr() % HUGE_PAGE) // 4
    if lib is not None:
        lib.llk_advise_huge(buf.data_ptr() + start * 4, span)
    return buf[start:start + numel]  # the view keeps the whole buffer alive


def vexp(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` (float32, CPU) through the kernel's vectorised exp; needs the kernel loaded."""
    lib = load_decode_kernel()
    if lib is None:
        raise RuntimeError("the decode kernel is not available (see the warning logged above)")
    x = x.float().contiguous()
    out = torch.empty_like(x)
    lib.llk_exp(x.data_ptr(), x.numel(), out.data_ptr())
    return out


def screen_enabled(flag: bool | None = None) -> bool:
    """``flag`` when given, else ``LLAMALIT_DECODE_SCREEN`` (0 means: no int8 screen of the output head)."""
    if flag is not None:
        return flag
    return os.environ.get(SCREEN_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


class DecodeKernel:
    """Packed weights of one fp32 CPU model and the compiled step over them.

    ``layers`` holds, per layer, (attention_norm weight, wq|wk|wv, wo, ffn_norm weight, w1|w3, w2)
    as plain (out, in) matrices; they are packed here, in the order the step reads them, into one
    2 MiB-aligned arena on transparent huge pages (one copy of the weights). The tensors whose
    pointers the kernel reads are kept alive by this object. ``screen`` (default: on unless
    ``LLAMALIT_DECODE_SCREEN=0``, and only for a finite head) adds an int8 copy of the output head
    (a quarter of its bytes) that :meth:`greedy` reads instead of the fp32 head, recomputing in fp32
    only the rows it cannot rule out: the same ids as the argmax of :meth:`step`'s logits.
    """

    def __init__(self, lib: ctypes.CDLL, *, dim: int, hidden: int, n_heads: int, n_kv_heads: int,
                 eps: float, embedding: torch.Tensor, layers: list[tuple[torch.Tensor, ...]],
                 norm: torch.Tensor, output: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 stream_output: bool | None = None, screen: bool | None = None):
        self.lib = lib
        if stream_output is None:  # only worth it when the head would push the layers out of the cache
            stream_output = output.numel() * 4 >= STREAM_OUTPUT_BYTES
        mats = [w for layer in layers for w in (layer[1], layer[2], layer[4], layer[5])] + [output]
        if any(t.dtype != torch.float32 or t.device.type != "cpu"
               for t in [embedding, norm, cos, sin, *mats, *(w for layer in layers for w in layer)]):
            raise ValueError("DecodeKernel: every weight must be a float32 CPU tensor")
        sizes = [-(-w.shape[0] // PANEL) * PANEL * w.shape[1] for w in mats]
        q = None
        self.output_scale: torch.Tensor | None = None
        with torch.no_grad():
            if screen_enabled(screen) and bool(torch.isfinite(output).all()):
                q, self.output_scale = quantize_rows(output)
                if not screen_bound_holds(output, q, self.output_scale):  # weights near float32 underflow
                    q = self.output_scale = None
        screen = q is not None
        q_size = -(-sizes[-1] // 4) if screen else 0  # the int8 head, in floats, between the layers and the head
        self.arena = huge_page_arena(sum(sizes) + q_size, lib)
        packed, offset = [], 0
        self.output_q: torch.Tensor | None = None
        with torch.no_grad():
            for i, (w, size) in enumerate(zip(mats, sizes)):  # one matrix at a time: no second full copy
                if i == len(mats) - 1 and screen:  # greedy steps read it right after the layers
                    self.output_q = self.arena[offset:offset + q_size].view(torch.int8)[:size]
                    self.output_q.copy_(pack_rows(q).view(-1))
                    offset += q_size
                dst = self.arena[offset:offset + size]
                dst.copy_(pack_rows(w).view(-1))
                packed.append(dst)
                offset += size
            self.small = [embedding.contiguous(), norm.contiguous(), cos.contiguous(), sin.contiguous()]
            self.norms = [t.contiguous() for layer in layers for t in (layer[0], layer[3])]
        per_layer = [t for i in range(len(layers)) for t in (
            self.norms[2 * i], packed[4 * i], packed[4 * i + 1], self.norms[2 * i + 1],
            packed[4 * i + 2], packed[4 * i + 3])]
        self.layer_ptrs = (_f32p * len(per_layer))(*[_ptr(t) for t in per_layer])
        self.vocab, self.n_kv_heads, self.head_dim = output.shape[0], n_kv_heads, dim // n_heads
        self.n_layers, self.max_seq_len = len(layers), cos.shape[0]
        emb, nrm, cos_, sin_ = self.small
        self.model = _Model(dim, hidden, len(layers), n_heads, n_kv_heads, self.head_dim, self.vocab,
                            self.max_seq_len, eps, _ptr(emb), self.layer_ptrs, _ptr(nrm), _ptr(packed[-1]),
                            _ptr(cos_), _ptr(sin_), int(stream_output),
                            self.output_q.data_ptr() if screen else None,
                            self.output_scale.data_ptr() if screen else None)
        self._model_addr = ctypes.addressof(self.model)
        self._bound: tuple | None = None  # the caches last checked, and their pointer arrays
        self.threads: int | None = None  # threads a step uses (kernels.select's probe); None: torch's count
        self.screen = screen
        self.exact_rows = 0  # fp32 head rows read by the last greedy step (the screen's candidates' strips)
        self._scratch: torch.Tensor | None = None  # greedy steps' logits scratch (B, vocab)

    def huge_pages(self) -> bool:
        """Whether the packed weights' memory is (at least partly) on transparent huge pages (Linux)."""
        start, end = self.arena.data_ptr(), self.arena.data_ptr() + self.arena.numel() * 4
        try:
            with open("/proc/self/smaps") as f:
                inside = False
                for line in f:
                    head = line.split(" ", 1)[0]
                    if "-" in head and not head.endswith(":"):
                        lo, hi = (int(x, 16) for x in head.split("-"))
                        inside = lo < end and start < hi
                    elif inside and head == "AnonHugePages:" and int(line.split()[1]) > 0:
                        return True
        except OSError:
            pass
        return False

    def _bind(self, caches: list) -> tuple | None:
        """(batch, k pointer array, v pointer array) for these caches, or None when they do not fit.

        The full check runs when the cache tensors change; a generation loop passing the same
        caches again costs only an identity check per tensor.
        """
        tensors = [t for c in caches for t in (c.k, c.v)]
        bound = self._bound
        if bound is not None and len(tensors) == len(bound[0]) and all(
                t is u and t.data_ptr() == p for t, u, p in zip(tensors, bound[0], bound[1])):
            return bound[2]
        shape = (self.n_kv_heads, self.max_seq_len, self.head_dim)
        if len(caches) != self.n_layers or not all(
                t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                and tuple(t.shape[1:]) == shape and t.shape[0] == tensors[0].shape[0] for t in tensors):
            return None
        k = (_f32p * len(caches))(*[_ptr(t) for t in tensors[0::2]])
        v = (_f32p * len(caches))(*[_ptr(t) for t in tensors[1::2]])
        bind = (tensors[0].shape[0], k, v, ctypes.addressof(k), ctypes.addressof(v))
        self._bound = (tensors, [t.data_ptr() for t in tensors], bind)
        return bind

    def accepts(self, caches: list) -> bool:
        """True when the caches are float32, contiguous, on the CPU and shaped for this model."""
        return self._bind(caches) is not None

    def step(self, tok: torch.Tensor, pos: int | torch.Tensor, caches: list, rope_pos: torch.Tensor | None = None,
             first_key: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab) for token ids ``tok`` (B,) at ``pos``; k and v of ``pos`` go into ``caches``.

        ``pos``: one cache column for every row, or (B,) a column per row (continuous batching: each row is
        also at that RoPE position and sees columns ``0..pos[b]``).
        Left-padded rows: ``rope_pos`` (B,) is each row's RoPE position (default ``pos``) and ``first_key``
        (B,) the first cache column it attends to (default 0): row b sees columns ``first_key[b]..pos``."""
        logits = self.try_step(tok, pos, caches, rope_pos, first_key)
        if logits is None:
            raise ValueError("the caches do not fit the decode kernel: they must be float32, contiguous, on "
                             f"the CPU, one per layer ({self.n_layers}), each (B, {self.n_kv_heads}, "
                             f"{self.max_seq_len}, {self.head_dim})")
        return logits

    def _checked(self, tok: torch.Tensor, pos: int | torch.Tensor, caches: list, rope_pos: torch.Tensor | None = None,
                 first_key: torch.Tensor | None = None) -> tuple[tuple, int, ctypes.Array, int, list] | None:
        """(the caches' binding, batch, the ids as a C array, the highest position, [``rope_pos``, ``first_key``,
        per-row ``pos``] as contiguous CPU int64 tensors or None) for a step at ``pos``, or None when the caches
        do not fit; a position, id or per-row value out of range, or a batch the caches do not hold, is a
        ValueError."""
        row_pos = None
        if isinstance(pos, torch.Tensor):
            row_pos = self._rows("pos", pos, tok.shape[0], self.max_seq_len - 1)
            pos = int(row_pos.max()) if len(row_pos) else 0
        if not 0 <= pos < self.max_seq_len:
            raise ValueError(f"position {pos} is outside 0..{self.max_seq_len - 1}")
        bind = self._bind(caches)
        if bind is None:
            return None
        ids = tok.tolist()
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab:
            raise ValueError(f"token ids must be in 0..{self.vocab - 1}, got {ids}")
        if bind[0] != len(ids):
            raise ValueError(f"caches hold batch {bind[0]}, tokens have {len(ids)} rows")
        rows = [None if t is None else self._rows(name, t, len(ids), hi)
                for name, t, hi in (("rope_pos", rope_pos, self.max_seq_len - 1), ("first_key", first_key, pos))]
        if row_pos is not None and rows[1] is not None and bool((rows[1] > row_pos).any()):
            raise ValueError(f"first_key must not pass each row's pos, got {rows[1].tolist()} > {row_pos.tolist()}")
        return bind, len(ids), (_i64 * len(ids))(*ids), pos, [*rows, row_pos]

    @staticmethod
    def _rows(name: str, t: torch.Tensor, batch: int, hi: int) -> torch.Tensor:
        """``t`` as a contiguous CPU int64 (batch,) tensor of values in 0..hi; else a ValueError naming it."""
        t = t.to("cpu", torch.int64).contiguous()
        if t.shape != (batch,) or (batch and not 0 <= int(t.min()) <= int(t.max()) <= hi):
            raise ValueError(f"{name} must be ({batch},) values in 0..{hi}, got {t.tolist()}")
        return t

    def try_step(self, tok: torch.Tensor, pos: int | torch.Tensor, caches: list,
                 rope_pos: torch.Tensor | None = None, first_key: torch.Tensor | None = None) -> torch.Tensor | None:
        """:meth:`step`, or None (nothing done) when the caches do not fit (:meth:`accepts`)."""
        checked = self._checked(tok, pos, caches, rope_pos, first_key)
        if checked is None:
            return None
        bind, batch, ids_c, top, rows = checked
        logits = torch.empty(batch, self.vocab)
        self.lib.llk_step(self._model_addr, ctypes.addressof(ids_c), batch, top, bind[3], bind[4],
                          logits.data_ptr(), self.threads or torch.get_num_threads(), None, *_addresses(rows))
        return logits

    def greedy(self, tok: torch.Tensor, pos: int | torch.Tensor, caches: list, out: torch.Tensor,
               rope_pos: torch.Tensor | None = None, first_key: torch.Tensor | None = None) -> bool:
        """Greedy next ids into ``out`` (B,) int64 (may be ``tok`` itself): the argmax of :meth:`step`'s logits,
        without making them (screened by the int8 head when :attr:`screen`). False (nothing done) when the
        caches do not fit (:meth:`accepts`). ``pos``, ``rope_pos``, ``first_key``: as in :meth:`step`."""
        checked = self._checked(tok, pos, caches, rope_pos, first_key)
        if checked is None:
            return False
        bind, batch, ids_c, top, rows = checked
        if out.dtype != torch.int64 or out.shape != (batch,) or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"greedy: out must be a contiguous CPU int64 tensor of shape ({batch},)")
        scratch = self._scratch
        if scratch is None or scratch.shape[0] != batch:
            scratch = self._scratch = torch.empty(batch, self.vocab)
        self.exact_rows = self.lib.llk_step(self._model_addr, ctypes.addressof(ids_c), batch, top, bind[3], bind[4],
                                            scratch.data_ptr(), self.threads or torch.get_num_threads(),
                                            out.data_ptr(), *_addresses(rows))
        return True


def _addresses(rows: list[torch.Tensor | None]) -> list[int | None]:
    """Data addresses of the optional per-row int64 arrays (None: a null pointer)."""
    return [None if t is None else t.data_ptr() for t in rows]
