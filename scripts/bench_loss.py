"""Output head + cross-entropy, forward + backward: plain (reference) vs compiled vs chunked vs liger vs cce.

    python scripts/bench_loss.py --device cuda                       # both shapes, bf16 autocast; prints auto's pick
    python scripts/bench_loss.py --device cpu --n 2048 --iters 3     # CPU, small N
    python scripts/bench_loss.py --device cpu --shapes 15m --n 32,128,512,2048 --impls plain,chunked  # auto threshold
    python scripts/bench_loss.py --device cpu --shapes 15m --n 2048 --impls chunked:64,chunked:262,chunked:1024

Shapes (``--shapes``): ``15m`` = stories15M, N = 64 x 349 x 0.6 counted rows (13401), D = 288, V = 32000;
``110m`` = stories110M, N = 16 x 1023 (16368), D = 768, V = 32000. ``--n`` replaces N (comma list).
``--impls``: plain (eager, the reference), compiled (the plain loss under ``torch.compile``, as the one-graph
training step runs it), chunked, chunked:ROWS (a chunk size), liger, cce (these two skipped with a note when
not importable or not on CUDA). ``--frozen-weight``: the head does not require grad (LoRA runs).
On CUDA the run ends with the impl ``loss_impl=auto`` should pick for a compiled run (fastest of compiled,
chunked, liger, cce at each shape) and each impl's loss against the plain reference (same inputs).

Each (shape, N, impl) runs in a fresh spawned child so one cannot inherit another's memory. Inputs are
built first, one warm-up call on tiny tensors loads the kernels, then ``--warmup`` + ``--iters`` forward + backward
passes run (grads wrt hidden and weight, set to None between passes).
* ``ms`` / ``min ms``: median / fastest of the timed passes (CUDA synchronised; min is the steadier
  figure on a shared machine). ``--rounds R`` runs the whole list R times interleaved and merges.
* ``peak MiB``: CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before the first pass
  (inputs excluded; logits, softmax, grads and workspace included). CPU: growth of the child's peak RSS
  (``ru_maxrss``) over the same span: real pages touched, includes allocator slack, coarser.
Default dtype: bf16 autocast on CUDA, fp32 on CPU (``--autocast bf16|off`` overrides).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from llamalit.utils import benchutil

MiB = 2**20
PIP = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}
SHAPES = {"15m": (int(64 * 349 * 0.6), 288, 32000), "110m": (16 * 1023, 768, 32000)}


def _rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_case(args: dict) -> dict:
    """One (shape, N, impl) in this process: build inputs, time forward + backward, measure peak memory."""
    from llamalit.model.losses import default_chunk_size, linear_cross_entropy

    loss_fn = linear_cross_entropy
    if args["impl"] == "compiled":
        loss_fn = torch.compile(linear_cross_entropy, fullgraph=True, dynamic=False)

    device = torch.device(args["device"])
    cuda = device.type == "cuda"
    n, d, v = args["n"], args["d"], args["v"]
    impl, _, chunk = args["impl"].partition(":")
    chunk_size = int(chunk) if chunk else None
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(device).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * 0.02).to(device).requires_grad_(not args["frozen_weight"])
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["autocast"] == "bf16")

    losses = []

    def one_pass() -> None:
        with autocast:
            out = loss_fn(hidden, weight, targets, impl=impl, chunk_size=chunk_size, accuracy=True)
        out.loss.backward()
        losses.append(out.loss.detach())
        hidden.grad = weight.grad = None

    wh = torch.randn(4, 8, device=device, requires_grad=True)  # load kernels / libraries before the
    ww = torch.randn(16, 8, device=device, requires_grad=True)  # memory baseline, on tensors of no size
    with autocast:
        loss_fn(wh, ww, targets[:4] % 16, impl=impl, chunk_size=chunk_size).loss.backward()
    del wh, ww
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss0 = _rss_bytes()
    times = []
    for i in range(args["warmup"] + args["iters"]):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        one_pass()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else _rss_bytes() - rss0
    return {
        "shape": args["shape"], "impl": args["impl"], "n": n, "d": d, "v": v,
        "chunk_size": (chunk_size or default_chunk_size(v)) if impl == "chunked" else None,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "autocast": args["autocast"],
        "frozen_weight": args["frozen_weight"], "ms": round(statistics.median(times) * 1000, 2),
        "min_ms": round(min(times) * 1000, 2), "times_ms": [round(t * 1000, 2) for t in times],
        "peak_MiB": round(peak / MiB, 1), "logits_MiB_fp32": round(n * v * 4 / MiB, 1),
        "tokens_per_s": round(n / min(times)), "loss": float(losses[-1]),
        "peak_kind": "cuda max_memory_allocated" if cuda else "cpu peak RSS growth",
    }


def run_isolated(args: dict) -> dict:
    """:func:`run_case` in a fresh spawned process (clean memory counters, no shared allocator)."""
    return benchutil.run_isolated(run_case, args)


def format_table(rows: list[dict]) -> str:
    head = (f"{'shape':<5} {'N':>6} {'D':>4} {'impl':<13} {'chunk':>6} {'ms':>9} {'min ms':>9} {'tokens/s':>10} "
            f"{'peak MiB':>9} {'logits MiB':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r.get('shape', '?'):<5} {r.get('n', ''):>6} {'':>4} {r['impl']:<13} {r['error']}")
            continue
        lines.append(f"{r['shape']:<5} {r['n']:>6} {r['d']:>4} {r['impl']:<13} {r['chunk_size'] or '':>6} "
                     f"{r['ms']:>9.1f} {r['min_ms']:>9.1f} {r.get('tokens_per_s', 0):>10,} {r['peak_MiB']:>9.1f} "
                     f"{r['logits_MiB_fp32']:>10.1f}")
    ok = [r for r in rows if "error" not in r]
    if ok:
        r = ok[0]
        lines.append(f"on {r['device']}, autocast {r['autocast']}, frozen weight {r['frozen_weight']}, "
                     f"V {r['v']}; peak = {r['peak_kind']}; logits MiB = N x V fp32 (what plain holds)")
    return "\n".join(lines)


AUTO_CANDIDATES = ("compiled", "chunked", "liger", "cce")  # what resolve_loss_impl may return for a compiled run


def auto_pick(rows: list[dict]) -> list[str]:
    """Per (shape, N): the fastest of :data:`AUTO_CANDIDATES` (min ms) and each impl's loss vs plain's."""
    lines = []
    for key in dict.fromkeys((r.get("shape"), r.get("n")) for r in rows):
        group = [r for r in rows if (r.get("shape"), r.get("n")) == key and "error" not in r]
        ref = next((r for r in group if r["impl"] == "plain"), None)
        if ref is not None:
            diffs = ", ".join(f"{r['impl']} {r['loss'] - ref['loss']:+.2e}" for r in group if r is not ref)
            lines.append(f"{key[0]} N={key[1]}: loss vs plain reference {ref['loss']:.5f}: {diffs}")
        cands = [r for r in group if r["impl"] in AUTO_CANDIDATES]
        if cands:
            best = min(cands, key=lambda r: r["min_ms"])
            low = min(cands, key=lambda r: r["peak_MiB"])
            lines.append(f"{key[0]} N={key[1]}: auto should pick {best['impl']} ({best['tokens_per_s']:,} tokens/s, "
                         f"{best['peak_MiB']:.0f} MiB); least memory: {low['impl']} ({low['peak_MiB']:.0f} MiB)")
    return lines


def merge_rounds(done: list[dict]) -> dict:
    """One row from a case's rounds: median / min over all timed passes, the largest peak."""
    bad = [r for r in done if "error" in r]
    if bad:
        return bad[0]
    times = [t for r in done for t in r["times_ms"]]
    return {**done[0], "ms": round(statistics.median(times), 2), "min_ms": min(times), "times_ms": times,
            "peak_MiB": max(r["peak_MiB"] for r in done), "rounds": len(done),
            "tokens_per_s": round(done[0]["n"] / (min(times) / 1000))}


