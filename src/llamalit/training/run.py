"""One training run, top to bottom: data, model, trainer, fit, validate the best, export, summary.json."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from llamalit.checkpoints.lightning_ckpt import run_settings
from llamalit.checkpoints.run_export import (  # noqa: F401 - the run's export, imported by callers from here
    EXPORT_NAMES,
    copy_export,
    export_weights,
    exportable_model,
    model_from_module_state,
)
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig
from llamalit.settings.checks import TRAIN_PATH_KEYS, check_train_settings, expand_paths, preflight
from llamalit.settings.device import (
    DeviceSettings,
    apply_device_settings,
    device_type_of,
    log_device_settings,
    resolve_attention,
    resolve_run_settings,
)
from llamalit.training.checkpoint_io import AtomicCheckpointIO
from llamalit.training.loggers import build_logger, finish_wandb, quiet_library_output
from llamalit.training.module import LlamaLitModule
from llamalit.training.resume import check_ckpt_file, continue_in, run_dir_of, trim_metrics
from llamalit.utils.fileio import atomic_write_json

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``last``: the newest ``checkpoints/last.ckpt`` among sibling runs of this experiment."""
    if not ckpt_path:
        return None
    if ckpt_path != "last":
        check_ckpt_file(ckpt_path)  # missing or truncated: said before anything else runs
        return ckpt_path
    lasts = [p for p in run_dir.parent.glob("*/checkpoints/last.ckpt") if run_dir not in p.parents]
    if not lasts:
        raise FileNotFoundError(
            f"ckpt_path=last: no earlier run of this experiment has a checkpoints/last.ckpt under "
            f"{run_dir.parent}; pass ckpt_path=/path/to/last.ckpt"
        )
    newest = max(lasts, key=lambda p: p.stat().st_mtime)
    # a last.ckpt cut short (a full disk, a kill mid-write by an older version): the newest readable one instead
    others = [p for p in run_dir.parent.glob("*/checkpoints/*.ckpt") if run_dir not in p.parents and p != newest]
    problems = []
    for path in [newest, *sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)]:
        if (problem := unreadable(path)) is None:
            if problems:
                log.warning("ckpt_path=last: %s is not readable (%s); resuming from %s, the newest readable "
                            "checkpoint", newest, problems[0], path)
            return str(path)
        problems.append(problem)
    raise ValueError(f"ckpt_path=last: no readable checkpoint under {run_dir.parent}/*/checkpoints "
                     f"({newest}: {problems[0]}); pass ckpt_path=/path/to/a.ckpt or start afresh")


