"""load_checkpoint: format detection for every supported source, URLs, and clear errors for bad input."""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import threading

import pytest
import torch

from llamalit.checkpoints import CheckpointError, load_checkpoint, save_hf, save_llama2c_bin, save_model
from llamalit.checkpoints.adapter import save_adapter
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig, apply_lora, lora_layers


def tiny(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig.preset("tiny", **kw)).eval()


def same_weights(a: Llama, b: Llama) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def trained_lora(model: Llama, cfg: LoraConfig) -> Llama:
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model.eval()


def test_native_llama2c_and_hf_sources(tmp_path):
    model = tiny(1)
    save_model(model, tmp_path / "native")
    save_llama2c_bin(model, tmp_path / "m.bin", version=0)
    save_llama2c_bin(model, tmp_path / "m1.bin", version=1)
    save_hf(model, tmp_path / "hf")
    torch.save({"model": model.state_dict(), "model_args": {**model.cfg.to_dict(), "hidden_dim": None}},
               tmp_path / "ckpt.pt")
    for src in ["native", "native/model.safetensors", "m.bin", "m1.bin", "hf", "ckpt.pt"]:
        loaded = load_checkpoint(tmp_path / src)
        assert same_weights(loaded, model), src
        assert not loaded.training, src
    assert load_checkpoint(str(tmp_path / "native")).cfg == model.cfg


def lightning_ckpt(model: Llama, lora: dict | None = None, init_from=None) -> dict:
    """A ``.ckpt`` as versions before the module's typed arguments wrote it: the whole run config in
    ``hyper_parameters["cfg"]``."""
    cfg = {"model": model.cfg.to_dict(), "lora": lora or {"enabled": False, "rank": 0, "alpha": 0,
                                                          "dropout": 0.0, "targets": []},
           "init_from": init_from, "trainer": {"max_steps": 10}, "optim": {"lr": 1e-3}}
    return {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"cfg": cfg}, "epoch": 0, "global_step": 10,
            "pytorch-lightning_version": "2.4.0", "optimizer_states": [], "lr_schedulers": [],
            "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {"TokenCounter": {"tokens_seen": 123}}}


@pytest.mark.parametrize("lora", [False, True])
def test_lightning_ckpt_of_the_module_loads(tmp_path, lora):
    """A checkpoint the module writes now (its arguments as hyper_parameters) rebuilds the model; a LoRA run
    on init_from saves the adapters only, and its base is read from the saved init_from again."""
    import lightning as L
    from torch.utils.data import DataLoader

    from llamalit.training.module import LlamaLitModule

    base = tiny(5)
    save_model(base, tmp_path / "base")
    adapter = {"enabled": True, "rank": 2, "alpha": 4.0, "targets": ["wq", "wv"]} if lora else {"enabled": False}
    module = LlamaLitModule(base.cfg, {"lr": 1e-2, "warmup_steps": 1}, adapter,
                            str(tmp_path / "base") if lora else None)
    rows = [{"input_ids": t, "labels": t.roll(-1)} for t in torch.randint(0, 256, (4, 12))]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=2)
    trainer.fit(module, DataLoader(rows, batch_size=2))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    ckpt = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert "cfg" not in ckpt["hyper_parameters"] and ckpt["hyper_parameters"]["model_cfg"] == base.cfg.to_dict()
    assert ("base_fingerprint" in ckpt) == lora
    loaded = load_checkpoint(tmp_path / "run.ckpt", merge=False)
    assert bool(lora_layers(loaded)) == lora
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), module.model.eval()(tokens), atol=0, rtol=0)
        assert not torch.equal(loaded(tokens), base(tokens))  # the trained weights, not the base's


def test_lightning_ckpt_plain_and_lora(tmp_path):
    """Old-style ``.ckpt`` files (``hyper_parameters["cfg"]``) keep loading."""
    model = tiny(2)
    torch.save(lightning_ckpt(model), tmp_path / "plain.ckpt")
    assert same_weights(load_checkpoint(tmp_path / "plain.ckpt"), model)

    lmodel = trained_lora(tiny(3), LoraConfig(rank=2, alpha=4.0, dropout=0.1, targets=("wq", "wv")))
    lora = {"enabled": True, "rank": 2, "alpha": 4.0, "dropout": 0.1, "targets": ["wq", "wv"]}
    torch.save(lightning_ckpt(lmodel, lora, init_from="base"), tmp_path / "lora.ckpt")
    tokens = torch.randint(0, 256, (1, 16))
    merged = load_checkpoint(tmp_path / "lora.ckpt")
    assert not lora_layers(merged)
    kept = load_checkpoint(tmp_path / "lora.ckpt", merge=False)
    assert sorted(lora_layers(kept))[:2] == ["layers.0.attention.wq", "layers.0.attention.wv"]
    with torch.no_grad():
        want = lmodel(tokens)
        torch.testing.assert_close(merged(tokens), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kept(tokens), want, atol=0, rtol=0)


