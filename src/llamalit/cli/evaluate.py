"""``python scripts/evaluate.py ckpt=PATH data=synthetic [n=100 max_new_tokens=200 ...]`` / ``llamalit-evaluate``.

With ``tasks=[NAME or task.yaml, ...]`` it runs lm-evaluation-harness tasks on the model instead
(:mod:`llamalit.inference.harness_run`; ``pip install llamalit[eval]``). Without, instruction adherence of a checkpoint on held-out instructions (the validation shard ``data00`` of
``data.source``, or of ``source=`` when given): prints a table, writes JSON to ``out=`` when given.
The tokenizer is ``tokenizer=``, else the checkpoint's (its ``config.json`` or a ``tokenizer.model``
beside it), else the prepared data's (``data.dir/tokenizer.model``), else for a 32000-piece model
the Llama 2 tokenizer.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import hydra
from omegaconf import DictConfig, OmegaConf

from llamalit.cli import CONFIG_PATH


def format_table(result: Mapping, title: str = "") -> str:
    """A plain-text table of the adherence metrics, then the example stories."""
    keys = ["adherence", "word_recall", "feature_rate"]
    keys += sorted(k for k in result if k.startswith("feature/"))
    lines = [title] if title else []
    lines.append(f"{'metric':<24} {'value':>8}")
    lines.append("-" * 33)
    for k in keys:
        v = result.get(k)
        lines.append(f"{k:<24} {'-' if v is None else f'{v:.3f}':>8}")
    lines.append(f"{'stories':<24} {result.get('n_stories', 0):>8}")
    lines.append(f"{'skipped (too long)':<24} {result.get('skipped', 0):>8}")
    secs = result.get("seconds") or 0.0
    rate = result.get("new_tokens", 0) / secs if secs else 0.0
    lines.append(f"{'tokens/s':<24} {rate:>8.1f}")
    for i, ex in enumerate(result.get("examples", [])):
        lines.append("")
        score = "-" if ex["adherence"] is None else f"{ex['adherence']:.2f}"
        lines.append(f"[{i}] words {ex['words']} features {ex['features']} -> adherence {score}, "
                     f"missing {ex['words_missing']}")
        lines.append("    " + ex["story"][:400].replace("\n", "\n    "))
    return "\n".join(lines)


def run_evaluate(cfg: Mapping, out: TextIO | None = None) -> dict:
    """Load the checkpoint and tokenizer, evaluate on held-out records, print, write ``cfg.out``."""
    from llamalit.checkpoints.detect import fetch, load_checkpoint
    from llamalit.data.tokenizer import Tokenizer
    from llamalit.inference.evaluation import evaluate_adherence, held_out_records
    from llamalit.inference.loading import pick_tokenizer, resolve_device
    from llamalit.settings.checks import DATA_PATH_KEYS, check_evaluate_settings, expand_paths
    from llamalit.utils.fileio import atomic_write_json

    check_evaluate_settings(cfg)
    cfg = copy.deepcopy(dict(cfg))
    expand_paths(cfg, ("ckpt", "source", "tokenizer", "out", *DATA_PATH_KEYS))
    out = out if out is not None else sys.stdout
    local = fetch(cfg["ckpt"])
    model = load_checkpoint(local)
    tok = Tokenizer(pick_tokenizer(cfg, local, model.cfg.vocab_size))
    if tok.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocab_size is "
                         f"{model.cfg.vocab_size}; pass tokenizer= the one the model was trained with")
    model.to(resolve_device(cfg.get("device")))
    n = cfg.get("n")
    cache_dir = (cfg.get("paths") or {}).get("cache_dir")
    records = held_out_records(cfg.get("source") or cfg["data"], n=None if n in (None, 0) else int(n),
                               seed=int(cfg.get("seed", 0)), cache_dir=cache_dir)
    result = evaluate_adherence(model, tok, records, max_new_tokens=int(cfg.get("max_new_tokens", 200)),
                                temperature=float(cfg.get("temperature", 0.0)), seed=int(cfg.get("seed", 0)),
                                batch_size=int(cfg.get("batch_size", 8)), n_examples=int(cfg.get("examples", 3)))
    result = {"ckpt": str(cfg["ckpt"]), "tokenizer": str(tok.path),
              "data": cfg.get("source") or (cfg.get("data") or {}).get("name"), **result}
    out.write(format_table(result, title=f"instruction adherence: {cfg['ckpt']} on {result['data']}") + "\n")
    if cfg.get("out"):
        atomic_write_json(Path(str(cfg["out"])).expanduser(), result)
        out.write(f"wrote {cfg['out']}\n")
    out.flush()
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def hydra_main(cfg: DictConfig) -> float | None:
    """Evaluate; return the mean adherence."""
    from llamalit.cli import user_errors

    with user_errors():
        settings = OmegaConf.to_container(cfg, resolve=True)
        if settings.get("tasks"):
            run_tasks(settings)
            return None
        return run_evaluate(settings)["adherence"]


def run_tasks(cfg: Mapping, out: TextIO | None = None) -> dict:
    """The harness path: settings checked and paths expanded as for adherence, then the tasks run."""
    from llamalit.inference.harness_run import run_harness
    from llamalit.settings.checks import DATA_PATH_KEYS, check_evaluate_settings, expand_paths, integer

    check_evaluate_settings(cfg)
    integer(cfg, "limit", 1, nullable=True, what="documents per task")
    integer(cfg, "num_fewshot", 0, nullable=True, what="examples in each prompt (null: the task's own)")
    integer(cfg, "max_gen_toks", 1, nullable=True, what="tokens generated per request (null: the task's)")
    integer(cfg, "bootstrap_iters", 0, what="resamples for the stderr of non-mean metrics")
    cfg = copy.deepcopy(dict(cfg))
    expand_paths(cfg, ("ckpt", "source", "tokenizer", "out", *DATA_PATH_KEYS))
    return run_harness(cfg, out)


def main() -> None:
    """The console script: Hydra's own errors (an unknown option or key, an unwritable run directory) as one
    ``error:`` line too."""
    from llamalit.cli import run_cli

    run_cli(hydra_main)


if __name__ == "__main__":
    main()
