"""Does a training step wait for the GPU? Runs steps under ``torch.cuda.set_sync_debug_mode("error")``.

    python scripts/check_sync.py [--preset stories15m] [--packed] [--compile]
    python scripts/check_sync.py --lightning [--packed] [--compile]

The step is what the Lightning module and the plain loop of ``bench_train.py`` run (``bench_train.training_step``):
the batch gets its host-side ``counted`` index (``add_counted_positions``), moves to the GPU (pinned,
non-blocking), then the loss ``loss_impl=auto`` resolves to (with ``--compile``: the one compiled graph of
embedding, blocks, head and masked loss; without: eager, plain head + cross-entropy on counted positions),
backward, clip 1.0, fused AdamW. Any operation that synchronises with the host raises, with the stack of the
culprit. CUDA only.

``--lightning`` checks the whole Lightning path instead: ``LlamaLitModule`` in a ``Trainer`` with what train.py
adds around it (progress bar, speed/MFU monitor, LR monitor, a CSV logger, accumulation, clipping, bf16), under
``set_sync_debug_mode("warn")``. Logging steps may read values back (every ``--log-every`` steps); a sync in
any other optimizer step is a failure, printed with the stack that made it.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch
from bench_train import training_step

from llamalit.model.llama import IGNORE_INDEX, Llama, ModelConfig
from llamalit.training.module import add_counted_positions
from llamalit.training.optim import OptimConfig, build_optimizer


def host_batch(batch: int, seq: int, vocab: int, packed: bool, g: torch.Generator, pin: bool = True) -> dict:
    """Instruct-like rows: a prompt (the first eighth) and a padded tail (the last sixth) are not counted."""
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, :seq // 8] = IGNORE_INDEX
    labels[:, seq - seq // 6:] = IGNORE_INDEX
    out = {"input_ids": tokens, "labels": labels}
    if packed:  # two documents per row
        half = seq // 2
        out["segments"] = (torch.arange(seq) >= half).long().expand(batch, -1).contiguous()
        out["positions"] = torch.cat([torch.arange(half), torch.arange(seq - half)]).expand(batch, -1).contiguous()
    return {k: v.pin_memory() if pin else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="stories15m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=349)
    p.add_argument("--packed", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, help="compile_mode of the one-graph step (default: default)")
    p.add_argument("--lightning", action="store_true", help="the Trainer path with train.py's callbacks")
    p.add_argument("--steps", type=int, default=20, help="--lightning: optimizer steps checked after warm-up")
    p.add_argument("--log-every", type=int, default=10, help="--lightning: trainer.log_every_n_steps")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_sync.py needs a CUDA GPU (the sync debug mode is CUDA's)")
        return 2
    if args.lightning:
        return check_lightning(args)
    model = Llama(ModelConfig.preset(args.preset, max_seq_len=args.seq + 1)).cuda()
    loss_of, ran = training_step(model, "cuda", args.compile, args.compile_mode)
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    g = torch.Generator().manual_seed(0)
    batches = [host_batch(args.batch, args.seq, model.cfg.vocab_size, args.packed, g) for _ in range(4)]

    def step(host: dict) -> None:
        batch = add_counted_positions(dict(host), pin=True)
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(batch)
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
    print(f"no host sync in {len(batches) - 1} steps ({args.preset}, packed={args.packed}, compile={args.compile}, "
          f"step {ran})")
    return 0


class HostRows(torch.utils.data.Dataset):
    """Rows of :func:`host_batch` (unpinned: the loader pins, as the datamodule's does)."""

    def __init__(self, n: int, seq: int, vocab: int, packed: bool):
        self.rows = host_batch(n, seq, vocab, packed, torch.Generator().manual_seed(0), pin=False)

    def __len__(self) -> int:
        return len(self.rows["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.rows.items()}


class SyncWatch(L.Callback):
    """From optimizer step ``start`` on, CUDA's sync debug mode warns; each warning is kept with the optimizer
    step it fell in and the innermost frames of llamalit or Lightning that caused it."""

    def __init__(self, start: int):
        self.start = start
        self.syncs: list[tuple[int, str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start and torch.cuda.get_sync_debug_mode() == 0:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode("default")

    def record(self, trainer: L.Trainer) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "llamalit" in f.filename or "lightning" in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        self.syncs.append((trainer.global_step, where))


def check_lightning(args: argparse.Namespace) -> int:
    """Syncs per optimizer step of the Lightning path; 0 outside logging steps passes."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from llamalit.training.callbacks import SpeedMonitor, StepProgressBar
    from llamalit.training.module import LlamaLitModule

    accum, warm = 4, 3
    cfg = {"model": ModelConfig.preset(args.preset, max_seq_len=args.seq + 1).to_dict(), "init_from": None,
           "lora": {"enabled": False}, "trainer": {"max_steps": warm + args.steps}, "compile": args.compile,
           "compile_mode": args.compile_mode, "optim": {"warmup_steps": 2}}
    module = LlamaLitModule(cfg["model"], cfg["optim"], cfg["lora"], compile=cfg["compile"],
                            compile_mode=cfg["compile_mode"])
    watch = SyncWatch(start=warm)
    trainer = L.Trainer(accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=warm + args.steps,
                        accumulate_grad_batches=accum, gradient_clip_val=1.0, log_every_n_steps=args.log_every,
                        callbacks=[watch, StepProgressBar(args.log_every), SpeedMonitor(args.log_every),
                                   LearningRateMonitor("step")],
                        logger=CSVLogger(tempfile.mkdtemp(prefix="check_sync_")), enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    rows = HostRows(args.batch * accum * (warm + args.steps), args.seq, module.model.cfg.vocab_size, args.packed)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch, pin_memory=True, num_workers=2,
                                         persistent_workers=True)
    shown = warnings.showwarning

    def on_warning(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            watch.record(trainer)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = on_warning
        trainer.fit(module, loader)
    per_step = collections.Counter(step for step, _ in watch.syncs)
    logging_steps = {s for s in range(warm, warm + args.steps + 1) if s % args.log_every in (0, args.log_every - 1)}
    bad = sorted(s for s in per_step if s not in logging_steps)
    print(f"Lightning path, {args.steps} optimizer steps x {accum} micro-batches after {warm} warm-up "
          f"({args.preset}, packed={args.packed}, compile={args.compile}, log every {args.log_every}):")
    print(f"  syncs per step: {dict(sorted(per_step.items())) or 'none'}")
    for where, n in collections.Counter(w for _, w in watch.syncs).most_common(8):
        print(f"  {n:4d} x {where}")
    if bad:
        print(f"FAIL: host syncs in non-logging steps {bad}")
        return 1
    print("ok: no host sync outside logging steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