def main(argv: list[str] | None = None) -> list[dict]:
    from llamalit.model.losses import impl_available

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="15m,110m", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--n", default=None, help="comma list of counted rows N, replacing each shape's N")
    p.add_argument("--impls", default="plain,compiled,chunked,liger,cce",
                   help="plain, compiled, chunked, chunked:ROWS, liger, cce")
    p.add_argument("--iters", type=int, default=10, help="timed passes per case")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list of cases this many times, interleaved (a fresh child each), and "
                        "merge: steadier on a shared machine")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--autocast", choices=("bf16", "off"), default=None,
                   help="default: bf16 on CUDA, off on CPU")
    p.add_argument("--frozen-weight", action="store_true", help="head weight does not require grad")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    autocast = a.autocast or ("bf16" if a.device.startswith("cuda") else "off")
    cases = []
    for shape in a.shapes.split(","):
        if shape not in SHAPES:
            p.error(f"--shapes: unknown {shape!r}; choose from {', '.join(SHAPES)}")
        n0, d, v = SHAPES[shape]
        for n in ([int(x) for x in a.n.split(",")] if a.n else [n0]):
            for impl in a.impls.split(","):
                if impl in PIP and not (impl_available(impl) and a.device.startswith("cuda")):
                    print(f"skip {impl} ({'not on CUDA' if impl_available(impl) else 'pip install ' + PIP[impl]})",
                          file=sys.stderr)
                    continue
                args = {"shape": shape, "n": n, "d": d, "v": v, "impl": impl, "device": a.device,
                        "iters": a.iters, "warmup": a.warmup, "autocast": autocast,
                        "frozen_weight": a.frozen_weight}
                cases.append(args)
    runs: list[list[dict]] = [[] for _ in cases]
    for _ in range(a.rounds):
        for args, done in zip(cases, runs, strict=True):
            done.append(run_isolated(args))
            print(format_table(done[-1:]).splitlines()[2], file=sys.stderr, flush=True)
    rows = [merge_rounds(done) for done in runs]
    print(format_table(rows))
    print("\n".join(auto_pick(rows)))
    if a.json:
        benchutil.write_json(a.json, a, rows)
    return rows


if __name__ == "__main__":
    main()
