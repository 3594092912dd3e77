"""A run's outputs load in the ecosystem's tools as is, and an adapter refuses a base it was not trained on.

The model directory a run writes loads in ``transformers.AutoModelForCausalLM.from_pretrained``, its
adapter directory in ``peft.PeftModel.from_pretrained`` on that base; our metadata lives in
``llamalit.json`` / ``llamalit_adapter.json``. The adapter records the sha256 of its base's weights
and tokenizer: after ``experiment=demo`` is run again (a new base in the same directory), loading the
old adapter is refused, naming both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llamalit.checkpoints import CheckpointError, find_tokenizer, load_checkpoint
from llamalit.checkpoints.fingerprint import weights_sha256
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig, apply_lora, lora_layers
from llamalit.training.run import copy_export, export_weights

LORA = {"enabled": True, "rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["wq", "wk", "wv", "wo"]}


def tiny(vocab: int, seed: int) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig.preset("tiny", vocab_size=vocab)).eval()


def trained_lora(base_dir: Path) -> Llama:
    model = apply_lora(load_checkpoint(base_dir), LoraConfig.from_dict(LORA))
    with torch.no_grad():  # a trained-looking adapter: B is not zero
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture
def demo(tmp_path, tiny_tokenizer):
    """``experiment=demo`` then ``experiment=demo_lora``, as export_weights/copy_export leave them."""
    tok = str(tiny_tokenizer.path)
    models = tmp_path / "cache" / "models" / "demo"
    base = tiny(tiny_tokenizer.vocab_size, seed=0)
    files = export_weights(base, tmp_path / "demo_run", tok, {"experiment_name": "demo"})
    copy_export(files, models)
    lora_model = trained_lora(models)
    export_weights(lora_model, tmp_path / "lora_run", tok,
                   {"experiment_name": "demo_lora", "lora": LORA, "init_from": str(models)})
    return base, lora_model, models, tmp_path / "lora_run"


def test_run_outputs_load_in_transformers_and_peft(demo, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, lora_model, models, lora_run = demo
    run = tmp_path / "demo_run"
    assert json.loads((run / "llamalit.json").read_text())["format"] == "llamalit/2"
    assert json.loads((lora_run / "llamalit_adapter.json").read_text())["format"] == "llamalit-lora/2"
    tokens = torch.randint(0, base.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(run), dtype=torch.float32).eval()
        torch.testing.assert_close(hf_base(tokens).logits, base(tokens), atol=2e-5, rtol=1e-4)
        hf_models = transformers.AutoModelForCausalLM.from_pretrained(str(models), dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(hf_models, str(lora_run)).eval()
        want = lora_model(tokens)
        assert (want - base(tokens)).abs().max() > 1e-3  # the adapter really changes the output
        torch.testing.assert_close(with_adapter(tokens).logits, want, atol=2e-5, rtol=1e-4)
        # and ours reads both back: the model exactly, the adapter merged or kept
        torch.testing.assert_close(load_checkpoint(run)(tokens), base(tokens), atol=0, rtol=0)
        torch.testing.assert_close(load_checkpoint(lora_run)(tokens), want, atol=1e-5, rtol=1e-5)
        kept = load_checkpoint(lora_run, merge=False)
        assert len(lora_layers(kept)) == 4 * base.cfg.n_layers
        torch.testing.assert_close(kept(tokens), want, atol=0, rtol=0)
    assert find_tokenizer(run) == run / "tokenizer.model"


def test_adapter_refuses_a_replaced_base_naming_both(demo, tmp_path, tiny_tokenizer):
    """The issue's scenario: experiment=demo again replaces models/demo; the old adapter is refused."""
    _, _, models, lora_run = demo
    recorded = json.loads((lora_run / "llamalit_adapter.json").read_text())
    assert len(recorded["base_sha256"]) == 64 and len(recorded["base_tokenizer_sha256"]) == 64
    again = export_weights(tiny(tiny_tokenizer.vocab_size, seed=1), tmp_path / "demo_again",
                           str(tiny_tokenizer.path), {"experiment_name": "demo"})
    copy_export(again, models)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(lora_run)
    msg = str(err.value)
    new = weights_sha256(models)
    assert str(lora_run) in msg and str(models) in msg
    assert recorded["base_sha256"][:16] in msg and new[:16] in msg


def test_adapter_refuses_a_base_with_another_tokenizer(demo, tmp_path):
    _, _, models, lora_run = demo
    other = tmp_path / "other.model"
    shutil.copyfile(models / "tokenizer.model", other)
    with other.open("ab") as f:
        f.write(b"\0")  # another file: another sha256
    shutil.copyfile(other, models / "tokenizer.model")
    with pytest.raises(CheckpointError, match=r"tokenizer .*tokenizer\.model is now sha256"):
        load_checkpoint(lora_run)


def test_same_base_rewritten_unchanged_still_loads(demo, tmp_path):
    """Only the weights count: the same base published again (new files, same bytes) is accepted."""
    _, lora_model, models, lora_run = demo
    copy_export({"model": str(tmp_path / "demo_run" / "model.safetensors")}, models)
    tokens = torch.randint(0, lora_model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(lora_run)(tokens), lora_model(tokens), atol=1e-5, rtol=1e-5)


def test_demo_then_demo_lora_then_demo_again_refuses_the_old_adapter(tmp_path, tiny_tokenizer):
    """The README's order through train(): the adapter of demo_lora loads until demo runs again."""
    from hydra import compose, initialize_config_dir

    import llamalit.cli
    from llamalit.training.run import train

    tiny_run = ["logger=none", f"paths.cache_dir={tmp_path / 'cache'}", f"data.tokenizer={tiny_tokenizer.path}",
                "data.n_shards=2", "data.stories_per_shard=40", "data.batch_size=4", "data.num_workers=1",
                "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                "evaluation.adherence_n=0", "callbacks.samples.max_new_tokens=2", "trainer.accelerator=cpu"]

    def run(experiment: str, name: str, *extra: str) -> Path:
        with initialize_config_dir(config_dir=llamalit.cli.CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={experiment}", f"run_dir={tmp_path / name}",
                                              *tiny_run, *extra])
        train(cfg)
        return tmp_path / name

    run("demo", "demo1", "model=tiny", "seed=1")
    lora_run = run("demo_lora", "lora")
    load_checkpoint(lora_run)  # on the base it was trained on
    run("demo", "demo2", "model=tiny", "seed=2")  # replaces cache/models/demo
    with pytest.raises(CheckpointError, match=r"trained on base .*models/demo with weights sha256 .* now holds"):
        load_checkpoint(lora_run)
