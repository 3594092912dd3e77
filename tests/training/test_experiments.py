"""Every ``conf/experiment/*.yaml`` composes and runs ``train()`` (fast_dev_run, tiny overrides); one full tiny run.

The real config tree is composed with Hydra's compose API; only sizes, paths and the data source are
overridden. Real-format data: ``make_corpus`` JSON shards stand in for TinyStories (``data.source`` a
directory), with a vocabulary trained on them (``data.tokenizer=train:N``). LoRA bases: a llama2.c-style
``.pt`` (from a path and from a local HTTP server) and a native directory written by ``save_model``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

import llamalit.cli
from llamalit.checkpoints import load_checkpoint, save_hf
from llamalit.checkpoints.native import save_model
from llamalit.data.datamodule import LlamaDataModule
from llamalit.data.download import is_url
from llamalit.data.synthetic import make_corpus
from llamalit.model.llama import Llama, ModelConfig
from llamalit.training.module import LlamaLitModule
from llamalit.training.run import run_name, sweep_group, train

CONF_DIR = Path(llamalit.cli.CONF_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
VOCAB = 384  # train:N pieces; the small corpus needs more than the 256 byte pieces + specials

# Small everything; the experiment's own settings (LoRA targets, data kind, schedule) stay.
TINY = ["logger=none", "trainer.accelerator=cpu", "trainer.enable_model_summary=false", "data.batch_size=4",
        "data.num_workers=1", "data.loader_workers=0", "evaluation.adherence_n=2", "evaluation.max_new_tokens=8",
        "callbacks.samples.max_new_tokens=8"]
TINY_MODEL = ["model=tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")


def compose_cfg(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    """A cache shared by the module's runs (data prepared once per data config) and a real-format corpus."""
    root = tmp_path_factory.mktemp("experiments")
    corpus = make_corpus(root / "tinystories_json", 3, 60, seed=0)
    return SimpleNamespace(root=root, cache=root / "cache", corpus_dir=corpus[0].parent)


def alpaca_json(env: SimpleNamespace) -> Path:
    """An Alpaca-format file (instruction/input/output) made from the real-format corpus."""
    path = env.root / "alpaca_data.json"
    if not path.exists():
        records = [{"instruction": r["instruction"]["prompt:"], "input": "", "output": r["story"]}
                   for f in sorted(env.corpus_dir.glob("data*.json")) for r in json.loads(f.read_text())]
        path.write_text(json.dumps(records))
    return path


def data_overrides(cfg: DictConfig, env: SimpleNamespace) -> list[str]:
    """Local data for the experiment's data config: the generated corpus, or its own small synthetic one."""
    if cfg.data.get("format") in ("alpaca", "dolly"):
        # QLoRA needs CUDA + bitsandbytes: the CPU run checks the rest of the recipe in bf16-free LoRA.
        return [f"data.source={alpaca_json(env)}", f"data.tokenizer=train:{VOCAB}", "data.records_per_shard=60",
                "data.seq_len=1024", "model.quantize=null", "optim.paged=false",
                "lora.rank=2"]  # r=64 would outweigh a 32-wide model
    if cfg.data.source == "synthetic":
        return ["data.n_shards=3", "data.stories_per_shard=60", f"data.tokenizer=train:{VOCAB}"]
    return [f"data.source={env.corpus_dir}", f"data.tokenizer=train:{VOCAB}", "data.tokenizer_sha256=null",
            "data.sha256=null"]


def data_vocab(cfg: DictConfig) -> int:
    """Prepare the data of ``cfg`` (as train() will find it) and return its tokenizer's vocabulary."""
    dm = LlamaDataModule(cfg.data, cache_dir=cfg.paths.cache_dir, seed=cfg.seed)
    dm.prepare_data()
    return dm.vocab_size


def tiny_base(vocab: int, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig.preset("tiny", vocab_size=vocab))


def save_llama2c_pt(model: Llama, path: Path) -> Path:
    """A checkpoint as llama2.c's train.py writes it: ``model`` (its names) + ``model_args``."""
    c = model.cfg
    args = dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                vocab_size=c.vocab_size, multiple_of=c.multiple_of, norm_eps=c.norm_eps,
                max_seq_len=c.max_seq_len, dropout=0.0)
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("freqs")}
    torch.save({"model": sd, "model_args": args, "iter_num": 0, "best_val_loss": 1e9}, path)
    return path


