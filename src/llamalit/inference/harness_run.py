"""``llamalit-evaluate ckpt=... tasks=[...]``: lm-evaluation-harness tasks on our own model.

A task is a harness task name (``hellaswag``, ``arc_easy``: their datasets come from the Hub or its cache),
one of ours shipped in ``llamalit/inference/harness_tasks`` (``tinystories_perplexity``,
``instruct_adherence``: local files made from the held-out records of ``data=``/``source=``), or the path of a
task YAML of your own (``dataset_path: json`` + ``data_files`` runs offline). Ours are written, with their data
file's path filled in, into a temporary folder handed to ``TaskManager(include_path=...)``.

Results: the harness's results dict (without per-sample logs) as ``eval_results.json`` in the checkpoint's
directory (or ``out=``), its printed tables, and a wandb table when ``logger=wandb``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"
OUR_TASKS = {"tinystories_perplexity": "perplexity", "instruct_adherence": "adherence"}
OUR_FILES = ("adherence_metric.py",)


def task_list(value: Any) -> list[str]:
    """``tasks=[a,b]`` or ``tasks=a,b`` as a list of names/paths; a clear error for anything else."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    items = [str(x).strip() for x in items if str(x).strip()]
    items = [os.path.expanduser(os.path.expandvars(x)) if is_yaml_path(x) else x for x in items]
    if not items:
        raise ValueError(f"tasks={value!r}: give task names or task.yaml paths, e.g. tasks=[tinystories_perplexity]")
    return items


def is_yaml_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec


def task_records(kind: str, records: list[dict]) -> list[dict]:
    """Rows of one of our tasks' data file, from TinyStories-schema records."""
    from llamalit.inference.evaluation import instruction_prompt, requested

    if kind == "perplexity":
        return [{"text": r["story"]} for r in records]
    rows = []
    for i, r in enumerate(records):
        prompt = instruction_prompt(r, index=i)
        words, features = requested(r, prompt)
        rows.append({"prompt": prompt, "words": words, "features": features, "story": r.get("story", "")})
    return rows


def write_our_task(name: str, records: list[dict], data_dir: Path, include_dir: Path, max_gen_toks: int = 200) -> Path:
    """Write ``name``'s data file (content-addressed under ``data_dir``, so the datasets cache is reused) and
    its YAML, pointing at it (and generating ``max_gen_toks`` at most), into ``include_dir``."""
    from llamalit.utils.fileio import atomic_write_text

    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in task_records(OUR_TASKS[name], records))
    data_file = data_dir / f"{name}-{hashlib.sha256(body.encode()).hexdigest()[:16]}.jsonl"
    if not data_file.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(data_file, body)
    text = (TASKS_DIR / f"{name}.yaml").read_text().replace("${data_file}", json.dumps(str(data_file)))
    text = text.replace("${max_gen_toks}", str(max_gen_toks))
    (include_dir / f"{name}.yaml").write_text(text)
    for helper in OUR_FILES:
        if not (include_dir / helper).exists():
            shutil.copyfile(TASKS_DIR / helper, include_dir / helper)
    return data_file


def check_task_names(specs: list[str], manager: Any) -> None:
    """Every spec a known task/group/tag or an existing YAML file; else one error naming it."""
    known = set(manager.all_tasks)
    for spec in specs:
        if spec in known:
            continue
        if is_yaml_path(spec):
            if not Path(spec).is_file():
                raise FileNotFoundError(f"tasks: {spec}: no such task file; give the path of a task YAML")
            continue
        close = difflib.get_close_matches(spec, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"tasks: unknown task {spec!r}{hint}; ours are {', '.join(OUR_TASKS)}; `lm-eval ls tasks` "
                         "lists the harness's; or give the path of a task.yaml")


