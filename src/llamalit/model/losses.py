"""Output head + cross-entropy without materialising the (N, vocab) logits.

``linear_cross_entropy(hidden, weight, targets)`` is ``F.cross_entropy(hidden @ weight.T, targets)``
(mean over the N counted rows) computed one of these ways:

* ``"plain"``: ``F.linear`` + ``F.cross_entropy``, the reference; holds N x V logits (and their grad).
* ``"compiled"``: the plain loss, meant to be traced into the training step's one compiled graph (as
  llama2.c does): the model hands it every position with IGNORE_INDEX targets masked (static shapes), and
  inductor fuses the float32 log-softmax into one pass over the logits, so no float32 copy is kept.
* ``"chunked"``: an autograd Function that walks ``chunk_size`` rows at a time (logits chunk ->
  float32 log-softmax -> loss) and computes that chunk's grads wrt ``hidden`` and ``weight`` right
  away, like liger-kernel's FusedLinearCrossEntropy; backward only scales the stored grads by
  ``grad_output``. Extra memory ~ chunk_size x V (plus one V x D float32 weight-grad accumulator).
* ``"liger"``: liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` (CUDA only, ``pip install liger-kernel``).
* ``"cce"``: Apple's cut-cross-entropy ``linear_cross_entropy`` (CUDA only, ``pip install cut-cross-entropy``).
* ``"auto"``: chunked when N * V > ``AUTO_CHUNK_ELEMENTS``, else plain. :func:`resolve_loss_impl` picks a
  concrete impl for a run (device, compiled or not); ``scripts/bench_loss.py`` measures the choice on a GPU.

Only ``plain`` and ``compiled`` accept IGNORE_INDEX targets (the mean is over the others).

Mixed precision follows the plain path under ``torch.autocast``: the matmuls run in the autocast dtype,
log-softmax and the loss in float32, grads come back in hidden's / weight's dtypes. The loss dtype is
float32 (float64 when the matmul runs in float64). Nothing here syncs with the host (no ``.item()``)
except inside liger-kernel itself (an ``.item()`` in its forward, a ``torch.equal`` in its backward).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index; the label shards use the same value
IMPLS = ("auto", "plain", "compiled", "chunked", "liger", "cce")
_PIP = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}
_MODULE = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}
# Default chunk: about 2**23 logits (32 MiB in float32), i.e. 262 rows at V = 32000. On the CPU
# (docs/bench_loss.md) 262..524 rows are fastest; 128 rows pays per-chunk V x D weight-grad traffic,
# 1024 rows is slower again and holds 4x the memory.
CHUNK_ELEMENTS = 2**23
# "auto" goes chunked above this many logits (N * V), i.e. once there is more than one default chunk:
# on the CPU (docs/bench_loss.md) chunked is as fast as plain (within noise) at every N from 32 to
# 13401 rows, and at or below one chunk it is the same computation with no memory to save.
AUTO_CHUNK_ELEMENTS = CHUNK_ELEMENTS
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


class LossOutput(NamedTuple):
    loss: torch.Tensor  # mean cross-entropy, 0-dim float32 (float64 for float64 inputs)
    correct: torch.Tensor | None  # 0-dim long: rows whose argmax is the target; None unless accuracy=True


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk so that a chunk's logits hold about ``CHUNK_ELEMENTS`` (2**23) elements."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


@functools.cache
def impl_available(impl: str) -> bool:
    """True when the optional package behind ``impl`` (liger, cce) imports; True for the built-in impls."""
    if impl not in _MODULE:
        return True
    try:
        importlib.import_module(_MODULE[impl])
    except ImportError:
        return False
    return True


def liger_available() -> bool:
    """True when ``import liger_kernel`` works."""
    return impl_available("liger")


def _require(impl: str, hidden: torch.Tensor) -> None:
    """A clear error when an optional impl's package is missing or the tensors are not on CUDA."""
    if not impl_available(impl):
        raise ImportError(f"linear_cross_entropy(impl={impl!r}) / loss_impl={impl} needs the {_PIP[impl]} "
                          f"package: pip install {_PIP[impl]}")
    if hidden.device.type != "cuda":
        raise ValueError(f"linear_cross_entropy(impl={impl!r}) needs CUDA tensors, got {hidden.device}; "
                         "use impl='chunked' or 'auto'")


