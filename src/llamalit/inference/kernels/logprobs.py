"""Scoring's last step on the CPU by the compiled kernel: each row's log-probability of its target and whether the
target is the row's argmax, in two passes over the logits (``llk_pick_logprobs`` in decode_cpu.cpp).

``torch.log_softmax`` writes a second (rows, vocab) tensor that ``gather`` and ``argmax`` then read again; for
multiple choice on a small model that was 7% of the harness's time.
"""

from __future__ import annotations

import torch

from llamalit.inference.kernels import kernel_enabled, load_decode_kernel


def pick_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                  enabled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(``log_softmax(logits)[r, targets[r]]`` (float32), ``logits[r].argmax() == targets[r]`` (bool)) per row of
    ``logits`` (rows, vocab), float32 on the CPU; None when the kernel is off (``enabled``, default
    ``LLAMALIT_DECODE_KERNEL``), not built, or the logits are of another kind. A target outside the vocabulary is
    a ValueError."""
    if (logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu"
            or not kernel_enabled(enabled)):
        return None
    lib = load_decode_kernel()
    if lib is None:
        return None
    rows, vocab = logits.shape
    logits, targets = logits.contiguous(), targets.to("cpu", torch.int64).contiguous()
    if targets.shape != (rows,) or (rows and not 0 <= int(targets.min()) <= int(targets.max()) < vocab):
        raise ValueError(f"targets must be ({rows},) ids in 0..{vocab - 1}")
    logp, hit = torch.empty(rows), torch.empty(rows, dtype=torch.bool)
    lib.llk_pick_logprobs(logits.data_ptr(), rows, vocab, targets.data_ptr(), logp.data_ptr(), hit.data_ptr(),
                          torch.get_num_threads())
    return logp, hit
