"""Throughput and MFU: peaks from Lightning's FLOPs table (the H200 read as the H100 SXM it matches), our
token and useful-token counts in summary.json."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.fabric.utilities.throughput import _CUDA_FLOPS

import llamalit.cli
from llamalit.training.callbacks import compute_dtype, peak_flops


@pytest.mark.parametrize(("name", "chip"), [("NVIDIA H100 80GB HBM3", "h100 sxm"), ("NVIDIA A100-SXM4-80GB", "a100"),
                                            ("NVIDIA H200", "h100 sxm"), ("NVIDIA H200 SXM1", "h100 sxm")])
def test_gpu_peaks_come_from_lightnings_table(monkeypatch, name, chip):
    """No GPU here: the device name is what get_available_flops reads, so it is the one thing set."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda")
    assert peak_flops(cuda, dtype=torch.bfloat16) == _CUDA_FLOPS[chip][torch.bfloat16]
    assert peak_flops(cuda, dtype=torch.float16) == _CUDA_FLOPS[chip][torch.float16]
    assert peak_flops(cuda, configured=1e12) == 1e12


def test_cpu_has_no_peak_unless_configured():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 5e11) == 5e11
    assert [compute_dtype(p) for p in ("bf16-mixed", "bf16-true", "16-mixed", "32-true", 32, "64-true")] == \
        [torch.bfloat16, torch.bfloat16, torch.float16, torch.float32, torch.float32, torch.float64]


def test_summary_reports_tokens_useful_tokens_and_mfu(tmp_path, tiny_tokenizer):
    """A configured peak gives MFU on the CPU too: flops per token x tokens/s over the peak."""
    from llamalit.training.run import train

    overrides = ["experiment=demo", f"run_dir={tmp_path / 'run'}", "logger=none", f"paths.cache_dir={tmp_path}",
                 f"data.tokenizer={tiny_tokenizer.path}", "data.n_shards=2", "data.stories_per_shard=40",
                 "data.batch_size=4", "data.num_workers=1", "model=tiny", "trainer.max_steps=4",
                 "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=2",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 "evaluation.adherence_n=0", "callbacks.samples.max_new_tokens=4", "export_dir=null",
                 "callbacks.speed.peak_flops_per_s=1e12"]
    with initialize_config_dir(config_dir=llamalit.cli.CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    summary = train(cfg)
    assert summary["tokens_per_s"] > 0 and 0 < summary["useful_tokens_per_s"] < summary["tokens_per_s"]
    assert summary["tokens_seen"] == 4 * 4 * (cfg.data.seq_len - 1)
    assert summary["mfu"] is not None and 0 < summary["mfu"] < 1
