"""PEFT export: our LoRA model as a PEFT adapter over our HF export gives equal logits; import back."""

from __future__ import annotations

import json

import pytest
import torch

from llamalit.checkpoints import CheckpointError, load_peft, save_hf, save_peft
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig, apply_lora, lora_state_dict

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def lora_model(targets=("wq", "wk", "wv", "wo"), seed=0, **kw) -> tuple[Llama, dict]:
    torch.manual_seed(seed)
    model = Llama(ModelConfig.preset("tiny", **kw)).eval()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=targets))
    with torch.no_grad():  # a trained-looking adapter: B is not zero
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model.eval(), base_sd


def base_of(model: Llama, base_sd: dict) -> Llama:
    base = Llama(model.cfg).eval()
    base.load_state_dict(base_sd)
    return base


@pytest.mark.parametrize("targets", [("wq", "wk", "wv", "wo"), ("wq", "wk", "wv", "wo", "w1", "w2", "w3")])
def test_peft_adapter_equal_logits(tmp_path, targets):
    model, base_sd = lora_model(targets)
    save_hf(base_of(model, base_sd), tmp_path / "base")
    save_peft(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 30))
    with torch.no_grad():
        ours, plain = model(tokens), base_of(model, base_sd)(tokens)
        theirs = hf(tokens).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)


def test_peft_import_round_trip(tmp_path):
    model, base_sd = lora_model(("wq", "wk", "wo", "w2"), seed=1)
    save_peft(model, tmp_path / "adapter")
    back = load_peft(tmp_path / "adapter", base=base_of(model, base_sd), merge=False)
    ref = lora_state_dict(model)
    got = lora_state_dict(back)
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    merged = load_peft(tmp_path / "adapter", base=base_of(model, base_sd))
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_peft_base_loaded_from_config(tmp_path):
    model, base_sd = lora_model(seed=2)
    save_hf(base_of(model, base_sd), tmp_path / "base")
    save_peft(model, tmp_path / "adapter", base="../base")  # relative to the adapter directory
    from llamalit.checkpoints import load_checkpoint

    loaded = load_checkpoint(tmp_path / "adapter")
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_peft_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        save_peft(Llama(ModelConfig.preset("tiny")), tmp_path / "x")
    model, base_sd = lora_model(seed=3)
    save_peft(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="unsupported PEFT adapter: use_dora=true"):
        load_peft(tmp_path / "a", base=base_of(model, base_sd))
