"""Training throughput: our Lightning path (as train.py runs it) against a plain PyTorch loop, same run.

    python scripts/bench_train.py                     # CPU shapes: stories260K 32x256, stories15M 8x256, fp32
    python scripts/bench_train.py --configs 15m_pretrain,110m --device cuda   # GPU shapes (BENCHMARKS.md)
    python scripts/bench_train.py --configs 15m_instruct_cpu                  # instruct rows: padded vs packed
    python scripts/bench_train.py --configs 260k_cpu --resolve-as cuda        # the GPU settings, on the CPU

Both paths train the same model (same init) on the same batches with the same optimizer, schedule,
clipping and accumulation, and the same step: with compile on and a traceable loss, the module's one compiled
graph per micro-batch (embedding, blocks, head and loss; ``compile_step``), else compiled blocks (compile on)
or eager, with the loss ``loss_impl=auto`` resolves to; the ``step`` column says which ran. Each path is
timed over steady-state optimizer steps after warm-up. Pretraining
configs read random-token rows; instruct configs read a real instruct shard (TinyStories-like lengths:
prompt 30-60 tokens not counted, story 100-300 counted, rows of 350; see scripts/bench_packing.py) through
the datasets training uses, once padded (one example per row, as llama2.c) and once packed (data.packing).
Useful tokens/s counts the positions that carry loss. Prints a table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.losses import resolve_loss_impl
from llamalit.settings.device import resolve_device_settings
from llamalit.training.callbacks import SpeedMonitor, StepProgressBar, peak_flops
from llamalit.training.module import (
    TRACEABLE_LOSSES,
    LlamaLitModule,
    add_counted_positions,
    batch_loss,
    compile_blocks,
    compile_step,
    resolve_compile,
    run_compiled_step,
)
from llamalit.training.optim import OptimConfig, build_optimizer, build_scheduler
from llamalit.utils import benchutil


@dataclass
class BenchConfig:
    name: str
    preset: str
    batch: int
    seq: int
    accum: int
    lora: bool = False
    llama2c_tokens_per_s: float | None = None  # reference in ../shared/docs/BENCHMARKS.md, same shapes
    instruct: bool = False  # rows of seq + 1 = 350 from an instruct shard (padded and packed)


CONFIGS = {
    # CPU references: llama2.c train.py fp32, no compile, on the 2-core machine.
    "260k_cpu": BenchConfig("stories260K 32x256", "stories260k", 32, 256, 1, llama2c_tokens_per_s=20_000),
    "15m_cpu": BenchConfig("stories15M 8x256", "stories15m", 8, 256, 1, llama2c_tokens_per_s=1_200),
    "15m_instruct_cpu": BenchConfig("stories15M instruct 4x350", "stories15m", 4, 349, 1, instruct=True),
    # GPU references: llama2.c train.py on one H100, bf16, compile, fused AdamW.
    "15m_pretrain": BenchConfig("15M pretrain 128x256x4", "stories15m", 128, 256, 4,
                                llama2c_tokens_per_s=2.2e6),
    "15m_instruct": BenchConfig("15M instruct 64x350x8", "stories15m", 64, 349, 8, llama2c_tokens_per_s=1.5e6,
                                instruct=True),
    "110m": BenchConfig("110M 16x1024x8", "stories110m", 16, 1024, 8, llama2c_tokens_per_s=0.49e6),
    "110m_lora": BenchConfig("110M LoRA 64x350x8", "stories110m", 64, 349, 8, lora=True, instruct=True),
}


def resize(bc: BenchConfig, batch: int | None, accum: int | None) -> BenchConfig:
    """``bc`` at another micro-batch and/or accumulation; its llama2.c reference was measured at its own shape."""
    if batch is None and accum is None:
        return bc
    batch, accum = batch or bc.batch, accum or bc.accum
    name = f"{bc.name.rsplit(' ', 1)[0]} {batch}x{bc.seq + bc.instruct}x{accum}"
    return dataclasses.replace(bc, name=name, batch=batch, accum=accum, llama2c_tokens_per_s=None)


def instruct_data(bc: BenchConfig, rows: int, root: Path, packed: bool) -> Dataset:
    """An instruct shard of ``rows`` TinyStories-like rows (bench_packing.write_shard), read as training reads it."""
    from bench_packing import EOS, IGNORE, ROW_LEN, write_shard

    from llamalit.data.datasets import InstructRows, read_manifest, shard_files
    from llamalit.data.packing import PackedInstructRows

    assert bc.seq == ROW_LEN - 1, f"{bc.name}: instruct rows are {ROW_LEN} tokens (seq {ROW_LEN - 1})"
    root = root / f"instruct_{rows}"
    if not (root / "manifest.json").is_file():
        write_shard(root, rows, np.random.default_rng(0))
    shards = shard_files(read_manifest(root), root, "train")
    if packed:
        return PackedInstructRows(shards, ROW_LEN, 32000, IGNORE, EOS, seed=0)
    return InstructRows(shards, ROW_LEN, 32000, IGNORE)


def useful_per_step(data: Dataset, bc: BenchConfig, steps: int) -> float:
    """Mean counted positions (label != -100) per optimizer step over the rows the timed steps read."""
    n = min(len(data), bc.batch * bc.accum * steps)
    return sum(int((data[i]["labels"] != -100).sum()) for i in range(n)) / (n / (bc.batch * bc.accum))


class RandomTokens(Dataset):
    """Fixed random rows of token ids; labels are the next tokens (every position counts)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, vocab, (n, seq + 1), generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i, :-1], "labels": self.rows[i, 1:]}


