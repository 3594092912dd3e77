"""LoRA on a bf16 base vs QLoRA (4-bit NF4 base) at real Llama shapes: peak GPU memory and tokens/s.

    python scripts/bench_qlora.py                      # TinyLlama-1.1B LoRA bf16 + QLoRA, Llama-2-7B QLoRA
    python scripts/bench_qlora.py --rows 7b:lora,7b:qlora --batch 1 --seq 2048 --json qlora.json
    python scripts/bench_qlora.py --rows tiny:lora,tiny:qlora --device cpu --seq 64 --steps 2   # a smoke check

Weights are random (no download is needed): each model is built on the meta device and
materialised straight on the GPU in bf16. Each row runs in its own fresh process, as
``experiment=alpaca_qlora`` trains: LoRA r=64 alpha=16 dropout 0.1 on every block linear,
gradient checkpointing, bf16 autocast, AdamW on the adapters (bitsandbytes' PagedAdamW for
QLoRA), random token rows of ``--seq`` tokens with the loss on every position.

* ``peak_GiB``: ``torch.cuda.max_memory_allocated`` from just before the base is built to the last
  step (for QLoRA each block's linears are quantized as soon as the block exists, so it never holds
  the bf16 model);
  on the CPU (smoke only) it is left empty.
* ``tokens_per_s``: ``batch * seq`` / median step time over ``--steps`` steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from llamalit.utils import benchutil

GiB = 2**30
# Published shapes: TinyLlama/TinyLlama-1.1B (GQA 32/4) and meta-llama/Llama-2-7b-hf; untied heads.
SHAPES = {
    "tinyllama": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128),  # smoke
}
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def build(shape: str, seq: int, quantize: bool, device: torch.device):
    """A random-init Llama of ``shape`` in bf16 on ``device``; 4-bit block linears when ``quantize``."""
    from llamalit.model.llama import Llama, ModelConfig, rope_tables
    from llamalit.model.quantize import quantize_linears

    cfg = ModelConfig(**SHAPES[shape], multiple_of=256, norm_eps=1e-5, max_seq_len=seq, tie_embeddings=False)
    with torch.device("meta"):
        model = Llama(cfg).to(torch.bfloat16)

    def materialise(root: torch.nn.Module) -> None:  # one tensor at a time: never float32, never a second copy
        for name, module in list(root.named_modules()):
            for pname, p in list(module.named_parameters(recurse=False)):
                t = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
                t.fill_(1.0) if "norm" in f"{name}.{pname}" else t.normal_(0.0, 0.02)
                module._parameters[pname] = torch.nn.Parameter(t)

    for block in model.layers:
        materialise(block)
        if quantize:  # this block's bf16 linears become 4-bit before the next block exists
            quantize_linears(block, device=device)
    for part in (model.tok_embeddings, model.norm, model.output):
        materialise(part)
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.freqs_cos, model.freqs_sin = cos.to(device), sin.to(device)
    return model


def run_row(args: dict) -> dict:
    """One row in this process: build, LoRA, ``warmup + steps`` training steps, measure."""
    from llamalit.model.lora import LoraConfig, apply_lora
    from llamalit.training.module import enable_gradient_checkpointing
    from llamalit.training.optim import OptimConfig, build_optimizer

    device = torch.device(args["device"])
    cuda = device.type == "cuda"
    quantize = args["mode"] == "qlora"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = build(args["shape"], args["seq"], quantize, device)
    if cuda:
        torch.cuda.synchronize(device)
    weights_bytes = torch.cuda.memory_allocated(device) - base_alloc if cuda else None
    apply_lora(model, LoraConfig(rank=args["rank"], alpha=args["alpha"], dropout=0.1, targets=TARGETS))
    enable_gradient_checkpointing(model)
    model.train()
    opt = build_optimizer(model, OptimConfig(lr=2e-4, weight_decay=0.0, beta2=0.999, paged=quantize and cuda))
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args["batch"], args["seq"] + 1), generator=g) for _ in range(2)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    times = []
    for i in range(args["warmup"] + args["steps"]):
        w = batches[i % 2].to(device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model.loss(w[:, :-1], w[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    params = list(model.parameters())
    return {
        "shape": args["shape"], "mode": args["mode"], "device": str(device), "batch": args["batch"],
        "seq": args["seq"], "rank": args["rank"], "loss": round(float(loss.detach()), 3),
        # a packed 4-bit tensor holds two weights a byte
        "params": sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "weights_GiB": round(weights_bytes / GiB, 2) if cuda else None,
        "peak_GiB": round((torch.cuda.max_memory_allocated(device) - base_alloc) / GiB, 2) if cuda else None,
        "step_s": round(step_s, 3), "tokens_per_s": round(args["batch"] * args["seq"] / step_s),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
    }


def run_isolated(args: dict) -> dict:
    """:func:`run_row` in a fresh spawned process (clean memory counters, no shared allocator)."""
    return benchutil.run_isolated(run_row, args)


def format_table(rows: list[dict]) -> str:
    head = f"{'shape':<10} {'mode':<6} {'batch x seq':>12} {'trainable':>12} {'weights GiB':>12} " \
           f"{'peak GiB':>9} {'step s':>7} {'tok/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:<10} {r['mode']:<6} failed: {r['error']}")
            continue
        gib = f"{r['weights_GiB']:>12.2f} {r['peak_GiB']:>9.2f}" if r["peak_GiB"] is not None else f"{'-':>12} {'-':>9}"
        lines.append(f"{r['shape']:<10} {r['mode']:<6} {r['batch']:>5} x {r['seq']:<5} {r['trainable_params']:>12,} "
                     f"{gib} {r['step_s']:>7.3f} {r['tokens_per_s']:>8,}")
    first = next((r for r in rows if "error" not in r), None)
    if first:
        lines.append(f"on {first['gpu'] or first['device']}; LoRA r={first['rank']} alpha=16 on all block linears, "
                     "gradient checkpointing, bf16 weights (+ autocast on CUDA); peak = cuda max_memory_allocated, weights included")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="tinyllama:lora,tinyllama:qlora,7b:qlora",
                   help=f"comma list of SHAPE:MODE, SHAPE in {sorted(SHAPES)}, MODE lora (bf16 base) or qlora")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_qlora measures GPU memory: it needs CUDA (torch.cuda.is_available() is False). "
                         "For a smoke check on the CPU: --rows tiny:lora,tiny:qlora --device cpu --seq 64")
    rows = []
    for spec in a.rows.split(","):
        shape, _, mode = spec.partition(":")
        if shape not in SHAPES or mode not in ("lora", "qlora"):
            raise SystemExit(f"--rows {spec!r}: want SHAPE:MODE with SHAPE in {sorted(SHAPES)}, MODE lora|qlora")
        rows.append(run_isolated({"shape": shape, "mode": mode, "device": a.device, "batch": a.batch, "seq": a.seq,
                                  "steps": a.steps, "warmup": a.warmup, "rank": a.rank, "alpha": a.alpha}))
        print(format_table(rows[-1:]).splitlines()[2], flush=True)  # this row, as it finishes
    print(format_table(rows))
    if a.json:
        benchutil.write_json(a.json, a, rows)
    return rows


if __name__ == "__main__":
    main()
