"""Checkpoint directories appear whole or not at all; bad torch pickles and lone files get clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llamalit.checkpoints import (
    CheckpointError,
    hf,
    load_checkpoint,
    load_llama2c,
    peft,
    save_hf,
    save_model,
    save_peft,
)
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig, apply_lora
from llamalit.utils.fileio import atomic_dir


def tiny(seed: int) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig.preset("tiny")).eval()


def same_weights(a: Llama, b: Llama) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def with_lora(seed: int) -> Llama:
    model = apply_lora(tiny(seed), LoraConfig(rank=2, alpha=4.0, targets=("wq", "wv")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model.eval()


def fail_on(monkeypatch, module, name: str) -> None:
    """``module.atomic_write_json`` raises when asked to write ``name`` (files before it are written)."""
    real = module.atomic_write_json

    def writer(path, obj):
        if Path(path).name == name:
            raise KeyboardInterrupt(f"interrupted before {name}")
        real(path, obj)

    monkeypatch.setattr(module, "atomic_write_json", writer)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_replaces_whole_or_leaves_untouched(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a").write_text("1")
        (tmp / "stale").write_text("old")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("interrupted")
    assert names(target) == ["a", "stale"] and (target / "a").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("3")
    assert names(target) == ["a"] and (target / "a").read_text() == "3"
    assert names(tmp_path) == ["out"]  # no temp or old directory left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"), atomic_dir(tmp_path / "file"):
        pass


@pytest.mark.parametrize("fail", ["config.json", None])
def test_save_model_interrupted_keeps_old_or_replaces(tmp_path, monkeypatch, fail):
    a, b = tiny(1), tiny(2)
    save_model(a, tmp_path / "m")
    if fail:
        fail_on(monkeypatch, hf, fail)
        with pytest.raises(KeyboardInterrupt):
            save_model(b, tmp_path / "m")
        assert same_weights(load_checkpoint(tmp_path / "m"), a)
    else:
        save_model(b, tmp_path / "m")
        assert same_weights(load_checkpoint(tmp_path / "m"), b)
    assert names(tmp_path) == ["m"] and names(tmp_path / "m") == [
        "config.json", "generation_config.json", "llamalit.json", "model.safetensors"]


def test_save_hf_interrupted_keeps_old_model_and_tokenizer(tmp_path, monkeypatch):
    (tmp_path / "tokA.model").write_bytes(b"tokenizer A")
    (tmp_path / "tokB.model").write_bytes(b"tokenizer B")
    a, b = tiny(1), tiny(2)
    save_hf(a, tmp_path / "hf", tokenizer=tmp_path / "tokA.model")
    before = names(tmp_path / "hf")
    for step in ("generation_config.json", "tokenizer_config.json", "config.json"):
        monkeypatch.undo()
        fail_on(monkeypatch, hf, step)
        with pytest.raises(KeyboardInterrupt):
            save_hf(b, tmp_path / "hf", tokenizer=tmp_path / "tokB.model")
        assert names(tmp_path / "hf") == before, step
        assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"tokenizer A", step
        assert same_weights(load_checkpoint(tmp_path / "hf"), a), step
        assert names(tmp_path) == ["hf", "tokA.model", "tokB.model"], step


def test_save_hf_replaces_a_whole_earlier_export(tmp_path):
    a, b = tiny(1), tiny(2)
    (tmp_path / "tok.model").write_bytes(b"tokenizer A")
    out = tmp_path / "hf"
    save_hf(a, out, tokenizer=tmp_path / "tok.model")
    # make it look like a sharded download of A: an index that load_hf reads before model.safetensors
    keys = list(hf.read_hf_state_dict(out))
    (out / "model.safetensors").rename(out / "model-00001-of-00001.safetensors")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    (out / "tokenizer.json").write_text("{}")
    assert same_weights(load_checkpoint(out), a)
    save_hf(b, out)
    assert names(out) == ["config.json", "generation_config.json", "model.safetensors"]
    assert same_weights(load_checkpoint(out), b)
    assert names(tmp_path) == ["hf", "tok.model"]


def test_shared_directory_keeps_other_files(tmp_path, monkeypatch):
    """A run directory (logs, a base/ export) is never replaced whole; an interrupted publish never mixes."""
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "train.log").write_text("log")
    (run / "tokenizer.model").write_text("tok")
    a, b = tiny(1), tiny(2)
    save_model(a, run, extra={"tokenizer": "tokenizer.model"})
    keep = ["config.json", "generation_config.json", "llamalit.json", "logs", "model.safetensors", "tokenizer.model"]
    assert names(run) == keep
    fail_on(monkeypatch, hf, "config.json")
    with pytest.raises(KeyboardInterrupt):  # an error while writing: nothing in run/ changes
        save_model(b, run)
    monkeypatch.undo()
    assert names(run) == keep and same_weights(load_checkpoint(run), a)
    save_model(b, run)
    assert names(run) == keep and (run / "logs" / "train.log").read_text() == "log"
    assert same_weights(load_checkpoint(run), b)

    real_replace = os.replace

    def crash_before_commit(src, dst):
        if Path(dst) == run / "config.json":
            raise KeyboardInterrupt("killed while publishing")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_commit)
    with pytest.raises(KeyboardInterrupt):
        save_model(a, run)
    monkeypatch.undo()
    assert names(run) == ["generation_config.json", "llamalit.json", "logs", "model.safetensors",
                          "tokenizer.model"]  # no config: not loadable ...
    with pytest.raises(CheckpointError, match="unknown checkpoint directory"):  # ... and it says so
        load_checkpoint(run)


def test_save_model_files_are_published_with_the_weights(tmp_path, monkeypatch):
    (tmp_path / "tok.model").write_bytes(b"new tokenizer")
    out = tmp_path / "m"
    save_model(tiny(1), out)
    fail_on(monkeypatch, hf, "config.json")
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny(2), out, files={"tokenizer.model": tmp_path / "tok.model"})
    monkeypatch.undo()
    assert names(out) == ["config.json", "generation_config.json", "llamalit.json", "model.safetensors"]
    save_model(tiny(2), out, extra={"tokenizer": "tokenizer.model"}, files={"tokenizer.model": tmp_path / "tok.model"})
    assert (out / "tokenizer.model").read_bytes() == b"new tokenizer"
    with pytest.raises(ValueError, match="plain file names"):
        save_model(tiny(2), out, files={"../x": tmp_path / "tok.model"})


def test_save_peft_interrupted_keeps_old_adapter_and_base(tmp_path, monkeypatch):
    a, b = with_lora(1), with_lora(2)
    out = tmp_path / "peft"
    base = tiny(1)
    save_hf(base, out / "base")
    save_peft(a, out, base=str(out / "base"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    fail_on(monkeypatch, peft, "adapter_config.json")
    with pytest.raises(KeyboardInterrupt):
        save_peft(b, out, base=str(out / "base"))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert names(out) == ["adapter_config.json", "adapter_model.safetensors", "base"]
    save_peft(b, out, base=str(out / "base"))  # out/ holds base/: files replaced, base kept
    assert names(out) == ["adapter_config.json", "adapter_model.safetensors", "base"]
    assert hf.is_hf_dir(out / "base")
    assert (out / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]


def test_torch_pickles_of_the_wrong_shape(tmp_path):
    sd = tiny(1).state_dict()
    args = tiny(1).cfg.to_dict()
    cases = {
        "mixed_keys.pt": ({1: torch.zeros(1), "b": torch.zeros(1)}, r"'state_dict'.*'model'.*'model_args'.*found \['b', 1\]"),
        "model_list.pt": ({"model": [1], "model_args": args}, r"'model' of a llama2.c .pt: expected a state dict.*got a list"),
        "model_int_key.pt": ({"model": {0: torch.zeros(1)}, "model_args": args}, r"entry 0 is a Tensor"),
        "model_not_tensor.pt": ({"model": {**sd, "norm.weight": 3}, "model_args": args}, r"'norm.weight' is a int"),
        "args_list.pt": ({"model": sd, "model_args": [1]}, r"'model_args' is a list"),
        "lightning_list.ckpt": ({"state_dict": [1], "hyper_parameters": {}}, r"'state_dict': expected a state dict"),
        "a_list.pt": ([1, 2], r"found a list"),
    }
    for name, (obj, pattern) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(e.value), name
    for name in ("mixed_keys.pt", "model_list.pt", "args_list.pt"):
        with pytest.raises(CheckpointError, match=r"llama2\.c \.pt") as e:
            load_llama2c(tmp_path / name)
        assert str(tmp_path / name) in str(e.value), name


def test_lone_and_foreign_safetensors_files(tmp_path):
    save_model(tiny(1), tmp_path / "m")
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"x\.safetensors: not a readable safetensors file \(truncated") as e:
        load_checkpoint(tmp_path / "x.safetensors")
    assert "accepted:" in str(e.value) and "llama2.c .pt or .bin" in str(e.value)
    (tmp_path / "y.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"y\.safetensors: a safetensors file alone is not a checkpoint"):
        load_checkpoint(tmp_path / "y.safetensors")
    (tmp_path / "m" / "other.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"other\.safetensors: not the weights of the native"):
        load_checkpoint(tmp_path / "m" / "other.safetensors")