def run_cfg(bc: BenchConfig, steps: int, fused: bool | None = None) -> dict:
    model = ModelConfig.preset(bc.preset, max_seq_len=max(bc.seq, 256))
    lora = {"enabled": True, "rank": 2, "alpha": 1, "dropout": 0.1, "targets": ["wq", "wk", "wv", "wo"]}
    return {"model": model.to_dict(), "optim": {"warmup_steps": 2, "fused": fused}, "init_from": None,
            "lora": lora if bc.lora else {"enabled": False}, "trainer": {"max_steps": steps}}


class StepTimer(L.Callback):
    """Wall-clock time of each optimizer step (measured at batch boundaries, synchronised on CUDA)."""

    def __init__(self):
        self.times: list[float] = []
        self._last_step = -1

    def on_train_start(self, trainer, pl_module):  # as the plain loop: `steps` intervals for `steps` steps
        self._last_step = trainer.global_step
        self.times.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())


def loader(data: Dataset, bc: BenchConfig, device: str, workers: int) -> DataLoader:
    """Both paths read batches alike: pinned on CUDA, ``workers`` loader processes (conf/data: 2)."""
    return DataLoader(data, batch_size=bc.batch, shuffle=False, pin_memory=device == "cuda", drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0)


def bench_lightning(bc: BenchConfig, data: Dataset, steps: int, device: str, precision: str,
                    compile_: bool, run_dir: Path, workers: int = 0, fused: bool | None = None,
                    compile_mode: str | None = None) -> tuple[list[float], str]:
    """Seconds of each optimizer step of the Lightning path, and the step the module ran (:func:`step_name`)."""
    torch.manual_seed(0)
    module = LlamaLitModule((cfg := run_cfg(bc, steps, fused))["model"], cfg["optim"], cfg["lora"], compile=compile_,
                            compile_mode=compile_mode)
    timer = StepTimer()
    callbacks = [timer, SpeedMonitor(log_every=10), L.pytorch.callbacks.LearningRateMonitor("step"),
                 StepProgressBar(refresh_steps=10)]  # as conf/callbacks: the bar users see, read every 10 steps
    logger = L.pytorch.loggers.CSVLogger(str(run_dir), name="bench")
    trainer = L.Trainer(accelerator=device, devices=1, precision=precision, max_steps=steps,
                        accumulate_grad_batches=bc.accum, gradient_clip_val=1.0, logger=logger,
                        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=True,
                        enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0)
    trainer.fit(module, loader(data, bc, device, workers))
    ran = "one graph" if getattr(module, "_step", None) is not None else "blocks" if module._compiled else "eager"
    return [b - a for a, b in zip(timer.times, timer.times[1:])], step_name(ran, module._train_impl)