def resolve_loss_impl(setting: str, device_type: str, compiled: bool) -> str:
    """The concrete ``loss_impl`` of a run: ``setting`` as given (checked), or for ``auto``: the plain loss
    traced into the one compiled training step (``compiled``) when the step is compiled, on any device
    (llama2.c's approach); uncompiled, ``plain`` on CUDA and ``chunked`` elsewhere (on the CPU as fast as
    plain, and it never holds the N x V logits).

    ``scripts/bench_loss.py --device cuda`` measures compiled vs chunked vs liger vs cce and prints what
    ``auto`` should pick on that GPU.
    """
    if setting not in IMPLS:
        raise ValueError(f"loss_impl={setting!r}: choose one of {', '.join(IMPLS)}")
    if setting in _PIP:
        if not impl_available(setting):
            raise ImportError(f"loss_impl={setting} needs the {_PIP[setting]} package: pip install {_PIP[setting]}")
        if device_type != "cuda":
            raise ValueError(f"loss_impl={setting} runs on CUDA only, this run is on {device_type}; "
                             "use loss_impl=auto or chunked")
    if setting != "auto":
        return setting
    if compiled:
        return "compiled"
    return "plain" if device_type == "cuda" else "chunked"


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype F.linear would use here: the autocast dtype when autocast applies, else the common one."""
    device = hidden.device.type
    hd, wd = hidden.dtype, weight.dtype
    if torch.is_autocast_enabled(device):
        cast = torch.get_autocast_dtype(device)
        hd = cast if hd in _AUTOCAST_ELIGIBLE else hd
        wd = cast if wd in _AUTOCAST_ELIGIBLE else wd
    if hd != wd:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; "
                         "cast one of them or run under torch.autocast")
    return hd


def _check_shapes(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden must be (N, D) and weight (V, D); got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.long:
        raise ValueError(f"linear_cross_entropy: targets must be a long tensor of shape ({hidden.shape[0]},); "
                         f"got {targets.dtype} {tuple(targets.shape)} (drop IGNORE_INDEX rows first)")


def _chunked_forward(hidden, weight, targets, chunk, cdtype, need_h, need_w, accuracy):
    """Loss sum -> mean, correct count, and (unscaled) grads wrt hidden and weight, ``chunk`` rows at a time."""
    n = hidden.shape[0]
    acc = torch.promote_types(cdtype, torch.float32)
    w = weight.detach().to(cdtype)
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
    grad_w = None  # the first chunk's product starts it (no zero-filled V x D pass)
    for s in range(0, n, chunk):
        h = hidden[s:s + chunk].detach().to(cdtype)
        t = targets[s:s + chunk]
        logits = (h @ w.T).to(acc)  # (c, V): the only chunk-sized tensors are this one and its softmax
        if accuracy:
            correct += (logits.argmax(1) == t).sum()
        target_logit = logits.gather(1, t[:, None])
        row_max = logits.amax(1, keepdim=True)
        e = logits.sub_(row_max).exp_()  # in place: no second chunk-sized tensor
        row_sum = e.sum(1, keepdim=True)
        loss_sum += (row_sum.log() + row_max - target_logit).sum()  # logsumexp - target logit
        if not (need_h or need_w):
            continue
        g = e.mul_(row_sum.reciprocal_().div_(n))  # softmax / n
        g[torch.arange(t.shape[0], device=t.device), t] -= 1.0 / n
        g = g.to(cdtype)  # d(mean loss)/d(logits), in the matmul dtype as autocast's backward has it
        if need_h:
            grad_h[s:s + chunk] = g @ w
        if need_w:
            if grad_w is None:
                grad_w = (g.T @ h).to(acc)
            elif g.dtype == acc:
                grad_w.addmm_(g.T, h)
            else:
                grad_w.add_(g.T @ h)  # per-chunk product in cdtype, accumulated across chunks in float32
    if need_w and grad_w is None:  # N == 0
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    loss = loss_sum / max(n, 1)
    return loss, correct, grad_h, (grad_w.to(weight.dtype) if need_w else None)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes loss and grads chunk by chunk; backward scales the stored grads by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, cdtype, need_h, need_w, accuracy):
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are handled explicitly
            loss, correct, grad_h, grad_w = _chunked_forward(hidden, weight, targets, chunk, cdtype,
                                                             need_h, need_w, accuracy)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(correct)
        ctx.consumed = False
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        # Scaled in place (as liger does): no second N x D / V x D copy, and autograd can hand the tensor
        # on as .grad. The price: a second backward through the same graph would scale twice, so refuse it.
        if ctx.consumed:
            raise RuntimeError("linear_cross_entropy(impl='chunked'): backward ran twice through one call "
                               "(retain_graph); its stored grads were scaled in place by the first. "
                               "Recompute the loss, or use impl='plain', to backpropagate twice.")
        ctx.consumed = True
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h.mul_(grad_loss)
        gw = None if grad_w is None else grad_w.mul_(grad_loss)
        return gh, gw, None, None, None, None, None, None


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, accuracy: bool = False) -> LossOutput:
    """Mean cross-entropy of (N, V) ``logits`` (at least float32) over the targets that are not IGNORE_INDEX
    (0.0 with zero grads when there are none), and with ``accuracy`` the count of rows whose argmax hits."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    counted = (targets != IGNORE_INDEX).sum().clamp(min=1)  # a tensor: no sync, and traceable
    loss = F.cross_entropy(logits.to(acc), targets, ignore_index=IGNORE_INDEX, reduction="sum") / counted
    correct = (logits.detach().argmax(-1) == targets).sum() if accuracy else None  # IGNORE_INDEX never hits
    return LossOutput(loss, correct)