def checkpoint_step(path: str) -> int:
    """The ``global_step`` a training checkpoint was saved at (read through mmap: headers only)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt.get("global_step", 0)) if isinstance(ckpt, dict) else 0


def unreadable(path: Path) -> str | None:
    """Why ``path`` is not a loadable checkpoint (a truncated or damaged archive), or None when it is."""
    try:  # mmap: only the archive's index and headers are read
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to load means unusable
        return str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
    return None if isinstance(ckpt, dict) and "state_dict" in ckpt else "no state_dict"


def build_module(cfg: DictConfig, run: dict) -> LlamaLitModule:
    """The ``module:`` node of ``cfg`` instantiated with its interpolations (``${compile}``, ``${optim}``, ...)
    read from ``run``, the run's settings as resolved for the device; ``run["module"]`` becomes the node so
    resolved (what the logger records)."""
    node = OmegaConf.to_container(cfg.module, resolve=False)
    run["module"] = OmegaConf.to_container(OmegaConf.create({**run, "module": node}).module, resolve=True)
    return instantiate(run["module"])


def resolve_model_attention(settings: DeviceSettings, run: dict, module: LlamaLitModule) -> DeviceSettings:
    """The attention backend, resolved once the model exists (an ``init_from`` base's heads decide, not the
    preset's) and set on it; ``run["attention"]`` records it."""
    settings = resolve_attention(settings, run.get("attention"), module.model.cfg.head_dim)
    module.model.attention_backend = run["attention"] = settings.attention
    return settings


def run_name(cfg: DictConfig) -> str:
    """Experiment name plus the command-line overrides that matter (not paths/logger settings)."""
    parts = [str(cfg.get("experiment_name") or "run")]
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        # the keys the job directory names leave out (paths, URLs, init_from, ...), and these
        excluded = (*hc.job.config.override_dirname.exclude_keys, "experiment", "paths", "logger", "hydra",
                    "data.dir", "data.source", "data.tokenizer", "init_from", "ckpt_path", "run_dir", "export_dir")
        for o in hc.overrides.task:
            key = o.split("=", 1)[0].lstrip("+~")
            if not any(key == k or key.startswith(f"{k}.") for k in excluded):
                parts.append(o)
    return "-".join(parts)


def sweep_group(cfg: DictConfig) -> str | None:
    """In a multirun, every job shares one wandb group named after the sweep directory."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return None
    return f"{cfg.get('experiment_name') or 'sweep'}-{Path(hc.sweep.dir).name}"


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[L.Callback]:
    """``cfg.callbacks`` instantiated (null entries dropped); without a logger, the ones that need one too, and
    without ``trainer.enable_progress_bar`` the bar (Lightning refuses a bar it was told not to show)."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not has_logger:  # LearningRateMonitor refuses to run without a logger (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not (cfg.get("trainer") or {}).get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def check_resume(ckpt_path: str, module: LlamaLitModule) -> None:
    """Refuse, naming the key and both settings, a ``ckpt_path`` that is not a training checkpoint or whose
    tensors do not fit this run's model (Lightning would fail later with a page of state-dict errors)."""
    try:  # mmap: only the headers are read here; Lightning loads the tensors when it restores
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not one of our checkpoints"
        raise ValueError(f"ckpt_path={ckpt_path} is not a training checkpoint (a .ckpt that train.py wrote under "
                         f"run_dir/checkpoints/): {str(e).splitlines()[0]}. To start from other weights use "
                         "init_from=") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"ckpt_path={ckpt_path} has no 'state_dict': not a training checkpoint; to start from "
                         "these weights use init_from=")
    own = module.state_dict()
    unexpected = sorted(k for k in ckpt["state_dict"] if k not in own)
    wrong = sorted(k for k, v in ckpt["state_dict"].items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    if not unexpected and not wrong:
        return
    differ = settings_differ(run_settings(ckpt.get("hyper_parameters")), module)
    what = (f"{wrong[0]} is {tuple(ckpt['state_dict'][wrong[0]].shape)} there but "
            f"{tuple(own[wrong[0]].shape)} here" if wrong else f"it has {unexpected[0]}, which this model lacks")
    raise ValueError(f"ckpt_path={ckpt_path} does not fit this run's model: {what}. Resume with the settings "
                     f"that wrote it" + (f": {'; '.join(differ[:6])}" if differ else " (its settings are in the "
                                         "checkpoint's hyper_parameters)"))


def settings_differ(saved: dict | None, module: LlamaLitModule) -> list[str]:
    """``model.KEY=saved (this run: ours)`` for each model shape or LoRA setting where a checkpoint's
    :func:`~llamalit.checkpoints.lightning_ckpt.run_settings` and this run's module differ."""
    if saved is None:
        return []
    ours = run_settings(module.hparams)
    differ = []
    for group, normal in (("model", _shape), ("lora", _adapter)):
        try:
            theirs, mine = normal(saved[group]), normal(ours[group])
        except (TypeError, ValueError):
            continue  # settings this version cannot read: the shapes in the message say enough
        differ += [f"{group}.{key}={theirs.get(key)!r} (this run: {mine.get(key)!r})"
                   for key in dict.fromkeys([*theirs, *mine]) if theirs.get(key) != mine.get(key)]
    return differ


def _shape(model: dict) -> dict:
    return ModelConfig.from_dict(model).to_dict()


def _adapter(lora: dict | None) -> dict:
    return {"enabled": True, **LoraConfig.from_dict(lora).to_dict()} if lora else {"enabled": False}


def adapt_model_to_data(run: dict, vocab_size: int, input_len: int) -> None:
    """From scratch, the model takes the tokenizer's vocab; any model grows its context to the data's."""
    model = run["model"]
    if not run.get("init_from") and model["vocab_size"] != vocab_size:
        log.info("model.vocab_size %s -> %s (the tokenizer's)", model["vocab_size"], vocab_size)
        model["vocab_size"] = vocab_size
    if model["max_seq_len"] < input_len:
        log.info("model.max_seq_len %s -> %s (the data's)", model["max_seq_len"], input_len)
        model["max_seq_len"] = input_len


def check_vocab(model_vocab: int, data_vocab: int, init_from: str | None, tokenizer: Path | None) -> None:
    """A model must have an embedding row for every token id of the data's tokenizer."""
    if model_vocab < data_vocab:
        raise ValueError(f"init_from={init_from}: the model has {model_vocab} token embeddings but the data's "
                         f"tokenizer {tokenizer} has {data_vocab} pieces; use the base model's tokenizer "
                         "(data.tokenizer=...) or another base")
    if model_vocab != data_vocab:
        log.warning("model vocab %d > tokenizer vocab %d (%s): the extra rows are never used",
                    model_vocab, data_vocab, tokenizer)


def check_base_tokenizer(init_from: str | None, data_tokenizer: str | Path | None) -> None:
    """A base that names or holds its tokenizer must have been trained with the data's: the same pieces in the
    same order, not only as many (ids would mean other text)."""
    if not init_from or not data_tokenizer or not Path(data_tokenizer).is_file():
        return
    from llamalit.checkpoints import find_tokenizer
    from llamalit.checkpoints.detect import fetch
    from llamalit.data.tokenizer import Tokenizer, TokenizerError

    found = find_tokenizer(fetch(str(init_from)))
    if found is None or not Path(found).is_file() or Path(found).suffix != ".model":
        return  # nothing to compare (a llama2.c .pt, a Hugging Face tokenizer.json): the vocab size check only
    try:
        base_tok = Tokenizer(found)
    except TokenizerError:
        return
    data_tok = Tokenizer(data_tokenizer)
    if not base_tok.same_as(data_tok):
        raise ValueError(f"init_from={init_from}: the base model was trained with tokenizer {found} "
                         f"({base_tok.vocab_size} pieces), which differs from the data's tokenizer {data_tokenizer} "
                         f"({data_tok.vocab_size} pieces): its token ids would mean other text. Set "
                         f"data.tokenizer={found} (and a new data.dir), or use a base trained with the data's tokenizer")


def run_adherence(cfg: DictConfig, module: LlamaLitModule, model: Llama, dm, batching: str = "auto") -> dict | None:
    """Instruction adherence on held-out TinyStories-format instructions (instruct data only); ``batching`` as
    the device settings resolved it (left-padded batches on CUDA)."""
    ev = cfg.get("evaluation") or {}
    if not ev.get("adherence_n") or dm.manifest.get("kind") != "instruct" or \
            cfg.data.get("format", "tinystories") != "tinystories":
        return None
    from llamalit.data.tokenizer import Tokenizer
    from llamalit.inference.evaluation import evaluate_adherence, held_out_records

    records = held_out_records(OmegaConf.to_container(cfg.data, resolve=True), n=ev.adherence_n,
                               seed=cfg.seed, cache_dir=cfg.paths.cache_dir)
    # on the training device (Lightning moved the model back to the CPU when fit and validate ended), eagerly:
    # compiled blocks would compile again for inference mode and for every new cache length
    device, home = module.trainer.strategy.root_device, next(model.parameters()).device
    try:
        with torch.compiler.set_stance("force_eager"):
            result = evaluate_adherence(model.to(device), Tokenizer(dm.tokenizer_path), records,
                                        max_new_tokens=ev.get("max_new_tokens", 200), n_examples=2,
                                        batch_size=ev.get("batch_size", 32), batching=batching)
    finally:
        model.to(home)
    if module.logger is not None:
        module.logger.log_metrics({f"adherence/{k}": v for k, v in result.items()
                                   if isinstance(v, (int, float)) and v is not None}, step=module.global_step)
    log.info("adherence on %s: %s", device, {k: result.get(k) for k in ("adherence", "word_recall", "feature_rate",
                                                                          "seconds")})
    return result


def train(cfg: DictConfig) -> dict:
    """Run ``cfg`` and return the summary written to ``summary.json`` in the run directory."""
    from llamalit.data.datamodule import LlamaDataModule

    start = time.time()
    quiet_library_output()
    expand_paths(cfg, TRAIN_PATH_KEYS)  # ~ and $VARS, from the user or a default (the cache dir)
    check_train_settings(cfg)
    preflight(cfg)
    run_dir = Path(str(cfg.run_dir))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    if (resumed_dir := run_dir_of(ckpt_path)) is not None:  # continue in the checkpoint's own run directory
        run_dir = continue_in(resumed_dir, run_dir)
        cfg.run_dir = str(run_dir)
        trim_metrics(run_dir, checkpoint_step(ckpt_path))
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    # the run's config, converted and resolved once; every step below reads (and completes) this dict
    run = OmegaConf.to_container(cfg, resolve=True)
    settings = resolve_run_settings(run, device_type_of(cfg.trainer.get("accelerator")))
    run = apply_device_settings(run, settings)

    dm = LlamaDataModule(run["data"], cache_dir=cfg.paths.cache_dir, seed=cfg.seed)
    dm.prepare_data()
    dm.setup("fit")
    adapt_model_to_data(run, dm.vocab_size, dm.seq_len)

    module = build_module(cfg, run)
    settings = resolve_model_attention(settings, run, module)
    log_device_settings(settings)
    check_vocab(module.model.cfg.vocab_size, dm.vocab_size, cfg.get("init_from"), dm.tokenizer_path)
    check_base_tokenizer(cfg.get("init_from"), dm.tokenizer_path)
    if ckpt_path:
        check_resume(ckpt_path, module)

    logger = build_logger(cfg.logger, run_dir, run_name(cfg), sweep_group(cfg), run)
    callbacks = build_callbacks(cfg, has_logger=logger is not None)
    trainer_cfg = dict(run["trainer"])
    plugins = [*(trainer_cfg.pop("plugins", None) or []), AtomicCheckpointIO()]  # checkpoints never half-written
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=logger or False,
                                     default_root_dir=str(run_dir), plugins=plugins)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        summary = finish_run(cfg, run, trainer, module, dm, run_dir, start)
    finally:
        finish_wandb()
    return summary


