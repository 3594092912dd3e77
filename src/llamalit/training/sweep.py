"""The end of a Hydra multirun: a CSV of every job's summary.json and a val/loss heatmap over rank x alpha."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from llamalit.utils.fileio import atomic_path

log = logging.getLogger(__name__)

# tokens_per_s: the whole run's (warm-up and compiling included); tokens_per_s_steady: after each fit's first
# callbacks.speed.warmup_steps optimizer steps, what to compare between runs
COLUMNS = ["rank", "alpha", "trainable_params", "val_loss", "adherence", "tokens_per_s", "tokens_per_s_steady",
           "step", "run_dir"]


def collect_summaries(sweep_dir: Path) -> list[dict]:
    """One row per job directory holding a summary.json, in job order."""
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: p.parent.name):
        s = json.loads(path.read_text())
        lora = s.get("lora") or {}
        rows.append({
            "rank": lora.get("rank"), "alpha": lora.get("alpha"),
            "trainable_params": s.get("trainable_params"), "val_loss": s.get("val/loss"),
            "adherence": (s.get("adherence") or {}).get("adherence"),
            "tokens_per_s": s.get("tokens_per_s"), "tokens_per_s_steady": s.get("tokens_per_s_steady"),
            "step": s.get("step"), "run_dir": str(path.parent),
        })
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot_heatmap(rows: list[dict], path: Path, title: str) -> bool:
    """val/loss over rank (rows) x alpha (columns); False when the sweep is not over rank and alpha."""
    ranks = sorted({r["rank"] for r in rows if r["rank"] is not None})
    alphas = sorted({r["alpha"] for r in rows if r["alpha"] is not None})
    if not ranks or not alphas:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(ranks), len(alphas)), np.nan)
    for r in rows:
        if r["rank"] in ranks and r["alpha"] in alphas and r["val_loss"] is not None:
            grid[ranks.index(r["rank"]), alphas.index(r["alpha"])] = r["val_loss"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(alphas), 1.4 + 0.9 * len(ranks)))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(alphas)), [str(a) for a in alphas])
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("lora.alpha")
    ax.set_ylabel("lora.rank")
    ax.set_title(title)
    for i in range(len(ranks)):
        for j in range(len(alphas)):
            if not np.isnan(grid[i, j]):
                dark = im.norm(grid[i, j]) > 0.5  # viridis_r: high losses are dark cells
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white" if dark else "black",
                        fontsize=9)
    fig.colorbar(im, ax=ax, label="val/loss")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def log_to_wandb(rows: list[dict], csv_path: Path, png_path: Path | None, config: DictConfig) -> None:
    """A summary run in the sweep's wandb group: the table and the heatmap."""
    logger_cfg = config.get("logger") or {}
    if logger_cfg.get("kind", "wandb") != "wandb":
        return
    import wandb

    from llamalit.training.loggers import wandb_mode

    group = f"{config.get('experiment_name') or 'sweep'}-{csv_path.parent.name}"
    run = wandb.init(project=logger_cfg.get("project", "llamalit"), entity=logger_cfg.get("entity"),
                     group=group, name=f"{group}-summary", job_type="sweep-summary",
                     dir=str(csv_path.parent), mode=wandb_mode(logger_cfg.get("mode")), reinit=True)
    try:
        run.log({"sweep/table": wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])})
        if png_path is not None:
            run.log({"sweep/heatmap": wandb.Image(str(png_path))})
    finally:
        run.finish()


def summarize_sweep(sweep_dir: Path, config: DictConfig | None = None) -> list[dict]:
    """Write ``sweep_summary.csv`` and ``sweep_heatmap.png`` into ``sweep_dir``; return the rows."""
    rows = collect_summaries(sweep_dir)
    if not rows:
        log.warning("no summary.json under %s: nothing to summarise", sweep_dir)
        return rows
    csv_path = sweep_dir / "sweep_summary.csv"
    write_csv(rows, csv_path)
    png_path = sweep_dir / "sweep_heatmap.png"
    title = f"val/loss: {sweep_dir.parent.name}"
    has_png = plot_heatmap(rows, png_path, title)
    if config is not None:
        try:
            log_to_wandb(rows, csv_path, png_path if has_png else None, config)
        except Exception as e:  # a dashboard hiccup must not lose the files already written
            log.warning("could not log the sweep summary to wandb: %s", e)
    log.info("sweep summary: %s (%d runs)", csv_path, len(rows))
    return rows


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks``) that summarises a multirun when it ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize_sweep(Path(config.hydra.sweep.dir), config)
