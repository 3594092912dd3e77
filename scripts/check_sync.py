"""Does a training step wait for the GPU? Runs steps under ``torch.cuda.set_sync_debug_mode("error")``.

    python scripts/check_sync.py [--preset stories15m] [--packed] [--compile]

The step is what the Lightning module and the plain loop of ``bench_train.py`` run: the batch gets its
host-side ``counted`` index (``add_counted_positions``), moves to the GPU (pinned, non-blocking), then
loss (chunked head + cross-entropy on counted positions), backward, clip 1.0, fused AdamW. Any operation
that synchronises with the host raises, with the stack of the culprit. CUDA only.
"""

from __future__ import annotations

import argparse
import sys

import torch

from llamalit.model import IGNORE_INDEX, Llama, ModelConfig
from llamalit.training.module import add_counted_positions, batch_loss, compile_blocks
from llamalit.training.optim import OptimConfig, build_optimizer


def host_batch(batch: int, seq: int, vocab: int, packed: bool, g: torch.Generator) -> dict:
    """Instruct-like rows: the first 40 positions and a padded tail are not counted."""
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, :40] = IGNORE_INDEX
    labels[:, seq - 60:] = IGNORE_INDEX
    out = {"input_ids": tokens, "labels": labels}
    if packed:  # two documents per row
        half = seq // 2
        out["segments"] = (torch.arange(seq) >= half).long().expand(batch, -1).contiguous()
        out["positions"] = torch.cat([torch.arange(half), torch.arange(seq - half)]).expand(batch, -1).contiguous()
    return {k: v.pin_memory() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="stories15m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=349)
    p.add_argument("--packed", action="store_true")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_sync.py needs a CUDA GPU (the sync debug mode is CUDA's)")
        return 2
    model = Llama(ModelConfig.preset(args.preset, max_seq_len=args.seq + 1)).cuda()
    if args.compile:
        compile_blocks(model)
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    g = torch.Generator().manual_seed(0)
    batches = [host_batch(args.batch, args.seq, model.cfg.vocab_size, args.packed, g) for _ in range(4)]

    def step(host: dict) -> None:
        batch = add_counted_positions(dict(host), pin=True)
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = batch_loss(model, batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up: compilation, optimizer state, kernel autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            step(b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    print(f"no host sync in {len(batches) - 1} steps ({args.preset}, packed={args.packed}, compile={args.compile})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