def preload(specs: list[str], manager: Any) -> None:
    """Load each task (its dataset included) so a failure names the task: offline, missing data, bad YAML."""
    for spec in specs:
        try:
            manager.load([spec])
        except (ConnectionError, OSError) as e:
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
            why = "downloads are off (HF_DATASETS_OFFLINE=1)" if offline else "the Hub could not be reached"
            raise ValueError(f"tasks: {spec} needs its dataset downloaded, and {why}: {str(e).splitlines()[0]}; "
                             "run it once with network to fill the Hugging Face cache, or use a local task.yaml "
                             "(dataset_path: json + data_files)") from e
        except Exception as e:  # the harness raises KeyError, ValueError, yaml and datasets errors
            raise ValueError(f"tasks: {spec} could not be loaded: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def results_path(cfg: Mapping) -> Path:
    """``out=``, else ``eval_results.json`` in the checkpoint's directory, else in the working directory."""
    if cfg.get("out"):
        return Path(str(cfg["out"])).expanduser()
    ckpt = Path(str(cfg["ckpt"])).expanduser()
    return (ckpt if ckpt.is_dir() else Path.cwd()) / "eval_results.json"


def log_to_wandb(cfg: Mapping, results: dict, run_dir: Path) -> None:
    """The results as a wandb table (task, filter, n-shot, metric, value, stderr) and summary values."""
    import wandb

    from llamalit.utils.wandb_mode import wandb_mode

    logger = cfg.get("logger") or {}
    run = wandb.init(project=logger.get("project") or "llamalit", entity=logger.get("entity"),
                     name=logger.get("name"), group=logger.get("group"), tags=list(logger.get("tags") or []),
                     job_type="eval", dir=str(run_dir), mode=wandb_mode(logger.get("mode", "auto")),
                     config={"ckpt": str(cfg["ckpt"]), "tasks": cfg.get("tasks"), "limit": cfg.get("limit"),
                             "num_fewshot": cfg.get("num_fewshot")})
    try:
        table = wandb.Table(columns=["task", "filter", "n-shot", "metric", "value", "stderr"])
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                metric, filt = key.split(",", 1)
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                table.add_data(task, filt, results.get("n-shot", {}).get(task), metric, float(value),
                               float(stderr) if isinstance(stderr, (int, float)) else None)
                run.summary[f"eval/{task}/{metric}"] = float(value)
        run.log({"eval/results": table})
    finally:
        run.finish()


def quiet_harness_logs() -> None:
    """The harness's INFO and per-task config warnings off (``LLAMALIT_HARNESS_VERBOSE=1`` keeps them)."""
    import logging

    if os.environ.get("LLAMALIT_HARNESS_VERBOSE") != "1":
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass


def run_harness(cfg: Mapping, out: TextIO | None = None) -> dict:
    """Run ``cfg['tasks']`` on ``cfg['ckpt']``; print the tables; write the results; return them."""
    out = out if out is not None else sys.stdout
    specs = task_list(cfg["tasks"])
    standard = [s for s in specs if s not in OUR_TASKS and not is_yaml_path(s)]
    if not standard:  # local files only: the datasets library never needs the network
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table

        from llamalit.inference.harness import LlamalitLM
    except ImportError as e:
        raise ValueError(f"tasks=: {e}" if "llamalit[eval]" in str(e) else
                         f"tasks=: lm-evaluation-harness could not be imported ({e}); pip install llamalit[eval]") from e
    from llamalit.inference.evaluation import held_out_records
    from llamalit.utils.fileio import atomic_write_json

    quiet_harness_logs()
    cache_dir = Path(str((cfg.get("paths") or {}).get("cache_dir") or "~/.cache/llamalit")).expanduser()
    lm = LlamalitLM.from_checkpoint(cfg["ckpt"], tokenizer=cfg.get("tokenizer"), cache_dir=cache_dir,
                                    data_dir=(cfg.get("data") or {}).get("dir"), device=cfg.get("device"),
                                    batch_size=int(cfg.get("batch_size") or 8),
                                    max_gen_toks=cfg.get("max_gen_toks"), truncate=bool(cfg.get("truncate", True)))
    with tempfile.TemporaryDirectory(prefix="llamalit-tasks-") as include_dir:
        ours = [s for s in specs if s in OUR_TASKS]
        if ours:
            n = cfg.get("n")
            records = held_out_records(cfg.get("source") or cfg["data"], n=None if n in (None, 0) else int(n),
                                       seed=int(cfg.get("seed", 0)), cache_dir=cache_dir)
            longest = max(len(lm.tok_encode(row["prompt"] + lm.bos_text))
                          for row in task_records("adherence", records)) if "instruct_adherence" in ours else 0
            max_new = max(1, min(int(cfg.get("max_new_tokens") or 200), lm.max_length - longest))
            for name in ours:
                write_our_task(name, records, cache_dir / "harness_data", Path(include_dir), max_new)
        manager = TaskManager(include_path=include_dir if ours else None, include_defaults=bool(standard))
        check_task_names(specs, manager)
        preload(specs, manager)
        results = simple_evaluate(
            model=lm, tasks=specs, task_manager=manager, num_fewshot=cfg.get("num_fewshot"), limit=cfg.get("limit"),
            batch_size=lm.batch_size, device=str(lm.device), gen_kwargs=cfg.get("gen_kwargs"),
            bootstrap_iters=int(cfg.get("bootstrap_iters", 1000)), log_samples=False,
            random_seed=int(cfg.get("seed", 0)), model_args={"ckpt": str(cfg["ckpt"])})
    results.pop("samples", None)
    out.write(make_table(results) + "\n")
    if results.get("groups"):
        out.write(make_table(results, "groups") + "\n")
    path = results_path(cfg)
    atomic_write_json(path, json.loads(json.dumps(results, default=handle_non_serializable)))
    out.write(f"wrote {path}\n")
    if ((cfg.get("logger") or {}).get("kind") or "none") == "wandb":
        log_to_wandb(cfg, results, path.parent)
    out.flush()
    return results
