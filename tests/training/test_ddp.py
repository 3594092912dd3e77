"""Two-process DDP on CPU (gloo), the way a user runs it: ``python train.py ... trainer.strategy=ddp trainer.devices=2``.

Lightning re-launches ``train.py`` for rank 1 with the same Hydra overrides. A callback (this module, put on
``PYTHONPATH``) writes the hash of every training row each rank saw: the two ranks must see different rows,
and together exactly the rows one process reads with a batch twice as large (each step consumes one
contiguous block of the epoch's order).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import llamalit.cli
from llamalit.utils.fileio import atomic_write_json

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 3, 4


def row_hash(row: torch.Tensor) -> str:
    return hashlib.sha1(row.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class BatchHashRecorder(L.Callback):
    """Writes ``rank{R}.json``: the world size and, per training batch, the hashes of its input rows."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.batches: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append([row_hash(r) for r in batch["input_ids"].cpu()])

    def on_train_end(self, trainer, pl_module):
        atomic_write_json(self.out_dir / f"rank{trainer.global_rank}.json",
                          {"world_size": trainer.world_size, "batches": self.batches})


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
def test_two_process_ddp_run_splits_the_data(tmp_path):
    run_dir, hashes, cache = tmp_path / "run", tmp_path / "hashes", tmp_path / "cache"
    hashes.mkdir()
    overrides = [
        "experiment=demo", "model=tiny", f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}", "logger=csv",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}", "trainer.limit_val_batches=2", "trainer.enable_model_summary=false",
        "data.n_shards=3", "data.stories_per_shard=60", "data.tokenizer=train:384", f"data.batch_size={BATCH}",
        "data.num_workers=1", "data.loader_workers=0", "evaluation.adherence_n=0", "callbacks.samples=null",
        "+callbacks.batch_hashes._target_=test_ddp.BatchHashRecorder", f"+callbacks.batch_hashes.out_dir={hashes}",
    ]
    here = str(Path(__file__).resolve().parent)  # where train.py's Hydra finds test_ddp.BatchHashRecorder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}  # no thread oversubscription on a shared CPU
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    ranks = [json.loads((hashes / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [len(r["batches"]) for r in ranks] == [STEPS, STEPS]
    seen = [[h for b in r["batches"] for h in b] for r in ranks]
    assert all(len(s) == STEPS * BATCH for s in seen)
    assert not set(seen[0]) & set(seen[1])  # the ranks never share a row

    # Together: the first STEPS batches of one process reading 2 x BATCH rows at a time.
    from hydra import compose, initialize_config_dir

    from llamalit.data.datamodule import LlamaDataModule

    with initialize_config_dir(config_dir=llamalit.cli.CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[o for o in overrides if not o.startswith(("hydra.", "+callbacks"))])
    dm = LlamaDataModule({**cfg.data, "batch_size": 2 * BATCH}, cache_dir=cache, seed=cfg.seed)
    dm.setup("fit")
    single = []
    for i, batch in zip(range(STEPS), dm.train_dataloader()):
        single.append({row_hash(r) for r in batch["input_ids"]})
        assert set(ranks[0]["batches"][i]) | set(ranks[1]["batches"][i]) == single[-1], f"step {i}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["tokens_seen"] == STEPS * 2 * BATCH * (cfg.data.seq_len - 1)
    assert summary["val/loss"] is not None and (run_dir / "model.safetensors").is_file()
