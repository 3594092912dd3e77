"""The compiled small-head attention (``llamalit.inference.kernels.attention``) against PyTorch's SDPA on the CPU.

    python scripts/bench_attention.py [--threads 1] [--repeat 50]

Times both, fp32, on the shapes scoring meets (rows x heads x queries x keys x head dims: multiple-choice suffix
rows over a cached context with a mask, causal prefixes, rolling-perplexity rows) for stories260K's 8-dim heads,
16-dim heads, stories15M's 48-dim and stories42M/110M's 64-dim ones; prints the median milliseconds, the speedup and the largest difference
from float64 SDPA. ``MAX_HEAD_DIM`` in the module is set from this table: the kernel serves heads up to 32 dims.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from llamalit.inference.kernels.attention import attention

SHAPES = [  # (rows, heads, kv heads, queries, keys, head dims, masked)
    (12, 8, 4, 13, 13, 8, False), (16, 8, 4, 25, 38, 8, True), (16, 8, 4, 81, 94, 8, True),
    (16, 8, 4, 256, 256, 8, False), (16, 4, 4, 60, 80, 16, True), (16, 4, 4, 256, 256, 16, False),
    (16, 6, 6, 25, 38, 48, True), (16, 6, 6, 150, 150, 48, False), (16, 6, 6, 150, 150, 48, True),
    (16, 8, 8, 40, 60, 64, True), (8, 8, 8, 256, 256, 64, False), (4, 12, 12, 512, 512, 64, False),
]


def median_ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    if attention(*(torch.zeros(1, 1, 1, 8),) * 3) is None:
        raise SystemExit("error: the compiled kernel does not build here (see the warning above); nothing to compare")
    print(f"torch {torch.__version__}, {args.threads} thread(s); median of {args.repeat}")
    print(f"{'rows x heads/kv x queries x keys x dims':<40} {'mask':>6} {'SDPA ms':>8} {'kernel ms':>10} "
          f"{'speedup':>8} {'max |diff| vs fp64':>19}")
    for b, h, kv, t, length, d, masked in SHAPES:
        q = torch.randn(b, t, h, d, generator=g).transpose(1, 2)  # the model's layout
        k, v = torch.randn(b, kv, length, d, generator=g), torch.randn(b, kv, length, d, generator=g)
        if masked:  # a prefix of each row, then causal keys: scoring's suffix rows over a cached context
            start = torch.randint(0, length - t + 1, (b,), generator=g)
            cols = torch.arange(length)
            causal = (cols[None, :] >= length - t) & (cols[None, :] <= torch.arange(t)[:, None] + length - t)
            mask = ((cols[None, None, :] < start[:, None, None]) | causal[None])[:, None]
        else:
            mask = torch.ones(t, length, dtype=torch.bool).tril(length - t)[None, None]
        gqa, given = h != kv, mask if masked else None
        sdpa = median_ms(partial(F.scaled_dot_product_attention, q, k, v, attn_mask=given, is_causal=not masked,
                                 enable_gqa=gqa), args.repeat)
        ours = median_ms(partial(attention, q, k, v, given), args.repeat)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=gqa)
        diff = float((attention(q, k, v, given).double() - exact).abs().max())
        shape = f"{b} x {h}/{kv} x {t} x {length} x {d}"
        print(f"{shape:<40} {'yes' if masked else 'causal':>6} {sdpa:>8.3f} {ours:>10.3f} {sdpa / ours:>7.2f}x "
              f"{diff:>19.1e}")


if __name__ == "__main__":
    main()