def step_name(kind: str, loss_impl: str) -> str:
    """How a micro-batch ran: ``one graph`` (compile_step), ``blocks`` (compile_blocks) or ``eager``, + the loss."""
    return f"{kind}/{loss_impl}"


def training_step(model: Llama, device: str, compile_: bool, compile_mode: str | None = None):
    """The loss function of one micro-batch as :class:`LlamaLitModule` runs it in training, and its
    :func:`step_name`: the module's ``on_fit_start`` and ``_loss`` for ``compile`` and ``loss_impl=auto``."""
    compiled = resolve_compile(compile_, torch.device(device))
    impl = resolve_loss_impl("auto", torch.device(device).type, compiled)
    if compiled and impl in TRACEABLE_LOSSES:
        mode = compile_mode or "default"
        step = compile_step(mode)
        cudagraphs = mode == "reduce-overhead" and torch.device(device).type == "cuda"

        def one_graph(batch):  # the module always asks the compiled step for the correct count: one graph
            return run_compiled_step(step, model, batch, True, impl, cudagraphs=cudagraphs).loss

        return one_graph, step_name("one graph", impl)
    if compiled:
        compile_blocks(model)

    def eager_loss(batch):
        return batch_loss(model, batch, False, impl).loss

    return eager_loss, step_name("blocks" if compiled else "eager", impl)


def plain_loop(model: torch.nn.Module, batch_loss, bc: BenchConfig, data: Dataset, steps: int, device: str,
               precision: str, scheduler_of=None, on_step=None, workers: int = 0,
               fused: bool | None = None) -> list[float]:
    """Seconds of each optimizer step of a plain PyTorch loop: accumulate, clip 1.0, AdamW (+ schedule)."""
    opt = build_optimizer(model, OptimConfig(warmup_steps=2, fused=fused))
    sched = scheduler_of(opt) if scheduler_of else None
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    batches = iter(loader(data, bc, device, workers))
    times = [time.perf_counter()]
    model.train()
    for _ in range(steps):
        for _ in range(bc.accum):
            batch = add_counted_positions(next(batches), pin=device == "cuda")  # as the module does: no sync
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                loss = batch_loss(batch) / bc.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        if on_step is not None:
            on_step()
    return [b - a for a, b in zip(times, times[1:])]


def bench_plain(bc: BenchConfig, data: Dataset, steps: int, device: str, precision: str,
                compile_: bool, on_step=None, workers: int = 0, fused: bool | None = None,
                compile_mode: str | None = None) -> tuple[list[float], str]:
    """Our model (built as the module builds it, LoRA included) in the plain loop, with our schedule and the
    module's training step (:func:`training_step`); the seconds of each optimizer step and the step's name."""
    torch.manual_seed(0)
    cfg = run_cfg(bc, steps, fused)
    model: Llama = LlamaLitModule(cfg["model"], cfg["optim"], cfg["lora"]).model.to(device)
    loss_of, ran = training_step(model, device, compile_, compile_mode)
    optim = OptimConfig.from_dict(cfg["optim"])
    times = plain_loop(model, loss_of, bc, data, steps, device, precision,
                       scheduler_of=lambda opt: build_scheduler(opt, optim, steps), on_step=on_step, workers=workers,
                       fused=fused)
    return times, ran