def finish_run(cfg: DictConfig, resolved: dict, trainer: L.Trainer, module: LlamaLitModule, dm,
               run_dir: Path, start: float) -> dict:
    """Validate the best checkpoint, export its weights and write summary.json."""
    if trainer.global_step == 0:  # e.g. trainer.limit_train_batches=0: the weights are the random init
        where = f" nor published to export_dir={cfg.export_dir}" if cfg.get("export_dir") else ""
        raise ValueError("the run made no optimizer step (see trainer.max_steps, trainer.limit_train_batches, "
                         f"trainer.max_epochs): its untrained weights are not exported{where}")
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    last = ckpt_cb.last_model_path if ckpt_cb is not None else ""
    # read before validating the best checkpoint: restoring it restores the callbacks' state too, which
    # would report the token counts of the best step instead of the whole run
    speed = next((c for c in trainer.callbacks if c.__class__.__name__ == "SpeedMonitor"), None)
    throughput = {
        "tokens_seen": speed.tokens_seen if speed else None,
        "tokens_per_s": (speed.tokens_seen / speed.train_time_s) if speed and speed.train_time_s else None,
        "useful_tokens_seen": speed.useful_tokens_seen if speed else None,
        "useful_tokens_per_s": (speed.useful_tokens_seen / speed.train_time_s)
        if speed and speed.train_time_s else None,
        "mfu": speed.mfu if speed else None,
        "tokens_per_s_steady": speed.steady_tokens_per_s if speed else None,  # warm-up steps excluded
    }
    metrics = {}
    if not trainer.fast_dev_run:
        ckpt = best or last or None
        results = trainer.validate(module, datamodule=dm, ckpt_path=ckpt, verbose=False)
        metrics = results[0] if results else {}
    else:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    files = {}
    model = exportable_model(trainer, module)
    if trainer.is_global_zero:
        files = export_weights(model, run_dir, dm.tokenizer_path, resolved)
        if (cfg.get("export") or {}).get("merged_hf") and (cfg.get("lora") or {}).get("enabled") \
                and cfg.get("init_from"):  # the QLoRA guide's merge_and_unload: a plain HF model to ship
            from llamalit.checkpoints.merged import export_merged_hf
            from llamalit.model.lora import LoraConfig, lora_state_dict

            files["merged_hf"] = str(export_merged_hf(
                cfg.init_from, lora_state_dict(model), LoraConfig.from_dict(resolved["lora"]),
                run_dir / "merged_hf", tokenizer=dm.tokenizer_path))
        if cfg.get("export_dir") and not trainer.fast_dev_run:  # a smoke run does not replace the shared model
            copy_export(files, Path(str(cfg.export_dir)).expanduser())
    adherence = None
    if trainer.is_global_zero:
        adherence = run_adherence(cfg, module, model, dm,
                                  batching=(resolved.get("evaluation") or {}).get("batching", "auto"))
    summary = {
        "experiment": cfg.get("experiment_name"),
        "val/loss": float(metrics["val/loss"]) if "val/loss" in metrics else None,
        "val/ppl": float(metrics["val/ppl"]) if "val/ppl" in metrics else None,
        "val/acc": float(metrics["val/acc"]) if "val/acc" in metrics else None,
        "uniform_loss": float(torch.log(torch.tensor(float(module.model.cfg.vocab_size)))),
        "vocab_size": module.model.cfg.vocab_size,
        "step": trainer.global_step,
        **throughput,
        "params": (model or module.model).num_params(),  # the whole model (FSDP ranks hold shards)
        "trainable_params": (model or module.model).num_params(trainable_only=True),
        "lora": resolved.get("lora"),
        "adherence": adherence,
        "best_checkpoint": best or None,
        "last_checkpoint": last or None,
        "files": files,
        "run_dir": str(run_dir),
        "seconds": round(time.time() - start, 1),
    }
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "summary.json", summary)
        from llamalit.checkpoints.model_card import write_run_cards  # README.md: the Hub's model card

        write_run_cards(resolved, summary, run_dir, cfg.get("export_dir") if not trainer.fast_dev_run else None)
        log.info("summary: %s", {k: summary[k] for k in ("val/loss", "step", "tokens_per_s")})
    return summary