def test_adapter_dir_with_base(tmp_path):
    base = tiny(4)
    save_model(base, tmp_path / "base")
    lmodel = trained_lora(tiny(4), LoraConfig(rank=2, alpha=2.0, targets=("wq", "wk", "wv", "wo")))
    lmodel.cfg.max_seq_len = 200  # the run grew the context (RoPE tables are not weights)
    save_adapter(lmodel, tmp_path / "run", base="../base", lora_cfg=LoraConfig(2, 2.0))
    merged = load_checkpoint(tmp_path / "run")
    assert merged.cfg.max_seq_len == 200 and not lora_layers(merged)
    kept = load_checkpoint(tmp_path / "run", merge=False)
    assert len(lora_layers(kept)) == 4 * base.cfg.n_layers
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), lmodel(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kept(tokens), lmodel(tokens), atol=0, rtol=0)


def test_url_goes_through_the_cache(tmp_path, monkeypatch):
    serve = tmp_path / "www"
    serve.mkdir()
    model = tiny(5)
    save_llama2c_bin(model, serve / "model.bin", version=1)
    monkeypatch.setenv("LLAMALIT_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model.bin"
        assert same_weights(load_checkpoint(url), model)
        assert (tmp_path / "cache" / "downloads" / "model.bin").is_file()
    finally:
        server.shutdown()


class WritesAFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": WritesAFile(marker)}, "model_args": {}}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a plain-weights pickle"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    ckpt = lightning_ckpt(tiny())
    ckpt["hyper_parameters"]["args"] = argparse.Namespace(lr=1.0)  # not plain data either
    torch.save(ckpt, tmp_path / "ns.ckpt")
    with pytest.raises(CheckpointError, match=r"ns\.ckpt: not a plain-weights pickle"):
        load_checkpoint(tmp_path / "ns.ckpt")


def test_bad_input_errors(tmp_path):
    model = tiny(6)
    torch.save({"model": model.state_dict(), "model_args": model.cfg.to_dict()}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": model.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: a torch pickle that is neither .* found \['weights'\]"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: unknown checkpoint format"):
        load_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: unknown checkpoint directory"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(tmp_path / "nope")
    save_model(model, tmp_path / "native")
    meta = json.loads((tmp_path / "native" / "llamalit.json").read_text())
    meta["model"]["n_kv_heads"] = 4
    (tmp_path / "native" / "llamalit.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"llamalit\.json: shape mismatch for layers\.0\.attention\.wk\.weight"):
        load_checkpoint(tmp_path / "native")
    (tmp_path / "bad.bin").write_bytes(b"\x42" * 64)
    with pytest.raises(CheckpointError, match=r"bad\.bin: not a llama2\.c \.bin"):
        load_checkpoint(tmp_path / "bad.bin")


def test_find_tokenizer_beside_or_above_or_named(tmp_path):
    from llamalit.checkpoints import find_tokenizer

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(lightning_ckpt(tiny()), tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert find_tokenizer(tmp_path / "run" / "checkpoints" / "last.ckpt") is None
    (tmp_path / "run" / "tokenizer.model").write_bytes(b"x")
    assert find_tokenizer(tmp_path / "run" / "checkpoints" / "last.ckpt") == tmp_path / "run" / "tokenizer.model"
    (tmp_path / "tok.model").write_bytes(b"y")
    save_model(tiny(), tmp_path / "native", extra={"tokenizer": "../tok.model"})
    assert find_tokenizer(tmp_path / "native") == tmp_path / "native" / "../tok.model"


def test_directories_of_earlier_versions_still_load(tmp_path):
    """llamalit/1 (our names in model.safetensors, our config.json) and llamalit-lora/1 (adapter.safetensors,
    our adapter_config.json), built here from that schema as earlier versions wrote them."""
    from safetensors.torch import save_file

    from llamalit.checkpoints import find_tokenizer
    from llamalit.model.lora import lora_state_dict

    base = tiny(5)
    old = tmp_path / "old_base"
    old.mkdir()
    sd = {k: v.contiguous() for k, v in base.state_dict().items() if k != "output.weight"}  # tied: not saved
    save_file(sd, str(old / "model.safetensors"), metadata={"format": "llamalit/1"})
    (old / "tokenizer.model").write_bytes(b"tok")
    (old / "config.json").write_text(json.dumps({"format": "llamalit/1", "model": base.cfg.to_dict(),
                                                 "tokenizer": str(old / "tokenizer.model"), "experiment": "demo"}))
    tokens = torch.randint(0, base.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(old)(tokens), base(tokens), atol=0, rtol=0)
    assert find_tokenizer(old) == old / "tokenizer.model"

    lmodel = trained_lora(tiny(5), LoraConfig(rank=2, alpha=2.0, targets=("wq", "wv")))
    adapter = tmp_path / "old_run"
    adapter.mkdir()
    save_file({k: v.contiguous() for k, v in lora_state_dict(lmodel).items()}, str(adapter / "adapter.safetensors"),
              metadata={"format": "llamalit-lora/1"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "format": "llamalit-lora/1", "base": "../old_base", "model": lmodel.cfg.to_dict(),
        "lora": {"rank": 2, "alpha": 2.0, "dropout": 0.0, "targets": ["wq", "wv"]}}))
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(adapter)(tokens), lmodel(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_checkpoint(adapter, merge=False)(tokens), lmodel(tokens), atol=0, rtol=0)
    assert find_tokenizer(adapter) == old / "tokenizer.model"  # through the base it names
