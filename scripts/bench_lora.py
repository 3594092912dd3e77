"""LoRA vs full fine-tuning, same run: trainable parameters, peak memory, step time.

    python scripts/bench_lora.py                                   # stories110M, 16 x 350, cuda if available
    python scripts/bench_lora.py --preset stories15m --batch 2 --seq 128 --device cpu --steps 3

Each mode (LoRA r=2 alpha=1 on wq/wk/wv/wo, as Instruct Llama; and full fine-tuning) runs in its own
fresh child process, so one cannot inherit the other's memory: same init, same random token
batches, AdamW as training builds it (trainable parameters only; fused on CUDA), bf16 autocast on
CUDA and fp32 on CPU, the loss on every position (no prompt masking: the worst case for memory).

Memory, reported per mode:
* ``state_MiB``: parameters + gradients + optimizer state, summed exactly from the tensors after a step
  (any device);
* ``saved_MiB``: the tensors autograd keeps from the forward for the backward (activations, the chunked
  loss's gradients), each storage once, parameters excluded: exact on any device, so
  ``state_plus_saved_MiB`` is a device-independent estimate of the peak (transient buffers aside);
* ``peak_MiB``: on CUDA, ``torch.cuda.max_memory_allocated`` over model build and all steps (weights,
  gradients, optimizer state, activations, workspace); on CPU, the growth of the child's peak RSS
  (``ru_maxrss``) from just before the model is built — includes allocator slack, so it is coarser.
Step time: median over ``--steps`` timed steps after ``--warmup`` steps (CUDA synchronised).
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


def _rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def run_mode(args: dict) -> dict:
    """One mode in this process: build, train ``warmup + steps`` steps, measure."""
    from llamalit.model.llama import Llama, ModelConfig
    from llamalit.model.lora import LoraConfig, apply_lora
    from llamalit.training.optim import OptimConfig, build_optimizer

    device = torch.device(args["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args["preset"], max_seq_len=max(args["seq"], 1))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args["batch"], args["seq"] + 1), generator=g)
               for _ in range(2)]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    else:  # load the CPU kernels' libraries now, so the RSS growth below is this mode's tensors
        warm = Llama(ModelConfig.preset("tiny"))
        x = torch.randint(0, 256, (1, 9))
        warm.loss(x[:, :-1], x[:, 1:]).backward()
        build_optimizer(warm, OptimConfig(lr=1e-4)).step()
        del warm, x
    rss0 = _rss_bytes()

    model = Llama(cfg).to(device)
    if args["mode"].startswith("lora"):
        apply_lora(model, LoraConfig(rank=args["rank"], alpha=args["alpha"], dropout=args["dropout"],
                                     targets=tuple(args["targets"])))
    if args["mode"].endswith("+gc"):  # model.gradient_checkpointing=true: recompute block activations
        from llamalit.training.module import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model.train()
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # every tensor autograd keeps for backward, once per storage
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step(i: int) -> float:
        w = batches[i % len(batches)].to(device, non_blocking=True)
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.loss(w[:, :-1], w[:, 1:])
        step.saved_bytes = sum(saved.values())
        saved.clear()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep gradients allocated: they are part of the steady state
        return float(loss.detach())

    times = []
    for i in range(args["warmup"] + args["steps"]):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t0)

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt_state = [t for s in opt.state.values() for t in s.values()]
    state_bytes = (_tensor_bytes(params) + _tensor_bytes([p.grad for p in trainable if p.grad is not None])
                   + _tensor_bytes(opt_state))
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base_alloc
        peak_kind = "cuda max_memory_allocated"
    else:
        peak = _rss_bytes() - rss0
        peak_kind = "cpu peak RSS growth"
    step_s = statistics.median(times)
    return {
        "mode": args["mode"], "preset": args["preset"], "device": str(device),
        "dtype": "bf16 autocast" if cuda else "fp32",
        "batch": args["batch"], "seq": args["seq"],
        "params": sum(p.numel() for p in params), "trainable_params": sum(p.numel() for p in trainable),
        "state_MiB": round(state_bytes / MiB, 1), "peak_MiB": round(peak / MiB, 1), "peak_kind": peak_kind,
        "saved_MiB": round(step.saved_bytes / MiB, 1),
        "state_plus_saved_MiB": round((state_bytes + step.saved_bytes) / MiB, 1),
        "step_ms": round(step_s * 1000, 1), "tokens_per_s": round(args["batch"] * args["seq"] / step_s),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
    }


def run_isolated(args: dict) -> dict:
    """:func:`run_mode` in a fresh spawned process (clean memory counters, no shared allocator)."""
    result = benchutil.run_isolated(run_mode, args)
    if "error" in result:
        raise RuntimeError(f"{args['mode']} run failed: {result['error']}")
    return result


def format_table(rows: list[dict]) -> str:
    head = (f"{'mode':<8} {'trainable':>12} {'of params':>10} {'state MiB':>10} {'saved MiB':>10} {'st+saved':>9} "
            f"{'peak MiB':>10} {'step ms':>9} {'tok/s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['mode']:<8} {r['trainable_params']:>12,} {r['trainable_params'] / r['params']:>10.4%} "
                     f"{r['state_MiB']:>10.1f} {r['saved_MiB']:>10.1f} {r['state_plus_saved_MiB']:>9.1f} {r['peak_MiB']:>10.1f} {r['step_ms']:>9.1f} {r['tokens_per_s']:>9,}")
    by = {r["mode"]: r for r in rows}
    for mode in [m for m in by if m != "full"]:
        if "full" in by and by["full"]["peak_MiB"] > 0:
            lines.append(f"{mode} / full: peak memory {by[mode]['peak_MiB'] / by['full']['peak_MiB']:.2f}x, "
                         f"state + saved {by[mode]['state_plus_saved_MiB'] / by['full']['state_plus_saved_MiB']:.2f}x, "
                         f"state {by[mode]['state_MiB'] / by['full']['state_MiB']:.2f}x, "
                         f"step time {by[mode]['step_ms'] / by['full']['step_ms']:.2f}x")
    r = rows[0]
    lines.append(f"{r['preset']} {r['batch']}x{r['seq']} on {r['gpu'] or r['device']} ({r['dtype']}); "
                 f"peak = {r['peak_kind']}; state = params + grads + optimizer state (exact)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="stories110m", help="ModelConfig preset (default stories110m)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=350)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--targets", default="wq,wk,wv,wo")
    p.add_argument("--modes", default="lora,lora+gc,full",
                   help="comma list of lora, lora+gc (LoRA + gradient checkpointing), full, full+gc")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    common = {"preset": a.preset, "device": a.device, "batch": a.batch, "seq": a.seq, "steps": a.steps,
              "warmup": a.warmup, "rank": a.rank, "alpha": a.alpha, "dropout": a.dropout,
              "targets": [t for t in a.targets.split(",") if t]}
    rows = [run_isolated({**common, "mode": m}) for m in a.modes.split(",") if m]
    print(format_table(rows))
    if a.json:
        benchutil.write_json(a.json, a, rows)
    return rows


if __name__ == "__main__":
    main()