def base_overrides(cfg: DictConfig, vocab: int, where: Path) -> list[str]:
    """A tiny base for an experiment that starts from ``init_from``: a llama2.c .pt for a URL or .pt
    default (instruct_lora), else a native dir written where the experiment looks (demo_lora)."""
    init = cfg.get("init_from")
    if cfg.data.get("format") in ("alpaca", "dolly"):  # a Hugging Face Llama directory
        return [f"init_from={save_hf(tiny_base(vocab), where / 'hf_base')}"]
    if not init:
        return []
    if is_url(str(init)) or str(init).endswith(".pt"):
        return [f"init_from={save_llama2c_pt(tiny_base(vocab), where / 'base.pt')}"]
    save_model(tiny_base(vocab), Path(str(init)))  # e.g. ${paths.models_dir}/demo
    return []


def experiment_cfg(name: str, env: SimpleNamespace, run_dir: Path, extra: list[str] = ()) -> DictConfig:
    common = [f"experiment={name}", f"paths.cache_dir={env.cache}", f"run_dir={run_dir}", *TINY, *extra]
    cfg = compose_cfg(common)
    overrides = common + data_overrides(cfg, env)
    if not cfg.get("init_from"):
        overrides += TINY_MODEL
    cfg = compose_cfg(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    base = base_overrides(cfg, data_vocab(cfg), run_dir.parent)
    return compose_cfg(overrides + base) if base else cfg


def check_summary(summary: dict, run_dir: Path, steps: int) -> None:
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["step"] == steps
    assert math.isfinite(on_disk["val/loss"]) and on_disk["vocab_size"] == VOCAB
    assert on_disk["tokens_seen"] > 0 and on_disk["tokens_per_s"] > 0
    assert {"best_checkpoint", "last_checkpoint", "files"} <= set(on_disk)
    for path in [on_disk["best_checkpoint"], on_disk["last_checkpoint"], *on_disk["files"].values()]:
        assert path is None or Path(path).is_file() or (Path(path) / "config.json").is_file(), path  # or a model dir


def check_exports(summary: dict, run_dir: Path, lora: bool) -> None:
    if lora:
        adapter = run_dir / "adapter_model.safetensors"
        assert adapter.is_file() and (run_dir / "adapter_config.json").is_file()
        assert (run_dir / "llamalit_adapter.json").is_file()
        assert not (run_dir / "model.safetensors").exists()
        full_bytes = 4 * summary["params"]
        assert adapter.stat().st_size < full_bytes / 10  # the adapter alone, not the model
        assert summary["trainable_params"] < summary["params"] / 10
    else:
        assert (run_dir / "model.safetensors").is_file() and (run_dir / "config.json").is_file()
        assert (run_dir / "llamalit.json").is_file() and not (run_dir / "adapter_model.safetensors").exists()
        assert summary["trainable_params"] == summary["params"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_runs_fast_dev_run(name, env):
    run_dir = env.root / "runs" / name
    cfg = experiment_cfg(name, env, run_dir, ["trainer.fast_dev_run=true"])
    assert cfg.experiment_name == name
    summary = train(cfg)
    check_summary(summary, run_dir, steps=1)
    check_exports(summary, run_dir, lora=bool(cfg.lora.enabled))
    if cfg.lora.enabled:
        meta = json.loads((run_dir / "llamalit_adapter.json").read_text())
        assert meta["base"] == str(cfg.init_from)
        assert meta["lora"]["rank"] == cfg.lora.rank and meta["lora"]["alpha"] == cfg.lora.alpha
        check_adapter_checkpoint(Path(summary["last_checkpoint"]), run_dir)


def check_adapter_checkpoint(ckpt_path: Path, run_dir: Path) -> None:
    """A LoRA run's .ckpt holds the adapters only, and still loads (base from init_from) like the export."""
    ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    assert ckpt["state_dict"] and all(k.endswith(("lora_A", "lora_B")) for k in ckpt["state_dict"])
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(load_checkpoint(ckpt_path).eval()(x), load_checkpoint(run_dir).eval()(x), atol=1e-6)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_schedule_spans_its_max_steps(name):
    """The LR schedule spans trainer.estimated_stepping_batches: for every experiment, its trainer.max_steps."""
    cfg = compose_cfg([f"experiment={name}", "trainer.accelerator=cpu", "trainer.precision=32-true",
                       "trainer.strategy=auto", "trainer.devices=1", "trainer.num_nodes=1"])
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)
    assert trainer.estimated_stepping_batches == cfg.trainer.max_steps > 0


def test_experiment_names_cover_the_contract():
    assert {"pretrain", "instruct_scratch", "instruct_lora", "demo", "demo_lora"} <= set(EXPERIMENTS)


def test_instruct_lora_base_from_a_url(env, http_server, tmp_path, monkeypatch):
    """The default base is a URL: the .pt is downloaded into the cache (once) and the adapter names the URL."""
    monkeypatch.setenv("LLAMALIT_CACHE", str(tmp_path / "download_cache"))
    run_dir = tmp_path / "run"
    cfg = experiment_cfg("instruct_lora", env, run_dir, ["trainer.fast_dev_run=true"])
    http_server.files["/tinyllamas/stories_tiny.pt"] = Path(str(cfg.init_from)).read_bytes()
    url = f"{http_server.url}/tinyllamas/stories_tiny.pt"
    with open_dict(cfg):
        cfg.init_from = url
    summary = train(cfg)
    check_summary(summary, run_dir, steps=1)
    check_exports(summary, run_dir, lora=True)
    assert json.loads((run_dir / "llamalit_adapter.json").read_text())["base"] == url
    assert [p for p, _ in http_server.requests].count("/tinyllamas/stories_tiny.pt") >= 1
    check_adapter_checkpoint(Path(summary["last_checkpoint"]), run_dir)  # the base from the URL's cache
    assert list((tmp_path / "download_cache").rglob("*stories_tiny*"))


def test_lora_base_with_a_smaller_vocab_is_refused(env, tmp_path):
    run_dir = tmp_path / "run"
    cfg = experiment_cfg("instruct_lora", env, run_dir, ["trainer.fast_dev_run=true"])
    with open_dict(cfg):
        cfg.init_from = str(save_llama2c_pt(tiny_base(VOCAB - 100), tmp_path / "small_vocab.pt"))
    with pytest.raises(ValueError, match="small_vocab.pt.*284 token embeddings.*384 pieces"):
        train(cfg)


def test_full_tiny_run_validates_checkpoints_and_exports(env, tmp_path):
    run_dir = tmp_path / "run"
    cfg = experiment_cfg("demo", env, run_dir, [
        "logger=csv", "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=5", "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=3",
        f"export_dir={tmp_path / 'published'}"])
    summary = train(cfg)
    check_summary(summary, run_dir, steps=20)
    check_exports(summary, run_dir, lora=False)
    assert summary["val/loss"] < math.log(VOCAB) - 1.0 and summary["uniform_loss"] == pytest.approx(math.log(VOCAB))
    assert summary["val/ppl"] == pytest.approx(math.exp(summary["val/loss"]), rel=1e-4)
    best, last = Path(summary["best_checkpoint"]), Path(summary["last_checkpoint"])
    assert best.is_file() and last.name == "last.ckpt" and last.is_file() and best != last
    assert summary["tokens_seen"] == 20 * 4 * (cfg.data.seq_len - 1)  # instruct rows: inputs x[:-1]
    # prompts and padding carry no loss: useful tokens are a real, smaller count
    assert 0 < summary["useful_tokens_seen"] < summary["tokens_seen"] and summary["useful_tokens_per_s"] > 0
    # train/acc and the gradient norm are written on every step that writes train/loss (log_every_n_steps=5)
    import csv

    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    assert len(rows) >= 3 and all(r["train/acc"] and r["train/grad_norm"] for r in rows), rows[:2]
    assert all(0.0 <= float(r["train/acc"]) <= 1.0 for r in rows)
    # The exported weights are the best checkpoint's, loadable without Lightning, in any of its copies.
    module = LlamaLitModule.load_from_checkpoint(best, map_location="cpu", weights_only=False)
    exported, published = load_checkpoint(run_dir), load_checkpoint(tmp_path / "published")
    from_ckpt = load_checkpoint(best)
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = module.model.eval()(x)
        for model in (exported, published, from_ckpt):
            assert torch.equal(model.eval()(x), ref)
    assert json.loads((run_dir / "llamalit.json").read_text())["model"]["vocab_size"] == VOCAB


def test_summary_counts_the_whole_run_when_the_best_checkpoint_is_earlier(env, tmp_path):
    """Validating the best checkpoint restores the callbacks' state with it: the token counts must still be
    the whole run's, not those of the best step (mode=max picks the first validation here)."""
    cfg = experiment_cfg("demo", env, tmp_path / "run", [
        "logger=csv", "trainer.max_steps=12", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.mode=max", "optim.lr=1e-2", "evaluation.adherence_n=0"])
    summary = train(cfg)
    assert "step000006" in Path(summary["best_checkpoint"]).name and summary["step"] == 12
    assert summary["tokens_seen"] == 12 * 4 * (cfg.data.seq_len - 1)


def poison_training_forwards(monkeypatch, bad) -> None:
    """Training forward number n (1, 2, ...) returns NaN hidden states when ``bad(n)``; eval forwards
    (validation, samples) are left alone."""
    real = Llama.hidden
    calls = {"n": 0}

    def poisoned(self, tokens, **kw):
        h = real(self, tokens, **kw)
        if not self.training:
            return h
        calls["n"] += 1
        return h * float("nan") if bad(calls["n"]) else h

    monkeypatch.setattr(Llama, "hidden", poisoned)


def test_nan_loss_stops_train_naming_the_step(env, tmp_path, monkeypatch):
    poison_training_forwards(monkeypatch, lambda n: n == 3)
    run_dir = tmp_path / "run"
    cfg = experiment_cfg("demo", env, run_dir, ["trainer.max_steps=6", "trainer.val_check_interval=100",
                                                "trainer.limit_val_batches=1", "callbacks.samples=null"])
    with pytest.raises(FloatingPointError, match="optimizer step 2"):
        train(cfg)
    assert not (run_dir / "summary.json").exists()


@pytest.mark.parametrize("bad_call, expected", [(3, "optimizer step 2"), (7, "optimizer step 6")])
def test_deferred_nan_check_names_the_first_bad_step(env, tmp_path, monkeypatch, bad_call, expected):
    """The accelerator path (no sync per step): found at the next log interval (step 4), or at the end (7 steps)."""
    poison_training_forwards(monkeypatch, lambda n: n >= bad_call)
    monkeypatch.setattr(LlamaLitModule, "defer_finite_check", True)
    steps = []
    monkeypatch.setattr(LlamaLitModule, "on_train_batch_end", lambda self, *a: steps.append(self.global_step))
    cfg = experiment_cfg("demo", env, tmp_path / "run", [
        "trainer.max_steps=7", "trainer.log_every_n_steps=4", "trainer.val_check_interval=100",
        "trainer.limit_val_batches=1", "callbacks.samples=null"])
    with pytest.raises(FloatingPointError, match=expected):
        train(cfg)
    assert steps[-1] == (4 if bad_call == 3 else 7)  # it ran on past the bad step, then stopped


def test_run_name_and_sweep_group(env, tmp_path):
    overrides = ["experiment=demo_lora", "lora.rank=4", "lora.alpha=8", f"paths.cache_dir={env.cache}",
                 "logger=csv", "ckpt_path=last", f"run_dir={tmp_path}"]
    cfg = compose_cfg(overrides, hydra_config=True)
    try:
        HydraConfig.instance().set_config(cfg)
        assert run_name(cfg) == "demo_lora-lora.rank=4-lora.alpha=8"  # no paths, logger, resume
        assert sweep_group(cfg) is None  # a single run has no group
        cfg = compose_cfg(overrides, hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(tmp_path / "multirun" / "2024-01-01_00-00-00")
        HydraConfig.instance().set_config(cfg)
        assert sweep_group(cfg) == "demo_lora-2024-01-01_00-00-00"
    finally:
        HydraConfig.instance().cfg = None
    assert run_name(compose_cfg(overrides)) == "demo_lora"  # outside Hydra: the experiment name


@pytest.mark.slow
def test_alpaca_qlora_trains_a_4bit_base_and_exports_a_merged_hf_model(env, tmp_path):
    """The issue-9 command on the CPU: a 4-bit NF4 base (bitsandbytes), LoRA on every block linear, packed
    Alpaca rows, then run_dir/merged_hf: a bf16 Hugging Face model that transformers loads."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    cfg = experiment_cfg("alpaca_qlora", env, run_dir, [
        "trainer.max_steps=3", "trainer.val_check_interval=100", "trainer.limit_val_batches=1",
        "callbacks.samples=null", "optim.lr=1e-2"])
    torch.manual_seed(0)  # bitsandbytes' CPU 4-bit layers need widths that are multiples of 64
    base = Llama(ModelConfig.preset("tiny", dim=64, hidden_dim=128, vocab_size=data_vocab(cfg)))
    with open_dict(cfg):
        cfg.init_from = str(save_hf(base, tmp_path / "hf_base64"))
        cfg.model.quantize = "nf4"
    assert cfg.data.packing and cfg.export.merged_hf
    summary = train(cfg)
    assert summary["step"] == 3 and math.isfinite(summary["val/loss"])
    ckpt = torch.load(summary["last_checkpoint"], weights_only=True, map_location="cpu")
    assert ckpt["state_dict"] and all(k.endswith(("lora_A", "lora_B")) for k in ckpt["state_dict"])  # no 4-bit base
    assert ckpt["hyper_parameters"]["quantize"] == "nf4"  # a resume quantizes the base again
    merged = Path(summary["files"]["merged_hf"])
    assert merged == run_dir / "merged_hf" and (merged / "config.json").is_file()
    hf = transformers.LlamaForCausalLM.from_pretrained(merged, dtype="auto")  # as stored
    assert hf.dtype == torch.bfloat16
    ours = load_checkpoint(merged)
    wq = ours.layers[0].attention.wq.weight
    assert not torch.equal(wq, base.layers[0].attention.wq.weight.to(wq.dtype))  # the adapter was merged in
    x = torch.randint(0, base.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(hf(x).logits).all()


def test_packed_demo_run_feeds_packed_rows_and_validates_unpacked(env, tmp_path, monkeypatch):
    """data.packing=true through train(): training batches carry positions/segments, validation does not."""
    seen: list[tuple[bool, bool]] = []  # (training, packed) of every loss call
    real = LlamaLitModule._loss

    def spy(self, batch, accuracy):
        seen.append((self.training, "segments" in batch and "positions" in batch))
        return real(self, batch, accuracy)

    monkeypatch.setattr(LlamaLitModule, "_loss", spy)
    cfg = experiment_cfg("demo", env, tmp_path / "run", [
        "data.packing=true", "attention=dense", "trainer.max_steps=4", "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1", "callbacks.samples=null", "evaluation.adherence_n=0"])
    summary = train(cfg)
    assert summary["step"] == 4 and math.isfinite(summary["val/loss"])
    assert {packed for training, packed in seen if training} == {True}
    assert {packed for training, packed in seen if not training} == {False}
    assert 0 < summary["useful_tokens_seen"] < summary["tokens_seen"]


def test_callbacks_follow_the_trainer_switches(tmp_path):
    """The bar refreshes per optimizer steps; trainer.enable_progress_bar=false drops it (Lightning refuses a
    bar it was told not to show), logger=none drops the LR monitor (it needs a logger)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar

    from llamalit.training.callbacks import StepProgressBar
    from llamalit.training.run import build_callbacks

    cfg = compose_cfg(["experiment=demo", f"run_dir={tmp_path}"])
    kinds = [type(c) for c in build_callbacks(cfg)]
    assert StepProgressBar in kinds and LearningRateMonitor in kinds
    bar = next(c for c in build_callbacks(cfg) if isinstance(c, StepProgressBar))
    assert bar.refresh_steps == cfg.trainer.log_every_n_steps
    quiet = compose_cfg(["experiment=demo", f"run_dir={tmp_path}", "trainer.enable_progress_bar=false"])
    assert not any(isinstance(c, ProgressBar) for c in build_callbacks(quiet, has_logger=False))
    assert not any(isinstance(c, LearningRateMonitor) for c in build_callbacks(quiet, has_logger=False))


class LoraDropoutProbe(L.Callback):
    """At the first training batch: the LoRA dropout modules' mode, and whether two forwards differ."""

    def __init__(self) -> None:
        self.modes: list[bool] = []
        self.forwards_differ: bool | None = None
        self.eval_modules: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.forwards_differ is not None:
            return
        from llamalit.model.lora import lora_layers

        self.modes = [layer.lora_dropout.training for layer in lora_layers(pl_module.model).values()]
        self.eval_modules = sum(not m.training for m in pl_module.modules())
        for layer in lora_layers(pl_module.model).values():  # B = 0 at the start: give the path an effect
            torch.nn.init.normal_(layer.lora_B, std=0.5)
        with torch.no_grad():
            tokens = batch["input_ids"]
            self.forwards_differ = not torch.equal(pl_module.model(tokens), pl_module.model(tokens))


def test_lora_dropout_acts_during_fit_on_a_loaded_base(env, tmp_path, monkeypatch):
    """demo_lora loads its base (load_checkpoint returns it in eval mode): during fit the adapters' dropout
    must be in training mode and act, so two forwards of one batch differ."""
    from llamalit.training import run

    cfg = experiment_cfg("demo_lora", env, tmp_path / "run", ["lora.dropout=0.5", "trainer.max_steps=1",
                                                              "trainer.limit_val_batches=0", "callbacks.samples=null"])
    probe = LoraDropoutProbe()
    build = run.build_callbacks
    monkeypatch.setattr(run, "build_callbacks", lambda c, **kw: [*build(c, **kw), probe])
    train(cfg)
    assert probe.modes and all(probe.modes)
    assert probe.eval_modules == 0
    assert probe.forwards_differ


def test_wandb_run_name_leaves_out_init_from(env, tmp_path):
    overrides = ["experiment=demo_lora", f"init_from={tmp_path / 'some' / 'base'}", "lora.rank=4",
                 f"data.source={tmp_path}", f"paths.cache_dir={env.cache}", f"run_dir={tmp_path}"]
    cfg = compose_cfg(overrides, hydra_config=True)
    try:
        HydraConfig.instance().set_config(cfg)
        assert run_name(cfg) == "demo_lora-lora.rank=4"
    finally:
        HydraConfig.instance().cfg = None


def test_lora_base_trained_with_another_tokenizer_of_the_same_size_is_refused(env, tmp_path):
    """demo_lora's base names a tokenizer with as many pieces as the data's but other pieces: its ids would
    mean other text, so the run is refused naming both tokenizers; with the data's own tokenizer it runs."""
    from llamalit.data.text_formats import read_records
    from llamalit.data.tokenizer import train_tokenizer

    cfg = experiment_cfg("demo_lora", env, tmp_path / "run", ["trainer.fast_dev_run=true"])
    dm = LlamaDataModule(cfg.data, cache_dir=cfg.paths.cache_dir, seed=cfg.seed)
    dm.prepare_data()
    texts = [r["story"].upper() for f in sorted(env.corpus_dir.glob("data*.json")) for r in read_records(f)]
    other = train_tokenizer(texts, dm.vocab_size, tmp_path / "other.model")
    base = Path(str(cfg.init_from))
    save_model(tiny_base(dm.vocab_size), base, extra={"tokenizer": str(other)})
    with pytest.raises(ValueError, match=f"init_from={base}: the base model was trained with tokenizer {other} "
                                         f".*differs from the data's tokenizer {dm.tokenizer_path}"):
        train(cfg)
    same = tmp_path / "copy_of_the_data_tokenizer.model"
    same.write_bytes(Path(dm.tokenizer_path).read_bytes())
    save_model(tiny_base(dm.vocab_size), base, extra={"tokenizer": str(same)})
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run2")
    assert train(cfg)["step"] == 1