def profile_plain(bc: BenchConfig, data: Dataset, device: str, precision: str, compile_: bool,
                  out: Path, warmup: int = 3, active: int = 3, fused: bool | None = None,
                  compile_mode: str | None = None) -> str:
    """Where a step's time goes: ``torch.profiler`` over ``active`` steps of the plain loop after ``warmup``;
    the top operators by self time (device time on CUDA), also written to ``out``."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1)) as prof:
        bench_plain(bc, data, warmup + active, device, precision, compile_, on_step=prof.step, fused=fused,
                    compile_mode=compile_mode)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=20)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return table


def bench_llama2c(bc: BenchConfig, data: Dataset, steps: int, device: str, precision: str,
                  model_py: Path, compile_: bool, workers: int = 0, fused: bool | None = None) -> list[float]:
    """llama2.c's own ``model.py`` (a checkout of karpathy/llama2.c) in the same plain loop, as its train.py
    steps it: forward with targets, then ``last_loss``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llama2c_model", model_py)
    l2c = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(l2c)
    c = ModelConfig.preset(bc.preset, max_seq_len=max(bc.seq, 256))
    torch.manual_seed(0)
    model = l2c.Transformer(l2c.ModelArgs(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads,
                                          n_kv_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                                          multiple_of=c.multiple_of, max_seq_len=c.max_seq_len)).to(device)

    if compile_:
        model = torch.compile(model)  # as llama2.c's train.py does with compile=True

    def loss_of(batch):  # llama2.c ignores targets of -1 (ours are -100)
        model(batch["input_ids"], batch["labels"].clamp(min=-1))
        return model.last_loss

    return plain_loop(model, loss_of, bc, data, steps, device, precision, workers=workers, fused=fused)


