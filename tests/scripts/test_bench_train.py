"""scripts/bench_train.py runs end to end (issue 8's table): a CPU rehearsal of a GPU config at a tiny batch.

No timing is asserted here; the figures come from the script on a GPU (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def import_bench_train():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("bench_train")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def bench_train(capsys, *args: str) -> str:
    """bench_train.main(args) in this process (its imports are paid once); what it printed."""
    bench = import_bench_train()
    sys.path.insert(0, str(ROOT / "scripts"))  # the instruct configs import bench_packing
    try:
        assert bench.main(list(args))
    finally:
        sys.path.remove(str(ROOT / "scripts"))
        torch._dynamo.reset()  # the compiled steps' caches stay out of the tests that follow
    return capsys.readouterr().out


def test_instruct_config_rehearsed_on_the_cpu_reports_padded_and_packed_rows(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    stdout = bench_train(capsys, "--configs", "15m_instruct", "--device", "cpu", "--batch", "1", "--accum", "1",
                      "--steps", "2", "--warmup", "1", "--repeats", "1", "--compile", "off",
                      "--run-dir", str(tmp_path / "runs"), "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    padded, packed = rows
    assert (padded["layout"], packed["layout"]) == ("padded", "packed")
    assert padded["config"] == "15M instruct 1x350x1" and padded["llama2c_tokens_per_s"] is None  # not its shape
    for r in rows:
        assert r["plain_tokens_per_s"] > 0 and r["lightning_tokens_per_s"] > 0 and r["mfu"] is None  # CPU: no peak
        assert 0 < r["useful_fraction"] < 1  # prompts (and padding) carry no loss
        assert r["useful_tokens_per_s"] < r["lightning_tokens_per_s"]
        assert r["plain_step"] == r["lightning_step"] == "eager/chunked"  # uncompiled on the CPU: the module's loss
    assert "15M instruct 1x350x1" in stdout and "useful/s" in stdout  # the printed table
    assert "15M instruct 1x350x1 packed [eager/chunked]: Lightning vs plain loop" in stdout  # the printed checks


def test_compiled_rehearsal_times_the_one_graph_step_in_both_paths_and_profiles_it(tmp_path: Path, capsys) -> None:
    """With compile on, the plain loop runs the module's one compiled graph per micro-batch (not compiled blocks
    and an eager loss), as the Lightning path does; the profile runs the same step."""
    out = tmp_path / "bench.json"
    stdout = bench_train(capsys, "--configs", "260k_cpu", "--device", "cpu", "--batch", "2", "--compile", "on",
                      "--steps", "2", "--warmup", "1", "--repeats", "1", "--profile",
                      "--run-dir", str(tmp_path / "runs"), "--json", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["compile"] is True and row["compile_mode"] == "default"
    assert row["plain_step"] == row["lightning_step"] == "one graph/compiled"
    assert "one graph/compiled" in stdout
    assert (tmp_path / "runs" / "profile_260k_cpu_dense.txt").stat().st_size > 0


def test_the_plain_loop_steps_as_the_module_resolves_it() -> None:
    """bench_train.training_step picks what LlamaLitModule.on_fit_start picks for compile and loss_impl=auto."""
    from llamalit.model.llama import Llama, ModelConfig

    bench = import_bench_train()
    model = Llama(ModelConfig.preset("tiny"))
    assert bench.training_step(model, "cpu", False)[1] == "eager/chunked"
    assert bench.training_step(model, "cpu", True)[1] == "one graph/compiled"
    assert all(layer._compiled_call_impl is None for layer in model.layers)  # no compiled blocks besides


@pytest.mark.parametrize("args, reason", [
    (["--configs", "15m_pretrain,nope"], "unknown ['nope']"),
    (["--configs", "260k_cpu", "--steps", "3", "--warmup", "3"], "must exceed --warmup"),
    (["--configs", "260k_cpu", "--batch", "0"], "at least 1"),
])
def test_bad_arguments_are_refused_with_the_reason(args: list[str], reason: str, capsys) -> None:
    bench = import_bench_train()
    with pytest.raises(SystemExit) as exit_:
        bench.main([*args, "--device", "cpu"])
    assert exit_.value.code == 2 and reason in capsys.readouterr().err
