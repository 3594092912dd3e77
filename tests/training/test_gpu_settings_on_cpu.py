"""The settings a CUDA machine resolves (bf16-mixed, fused AdamW, compile, packing), run on the CPU.

``resolve_as=cuda`` resolves every auto setting as a GPU would while the run stays on the CPU, so the GPU
defaults are tested here. Not on a CPU: flex attention (no backward on the CPU; packed rows fall back to
dense SDPA with a mask, and the settings table says so) and liger's/cce's Triton kernels. The two runs compile
blocks on the CPU (inductor), which is most of their time (~1 minute each on 2 busy cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalit.settings.device import apply_device_settings, resolve_device_settings

ROOT = Path(__file__).resolve().parents[2]


def run_cfg(**top) -> dict:
    cfg = {"trainer": {"precision": "auto"}, "optim": {"fused": None}, "compile": None, "attention": "auto",
           "loss_impl": "auto", "model": {"dim": 64, "n_heads": 4},
           "data": {"kind": "instruct", "packing": None, "loader_workers": None}}
    return {**cfg, **top}


def test_auto_settings_resolve_per_device_and_as_cuda_on_the_cpu():
    cpu = resolve_device_settings(run_cfg(), "cpu")
    assert cpu.eval_batching == "length"
    assert (cpu.precision, cpu.fused_adamw, cpu.compile, cpu.packing, cpu.attention, cpu.loader_workers,
            cpu.eval_device) == ("32-true", False, False, False, "dense", 0, "cpu")
    as_cuda = resolve_device_settings(run_cfg(resolve_as="cuda"), "cpu")
    assert (as_cuda.device, as_cuda.resolved_as, as_cuda.eval_device, as_cuda.eval_batching) == \
        ("cpu", "cuda", "cpu", "padded")
    assert (as_cuda.precision, as_cuda.fused_adamw, as_cuda.compile, as_cuda.packing) == ("bf16-mixed", True, True,
                                                                                        True)
    assert as_cuda.loader_workers >= 1 and as_cuda.loss_impl == "compiled"
    # flex is what CUDA picks for heads of 16, but it has no backward on the CPU: dense, and the table says why
    assert as_cuda.attention == "dense" and "no backward" in as_cuda.why["attention"]
    table = as_cuda.table()
    assert "resolved as cuda" in table and "bf16-mixed" in table and "flex on cuda" in table
    # what CUDA resolves on narrow heads, on pretraining data, for a 4-bit base
    narrow = resolve_device_settings(run_cfg(resolve_as="cuda", model={"dim": 64, "n_heads": 8}), "cpu")
    assert "head_dim 8" in narrow.why["attention"]
    assert not resolve_device_settings(run_cfg(resolve_as="cuda", data={"kind": "pretrain", "packing": None}),
                                       "cpu").packing
    assert not resolve_device_settings(run_cfg(resolve_as="cuda", model={"quantize": "nf4"}), "cpu").compile



def test_loss_impl_auto_follows_the_compiled_step_and_triton_losses_are_refused_off_cuda():
    """auto: the loss traced into the compiled step wherever the step compiles (CUDA's default), else plain on
    CUDA and chunked on the CPU; liger/cce (Triton kernels) asked for on the CPU are refused by name."""
    assert resolve_device_settings(run_cfg(resolve_as="cuda"), "cpu").loss_impl == "compiled"
    assert resolve_device_settings(run_cfg(resolve_as="cuda", compile=False), "cpu").loss_impl == "plain"
    assert resolve_device_settings(run_cfg(), "cpu").loss_impl == "chunked"
    with pytest.raises((ImportError, ValueError), match="loss_impl=liger"):
        resolve_device_settings(run_cfg(loss_impl="liger"), "cpu")


def test_settings_given_are_kept_and_written_where_the_code_reads_them():
    cfg = run_cfg(resolve_as="cuda", compile=False, attention="dense", trainer={"precision": "32-true"},
                  optim={"fused": False}, data={"kind": "instruct", "packing": False, "loader_workers": 0})
    s = resolve_device_settings(cfg, "cpu")
    assert (s.precision, s.fused_adamw, s.compile, s.packing, s.attention, s.loader_workers) == \
        ("32-true", False, False, False, "dense", 0)
    assert "precision" not in s.why and "compile" not in s.why  # given, not resolved
    applied = apply_device_settings(run_cfg(resolve_as="cuda"), resolve_device_settings(run_cfg(resolve_as="cuda"),
                                                                                          "cpu"))
    assert (applied["trainer"]["precision"], applied["optim"]["fused"], applied["compile"],
            applied["data"]["packing"], applied["attention"]) == ("bf16-mixed", True, True, True, "dense")
    with pytest.raises(ValueError, match="resolve_as='tpu'"):
        resolve_device_settings(run_cfg(resolve_as="tpu"), "cpu")
    with pytest.raises(ValueError, match="compile='maybe'"):
        resolve_device_settings(run_cfg(compile="maybe"), "cpu")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    # An own inductor cache: processes compiling at once share no headers.
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "offline",
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor"))}


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(torch, "compiler") or not hasattr(torch.compiler, "set_stance"),
                    reason="torch.compiler.set_stance (torch >= 2.6)")
def test_train_py_runs_with_the_cuda_settings_on_the_cpu(tmp_path: Path, env: dict):
    """The README's command with resolve_as=cuda (and the demo's fixed CPU settings back to auto): before the
    clip fix it crashed at the first optimizer step (fused AdamW + gradient_clip_val under AMP)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "experiment=demo", "resolve_as=cuda", "trainer.precision=auto",
           "data.packing=null", "optim.fused=null", "compile=null", "trainer.gradient_clip_val=1.0",
           "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
           "trainer.enable_progress_bar=false", "data.batch_size=4", "data.n_shards=3", "data.stories_per_shard=60",
           "data.tokenizer=train:384", "model=tiny", "model.n_heads=2", "model.n_kv_heads=2",
           "model.max_seq_len=256", "evaluation.adherence_n=2", "evaluation.max_new_tokens=8",
           "callbacks.samples=null", "logger=csv", "export_dir=null", f"paths.cache_dir={tmp_path / 'cache'}",
           f"hydra.run.dir={run_dir}"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 3 and math.isfinite(summary["val/loss"]) and summary["tokens_per_s"] > 0
    assert summary["adherence"]["n_stories"] == 2
    log = (run_dir / "train.log").read_text()
    table = log[log.index("device settings"):].splitlines()[:11]
    rows = {line.split()[0]: line.split()[1] for line in table[1:]}
    assert "resolved as cuda" in table[0]
    assert (rows["precision"], rows["fused_adamw"], rows["compile"], rows["packing"], rows["attention"],
            rows["eval_batching"]) == ("bf16-mixed", "True", "True", "True", "dense", "padded")
    assert "no backward on the cpu" in log  # flex attention's fallback, with its reason
    assert "'enabled': True" in log[log.index("data.packing:"):].splitlines()[0]  # the train split was packed
    assert "Using bfloat16 Automatic Mixed Precision" in out
    assert "compiling the training step as one graph (loss_impl=compiled" in log
    ckpt = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)
    assert all(g["fused"] for g in ckpt["optimizer_states"][0]["param_groups"])  # fused AdamW stepped


@pytest.mark.slow
def test_bench_train_runs_with_the_cuda_settings_on_the_cpu(tmp_path: Path, env: dict):
    out = tmp_path / "bench.json"
    """bench_train's Lightning path crashed on a GPU as train.py did. A pretraining config of the 260K model keeps
    it short (the instruct configs' 32000-piece head in bf16 is slow on a CPU; packed rows: the train.py test)."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--configs", "260k_cpu",
                          "--device", "cpu", "--resolve-as", "cuda", "--batch", "4", "--steps", "3",
                          "--warmup", "1", "--repeats", "1", "--loader-workers", "0",
                          "--run-dir", str(tmp_path / "runs"), "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["layout"] for r in rows] == ["dense"]
    for r in rows:
        assert (r["precision"], r["compile"], r["fused_adamw"]) == ("bf16-mixed", True, True)
        assert r["plain_tokens_per_s"] > 0 and r["lightning_tokens_per_s"] > 0
    assert "resolved as cuda" in run.stdout