def steady(step_times: list[float], warmup: int) -> float:
    """Median seconds per optimizer step after ``warmup`` steps."""
    return statistics.median(step_times[warmup:])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="260k_cpu,15m_cpu", help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per path")
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from timing")
    p.add_argument("--llama2c-model", type=Path, default=None,
                   help="llama2.c's model.py (from a checkout): also time it in the same run")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds of both paths; best kept")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile (our training step; llama2.c's whole model): auto = on CUDA, as train.py")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                             "max-autotune-no-cudagraphs"],
                   help="compile_mode of the one-graph step, both paths (default: default)")
    p.add_argument("--layouts", default="padded,packed", help="instruct configs: padded and/or packed rows")
    p.add_argument("--profile", action="store_true",
                   help="also profile the plain loop of each config (top operators; run-dir/profile_*.txt)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch for every config (a smaller GPU; a CPU "
                   "rehearsal of the GPU configs); default: each config's own")
    p.add_argument("--accum", type=int, default=None, help="gradient accumulation for every config")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--loader-workers", type=int, default=None,
                   help="loader processes for every path (default: 2 on CUDA as conf/data, 0 on the CPU)")
    p.add_argument("--resolve-as", default=None, choices=["cpu", "cuda"],
                   help="resolve precision, fused AdamW, compile and loader workers as this device would (train.py's "
                        "resolve_as): --resolve-as cuda rehearses the GPU settings on the CPU")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--run-dir", type=Path, default=Path("outputs/bench_train"))
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}: the timed steps come after warm-up")
    unknown = [k for k in args.configs.split(",") if k not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    if any(n is not None and n < 1 for n in (args.batch, args.accum)):
        p.error("--batch and --accum must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = resolve_device_settings(
        {"resolve_as": args.resolve_as, "compile": {"auto": None, "on": True, "off": False}[args.compile],
         "trainer": {"precision": "auto"}, "optim": {}, "data": {"kind": "instruct", "packing": None,
                                                                 "loader_workers": args.loader_workers}},
        torch.device(args.device).type)
    print(settings.table())  # packing: both layouts are timed for instruct configs, whatever it says
    precision, compile_, args.fused, args.loader_workers = (settings.precision, settings.compile,
                                                            settings.fused_adamw, settings.loader_workers)
    rows, profiles = [], []
    for key in args.configs.split(","):
        bc = resize(CONFIGS[key], args.batch, args.accum)
        n_rows = bc.batch * bc.accum * (args.steps + 1)
        layouts = args.layouts.split(",") if bc.instruct else ["dense"]
        padded_useful = None
        for layout in layouts:
            if bc.instruct:
                # twice the rows the padded steps read: packing puts one to two examples in a row
                data = instruct_data(bc, 2 * n_rows, args.run_dir / "data", packed=layout == "packed")
                useful = useful_per_step(data, bc, args.steps)
                padded_useful = useful if layout == "padded" else padded_useful
            else:
                data = RandomTokens(n_rows, bc.seq, ModelConfig.preset(bc.preset).vocab_size)
                useful = bc.batch * bc.seq * bc.accum
            rows.append(bench_one(bc, data, layout, useful, padded_useful, args, precision, compile_))
            if layout == "packed":
                same_run_reference(rows)
            if args.json:  # after every row: a run stopped by a time limit keeps what it measured
                benchutil.write_json(args.json, args, rows)
            if args.profile:
                profiles.append((bc, data, args.run_dir / f"profile_{key}_{layout}.txt"))
    if args.json:
        benchutil.write_json(args.json, args, rows)
    print_table(rows)
    print_checks(rows)
    warm = max(1, min(3, args.steps // 2))  # the data holds steps + 1 steps of rows
    for bc, data, out in profiles:  # after every row is measured: a time limit costs profiles first
        print(f"== {out.name}")
        print(profile_plain(bc, data, args.device, precision, compile_, out, warmup=warm,
                            active=max(1, min(3, args.steps - warm)), fused=args.fused,
                            compile_mode=args.compile_mode))
    return rows


def same_run_reference(rows: list[dict]) -> None:
    """A packed row's llama2.c reference: llama2.c's useful tokens/s on the padded row of the same config, same
    run (llama2.c has no packing; it pads every example to its row)."""
    packed = rows[-1]
    padded = next((r for r in rows if r["config"] == packed["config"] and r["layout"] == "padded"), None)
    ref = padded and padded["llama2c_same_run_useful_tokens_per_s"]
    if ref:
        packed["llama2c_same_run_useful_tokens_per_s"] = ref
        packed["useful_ratio_vs_llama2c_same_run"] = packed["useful_tokens_per_s"] / ref


def bench_one(bc: BenchConfig, data: Dataset, layout: str, useful: float, padded_useful: float | None,
              args: argparse.Namespace, precision: str, compile_: bool) -> dict:
    """Time the plain loop, the Lightning path (and llama2.c's model on dense/padded rows) on ``data``."""
    tokens_per_step = bc.batch * bc.seq * bc.accum
    run_l2c = args.llama2c_model is not None and layout != "packed"  # llama2.c has no packing
    workers = args.loader_workers
    plain, lit, ref = float("inf"), float("inf"), float("inf")
    compile_s = {}  # first step minus a steady one, first round: compilation (gpu_bench_all prints it per row)
    print(f"== row {bc.name} | {layout}", flush=True)  # gpu_bench_all counts TORCH_LOGS=recompiles lines per row
    for _ in range(args.repeats):  # alternate the paths; keep each one's best median
        if run_l2c:
            ref = min(ref, steady(bench_llama2c(bc, data, args.steps, args.device, precision, args.llama2c_model,
                                                compile_, workers, args.fused), args.warmup))
        times, plain_step = bench_plain(bc, data, args.steps, args.device, precision, compile_, workers=workers,
                                        fused=args.fused, compile_mode=args.compile_mode)
        plain = min(plain, steady(times, args.warmup))
        compile_s.setdefault("plain", times[0] - steady(times, args.warmup))
        times, lightning_step = bench_lightning(bc, data, args.steps, args.device, precision, compile_,
                                                args.run_dir, workers, args.fused, args.compile_mode)
        lit = min(lit, steady(times, args.warmup))
        compile_s.setdefault("lightning", times[0] - steady(times, args.warmup))
    print(f"== compile seconds {bc.name} | {layout}: plain {compile_s['plain']:.1f}, "
          f"lightning {compile_s['lightning']:.1f}", flush=True)
    peak = peak_flops(torch.device(args.device))
    fpt = Llama(ModelConfig.preset(bc.preset, max_seq_len=max(bc.seq, 256))).flops_per_token(bc.seq) \
        if peak else None
    # llama2.c's reference pads every example to its row: its useful share is the padded layout's
    l2c_useful = None
    if bc.llama2c_tokens_per_s and (padded_useful or not bc.instruct):
        l2c_useful = bc.llama2c_tokens_per_s * ((padded_useful / tokens_per_step) if bc.instruct else 1.0)
    return {
        "config": bc.name, "layout": layout, "device": args.device, "precision": precision, "compile": compile_,
        "fused_adamw": args.fused, "compile_mode": args.compile_mode or "default",
        "plain_step": plain_step, "lightning_step": lightning_step,
        "plain_tokens_per_s": tokens_per_step / plain, "lightning_tokens_per_s": tokens_per_step / lit,
        "useful_tokens_per_s": useful / lit, "useful_fraction": useful / tokens_per_step,
        "lightning_overhead_pct": 100 * (lit / plain - 1),
        "llama2c_tokens_per_s": bc.llama2c_tokens_per_s,
        "ratio_vs_llama2c": (tokens_per_step / lit) / bc.llama2c_tokens_per_s if bc.llama2c_tokens_per_s else None,
        "llama2c_useful_tokens_per_s": l2c_useful,
        "useful_ratio_vs_llama2c": (useful / lit) / l2c_useful if l2c_useful else None,
        "llama2c_same_run_tokens_per_s": tokens_per_step / ref if run_l2c else None,
        "ratio_vs_llama2c_same_run": ref / lit if run_l2c else None,
        # llama2.c's useful tokens/s on these (padded) rows; a packed row gets its padded row's (same_run_reference)
        "llama2c_same_run_useful_tokens_per_s": useful / ref if run_l2c else None,
        "useful_ratio_vs_llama2c_same_run": ref / lit if run_l2c else None,
        "mfu": (fpt * tokens_per_step / lit / peak) if peak else None,
        "compile_s_plain": compile_s["plain"], "compile_s_lightning": compile_s["lightning"],
    }


def print_table(rows: list[dict]) -> None:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    head = (f"{'config':26} {'layout':7} {'step (plain | lightning)':33} {'plain tok/s':>12} {'lightning':>10} "
            f"{'overhead':>9} {'useful/s':>10} {'llama2.c':>10} {'ratio':>6} {'useful ratio':>12} "
            f"{'llama2.c here':>14} {'ratio':>6} {'MFU':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        steps = r["plain_step"] if r["plain_step"] == r["lightning_step"] else f"{r['plain_step']} | {r['lightning_step']}"
        print(f"{r['config']:26} {r['layout']:7} {steps:33} {r['plain_tokens_per_s']:>12,.0f} "
              f"{r['lightning_tokens_per_s']:>10,.0f} "
              f"{r['lightning_overhead_pct']:>8.1f}% {r['useful_tokens_per_s']:>10,.0f} "
              f"{f(r['llama2c_tokens_per_s'], ',.0f'):>10} {f(r['ratio_vs_llama2c'], '.2f'):>6} "
              f"{f(r['useful_ratio_vs_llama2c'], '.2f'):>12} {f(r['llama2c_same_run_tokens_per_s'], ',.0f'):>14} "
              f"{f(r['ratio_vs_llama2c_same_run'], '.2f'):>6} "
              f"{f(r['mfu'] and 100 * r['mfu'], '.1f'):>6}")


def print_checks(rows: list[dict]) -> None:
    """Per row: the Lightning path against llama2.c's model timed in this run (tokens/s; useful tokens/s for
    instruct rows) and against the plain loop (issue 15's targets; gpu_bench_all.sh scores them)."""
    for r in rows:
        parts = [f"Lightning vs plain loop {r['lightning_overhead_pct']:+.1f}%"]
        if r["ratio_vs_llama2c_same_run"] is not None and r["layout"] == "dense":
            parts.append(f"{r['ratio_vs_llama2c_same_run']:.2f}x llama2.c's tokens/s (same run)")
        if r.get("useful_ratio_vs_llama2c_same_run") is not None and r["layout"] != "dense":
            parts.append(f"{r['useful_ratio_vs_llama2c_same_run']:.2f}x llama2.c's useful tokens/s (same run, "
                         "its padded rows)")
        if r["mfu"] is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        print(f"{r['config']} {r['layout']} [{r['lightning_step']}]: " + ", ".join(parts))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