def _plain(hidden, weight, targets, accuracy):
    return logits_cross_entropy(F.linear(hidden, weight), targets, accuracy)  # autocast picks the matmul dtype


def _chunked(hidden, weight, targets, chunk_size, accuracy):
    cdtype = _compute_dtype(hidden, weight)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad  # frozen head: the weight grad is never computed
    loss, correct = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, cdtype,
                                                     need_h, need_w, accuracy)
    return LossOutput(loss, correct if accuracy else None)


@torch.no_grad()
def _count_correct(hidden, weight, targets, chunk):
    cdtype = _compute_dtype(hidden, weight)
    w = weight.to(cdtype)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        correct += ((hidden[s:s + chunk].to(cdtype) @ w.T).argmax(1) == targets[s:s + chunk]).sum()
    return correct


def _liger(hidden, weight, targets, chunk_size, accuracy):
    _require("liger", hidden)
    # liger's mean over zero rows is 0/0, and it computes no weight grad when hidden needs none:
    # both cases go to the chunked path, which handles them.
    if hidden.shape[0] == 0 or (weight.requires_grad and not hidden.requires_grad):
        return _chunked(hidden, weight, targets, chunk_size, accuracy)
    return _liger_call(hidden, weight, targets, chunk_size, accuracy)


def _liger_call(hidden, weight, targets, chunk_size, accuracy):
    """Call liger-kernel's fused loss (any version: optional kwargs are passed only when it has them)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    params = inspect.signature(LigerFusedLinearCrossEntropyLoss.__init__).parameters
    kwargs = {}
    if "accum_dtype" in params:
        kwargs["accum_dtype"] = torch.float32  # weight grad accumulated in float32 across chunks
    liger_preds = accuracy and "return_predicted_tokens" in params
    if liger_preds:
        kwargs["return_predicted_tokens"] = True  # argmax per row, no extra matmul
    cdtype = _compute_dtype(hidden, weight)
    out = LigerFusedLinearCrossEntropyLoss(**kwargs)(weight.to(cdtype), hidden.to(cdtype), targets)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    loss = loss.to(torch.promote_types(cdtype, torch.float32))
    if not accuracy:
        return LossOutput(loss, None)
    if liger_preds:
        return LossOutput(loss, (out.predicted_tokens.detach() == targets).sum())
    return LossOutput(loss, _count_correct(hidden, weight, targets, chunk_size or default_chunk_size(weight.shape[0])))


def _cce(hidden, weight, targets, chunk_size, accuracy):
    """cut-cross-entropy: logits are computed block by block in SRAM and never stored (bf16/fp16 inputs)."""
    _require("cce", hidden)
    if hidden.shape[0] == 0:
        return _chunked(hidden, weight, targets, chunk_size, accuracy)
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

    cdtype = _compute_dtype(hidden, weight)
    loss = cce_linear_cross_entropy(hidden.to(cdtype), weight.to(cdtype), targets, reduction="mean")
    loss = loss.to(torch.promote_types(cdtype, torch.float32))
    if not accuracy:
        return LossOutput(loss, None)
    return LossOutput(loss, _count_correct(hidden, weight, targets, chunk_size or default_chunk_size(weight.shape[0])))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         impl: str = "auto", chunk_size: int | None = None,
                         accuracy: bool = False) -> LossOutput:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` without the (N, V) logits.

    ``hidden`` (N, D): final-norm hidden states of the counted positions only; ``weight`` (V, D): the
    output head (may be a non-leaf, e.g. W + LoRA delta: grads flow back through it); ``targets`` (N,)
    long in [0, V). Returns ``LossOutput(loss, correct)``: the 0-dim float32 mean loss (0.0 with zero
    grads when N == 0) and, with ``accuracy=True``, the 0-dim long count of rows whose argmax is the
    target (no grad, on device). ``impl``: auto | plain | compiled | chunked | liger | cce (module docstring);
    ``chunk_size``: rows per chunk, default ``default_chunk_size(V)`` (~2**23 logits a chunk).
    """
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {IMPLS}, got {impl!r}")
    _check_shapes(hidden, weight, targets)
    n, v = hidden.shape[0], weight.shape[0]
    if impl == "auto":  # per call, by size; resolve_loss_impl makes the per-run choice
        impl = "chunked" if n * v > AUTO_CHUNK_ELEMENTS else "plain"
    if impl in ("plain", "compiled"):
        return _plain(hidden, weight, targets, accuracy)
    if impl == "liger":
        return _liger(hidden, weight, targets, chunk_size, accuracy)
    if impl == "cce":
        return _cce(hidden, weight, targets, chunk_size, accuracy)
    return _chunked(hidden, weight, targets, chunk_size, accuracy)
