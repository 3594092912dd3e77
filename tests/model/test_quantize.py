"""QLoRA for real on the CPU: bitsandbytes NF4 base layers, bf16 adapters that train; clear errors; configs."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import llamalit.cli
from llamalit.checkpoints.adapter import load_adapter, save_adapter
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import (
    LoraConfig,
    LoRALinear,
    QLoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
)
from llamalit.model.quantize import default_device, quantize_linears, quantized_linears, require_bitsandbytes

BLOCK_NAMES = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
CONF = Path(llamalit.cli.CONF_DIR)


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def tiny(**kw) -> Llama:
    """The tiny preset 64 wide: bitsandbytes' CPU 4-bit kernels need in_features a multiple of 64."""
    torch.manual_seed(0)
    return Llama(ModelConfig.preset("tiny", **{"dim": 64, "hidden_dim": 128, **kw})).eval()


def nf4_reference(w: torch.Tensor, quant_state) -> torch.Tensor:
    """NF4 by hand: each 64-value block scaled by its absmax, rounded to the nearest of the 16 NF4 levels,
    then multiplied by the double-quantized absmax that bitsandbytes stores (8-bit, blocks of 256, + offset)."""
    import bitsandbytes.functional as bf

    levels = bf.get_4bit_type("nf4", device="cpu")
    blocks = w.float().reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    idx = ((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1)
    stored_absmax = bf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    return (levels[idx] * stored_absmax.view(-1, 1)).reshape(w.shape)


def qlora_model(rank: int = 4, alpha: float = 8.0) -> Llama:
    model = quantize_linears(tiny(tie_embeddings=False), device="cpu")
    return apply_lora(model, LoraConfig(rank, alpha, targets=tuple(sorted(BLOCK_NAMES))))


def trained_qlora_model() -> Llama:
    """:func:`qlora_model` with non-zero B (as after training), so the adapters' gradients are not trivial."""
    model = qlora_model()
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(7))
    return model


def batch(seed: int = 1, b: int = 2, t: int = 13) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def test_without_bitsandbytes_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    with pytest.raises(ImportError, match=r"needs bitsandbytes: pip install 'llamalit\[qlora\]'.*quantize=null"):
        quantize_linears(tiny(), device="cpu")


class _OldParams4bit(nn.Parameter):
    """An old bitsandbytes' Params4bit: moving it to the CPU fails as CUDA-only builds did."""

    def __new__(cls, data, requires_grad=False, **kw):
        return torch.Tensor._make_subclass(cls, data, requires_grad)

    def to(self, *args, **kwargs):
        raise RuntimeError("CUDA Setup failed: bitsandbytes was compiled without GPU support")


def test_a_bitsandbytes_that_cannot_do_4bit_on_the_cpu_names_its_version_and_the_gpu(monkeypatch):
    old = types.ModuleType("bitsandbytes")
    old.__version__ = "0.41.0"
    old.nn = types.SimpleNamespace(Params4bit=_OldParams4bit,
                                   Linear4bit=lambda i, o, bias=True, device=None, **kw: nn.Linear(i, o, bias, device))
    monkeypatch.setitem(sys.modules, "bitsandbytes", old)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"bitsandbytes 0\.41\.0 cannot quantize/run 4-bit layers on the CPU "
                                           r"\(RuntimeError: CUDA Setup failed.*pip install -U 'bitsandbytes>=0\.50'"
                                           r".*CUDA GPU.*quantize=null"):
        require_bitsandbytes()
    model = tiny(tie_embeddings=False)
    with pytest.raises(RuntimeError, match="cannot quantize/run 4-bit layers on the CPU"):
        quantize_linears(model)  # default device: the CPU here
    assert not quantized_linears(model) and type(model.layers[0].attention.wq) is nn.Linear  # nothing half-replaced
    with pytest.raises(RuntimeError, match=r"on device cuda: torch.cuda.is_available\(\) is False"):
        require_bitsandbytes("cuda")


def test_bad_kind_tied_head_and_order_with_lora(bnb):
    with pytest.raises(ValueError, match=r"quantize='int3': choose one of \['nf4'\]"):
        quantize_linears(tiny(), kind="int3", device="cpu")
    with pytest.raises(ValueError, match=r"\['output'\] share their weight .* keep them in skip"):
        quantize_linears(tiny(), skip=(), device="cpu")
    with pytest.raises(ValueError, match="quantize the base first, then apply_lora"):
        quantize_linears(apply_lora(tiny(), LoraConfig(2, 4.0)), device="cpu")


def test_block_linears_become_frozen_nf4_double_quant_bf16_layers_on_the_cpu(bnb):
    model = tiny(tie_embeddings=False)
    tokens = batch()
    with torch.no_grad():
        ref = model(tokens)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    emb = model.tok_embeddings.weight
    quantize_linears(model, device="cpu")
    q = quantized_linears(model)
    assert {n.rpartition(".")[2] for n in q} == BLOCK_NAMES and len(q) == 7 * model.cfg.n_layers
    assert type(model.output) is nn.Linear and model.tok_embeddings.weight is emb  # skip=("output",)
    for name, layer in q.items():
        w = layer.weight
        assert type(layer) is bnb.nn.Linear4bit and isinstance(w, bnb.nn.Params4bit)
        assert (w.quant_type, w.compress_statistics, layer.compute_dtype) == ("nf4", True, torch.bfloat16)
        assert w.dtype == torch.uint8 and w.numel() * 2 == originals[name].numel() and not w.requires_grad
        assert w.device.type == "cpu" and w.quant_state.nested  # double quantization: absmax quantized too
        deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
        err = (deq - originals[name]).abs().mean() / originals[name].abs().mean()
        assert 0 < err < 0.25, (name, float(err))  # NF4: ~17% of the mean magnitude here: not a copy, not noise
    with torch.no_grad():
        out = model(tokens)
    assert out.dtype == torch.float32 and 0 < (out - ref).abs().max() < 0.1  # 4-bit weights, same model


def test_lora_wraps_a_quantized_base(bnb):
    """The QLoRA order: quantize, then apply_lora; adapters train in bf16, the 4-bit base stays frozen."""
    base = quantize_linears(tiny(tie_embeddings=False), device="cpu")
    tokens = batch()
    with torch.no_grad():
        alone = base(tokens)
    base_keys = set(base.state_dict())
    packed = {n: m.weight.detach().clone() for n, m in quantized_linears(base).items()}
    model = apply_lora(base, LoraConfig(4, 8.0, targets=tuple(sorted(BLOCK_NAMES))))
    layers = lora_layers(model)
    assert len(layers) == 7 * model.cfg.n_layers
    for layer in layers.values():
        assert type(layer) is QLoRALinear and isinstance(layer, LoRALinear)
        assert type(layer.base) is bnb.nn.Linear4bit and layer.weight is layer.base.weight
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
        assert layer.lora_A.device == layer.base.weight.device and torch.count_nonzero(layer.lora_B) == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in layers for ab in ("lora_A", "lora_B")}
    # state-dict names: the base's keys (weight + bitsandbytes quant state) now under <name>.base, adapters beside
    def under_base(key: str) -> str:
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        return key if owner is None else f"{owner}.base{key[len(owner):]}"

    assert any(k.endswith(".weight.absmax") for k in base_keys)
    assert set(model.state_dict()) == {under_base(k) for k in base_keys} | trainable
    plain = apply_lora(tiny(tie_embeddings=False), LoraConfig(4, 8.0, targets=tuple(sorted(BLOCK_NAMES))))
    assert set(lora_state_dict(model)) == set(lora_state_dict(plain))  # adapters move between 4-bit and bf16
    with torch.no_grad():
        assert torch.equal(model(tokens), alone)  # a fresh adapter (B = 0) changes nothing

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch(5, 4, 17)[:, :-1], batch(5, 4, 17)[:, 1:]
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        losses.append(float(loss))
        if step == 1:  # step 0: B = 0 so A gets no gradient yet; from then on both do
            for name, layer in layers.items():
                assert layer.lora_A.grad.dtype == torch.bfloat16, name
                assert torch.count_nonzero(layer.lora_A.grad) and torch.count_nonzero(layer.lora_B.grad), name
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses
    for name, w in packed.items():  # the 4-bit base never moved
        assert torch.equal(model.get_submodule(name + ".base").weight, w)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_eval_forward_on_the_cpu_then_training_keeps_true_gradients(bnb):
    """bitsandbytes' CPU inference repacking is off: an eval pass (validation) leaves training's gradients intact."""
    def grads(eval_first: bool) -> dict[str, torch.Tensor]:
        model = trained_qlora_model()
        if eval_first:
            with torch.no_grad():
                model.eval()(batch())
        model.train().loss(batch(2)[:, :-1], batch(2)[:, 1:]).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = grads(False), grads(True)
    assert fresh.keys() == after_eval.keys()
    for name in fresh:
        assert torch.equal(fresh[name], after_eval[name]), name


def test_gradient_checkpointing_gives_the_same_gradients(bnb):
    from llamalit.training.module import enable_gradient_checkpointing

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = trained_qlora_model()
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train().loss(batch(3)[:, :-1], batch(3)[:, 1:]).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=0, rtol=0)


def test_merge_refuses_on_a_4bit_base_and_the_adapter_saves(bnb, tmp_path):
    model = qlora_model()
    layer = model.layers[0].attention.wq
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"merge_lora: layers\.0\.attention\.wq \(and 13 more\): cannot merge "
                                         r"LoRA into a 4-bit .* bf16 reload of the base.*export_merged_hf"):
        merge_lora(model)
    with pytest.raises(ValueError, match="cannot merge LoRA into a 4-bit"):
        layer.merge_()
    assert lora_layers(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        for lay in lora_layers(model).values():
            lay.lora_B.normal_(0, 0.1)
    cfg = LoraConfig(4, 8.0, targets=tuple(sorted(BLOCK_NAMES)))
    save_adapter(model, tmp_path, base="some/base", lora_cfg=cfg)
    lora_cfg, sd, meta = load_adapter(tmp_path)
    assert lora_cfg == cfg and meta["base"] == "some/base" and sd.keys() == lora_state_dict(model).keys()
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    plain = apply_lora(tiny(tie_embeddings=False), lora_cfg)  # the float32 base takes the bf16 adapter
    load_lora_state_dict(plain, sd)
    assert all(torch.equal(plain.get_submodule(k.rpartition(".")[0]).get_parameter(k.rpartition(".")[2]),
                           v.float()) for k, v in sd.items())


def test_lora_linear_and_qlora_linear_refuse_the_other_kind(bnb):
    q = quantize_linears(tiny(tie_embeddings=False), device="cpu").layers[0].attention.wq
    with pytest.raises(TypeError, match="is a 4-bit layer; wrap it with QLoRALinear"):
        LoRALinear(q, 2, 1.0)
    with pytest.raises(TypeError, match="QLoRALinear wraps a 4-bit layer; got Linear"):
        QLoRALinear(nn.Linear(4, 4), 2, 1.0)


def compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def compose_qlora(overrides: list[str]):
    return compose_train(["experiment=alpaca_qlora", *overrides])


def test_alpaca_qlora_composes_with_the_qlora_settings(tmp_path):
    from omegaconf import OmegaConf

    from llamalit.data.text_formats import alpaca_prompt
    from llamalit.training.optim import OptimConfig

    base = tmp_path / "Llama-2-7b-hf"
    cfg = compose_qlora([f"init_from={base}", f"data.source={tmp_path / 'alpaca_data.json'}", f"run_dir={tmp_path}"])
    c = OmegaConf.to_container(cfg, resolve=True)
    assert (c["model"]["quantize"], c["model"]["gradient_checkpointing"], c["init_from"]) == ("nf4", True, str(base))
    d = c["data"]
    assert (d["name"], d["format"], d["kind"], d["seq_len"], d["packing"], d["train_on_inputs"]) == \
        ("alpaca", "alpaca", "instruct", 2048, True, False)
    assert d["source"] == str(tmp_path / "alpaca_data.json") and d["tokenizer"] == str(base / "tokenizer.model")
    lora = LoraConfig.from_dict(c["lora"])
    assert c["lora"]["enabled"] and (lora.rank, lora.alpha, lora.dropout) == (64, 16, 0.1)
    assert set(lora.targets) == BLOCK_NAMES
    optim = OptimConfig.from_dict(c["optim"])
    assert (optim.lr, optim.schedule, optim.warmup_ratio, optim.paged, optim.beta2, optim.weight_decay) == \
        (2e-4, "constant", 0.03, True, 0.999, 0.0)
    assert (c["trainer"]["gradient_clip_val"], c["trainer"]["precision"]) == (0.3, "auto")
    assert c["model"]["max_seq_len"] == 2048 and ModelConfig.from_dict(c["model"]).max_seq_len == 2048
    assert c["callbacks"]["samples"]["prompts"] == [alpaca_prompt("Give three tips for staying healthy.")]


def test_alpaca_qlora_takes_dolly_and_no_quantization(tmp_path):
    cfg = compose_qlora([f"init_from={tmp_path}", "data=dolly", "model.quantize=null", "optim.paged=false",
                         "model.gradient_checkpointing=false"])
    assert (cfg.data.name, cfg.data.seq_len, cfg.model.quantize, cfg.optim.paged) == ("dolly", 2048, None, False)
    assert cfg.lora.rank == 64 and cfg.data.tokenizer == f"{tmp_path}/tokenizer.model"


def test_trainer_fsdp_wraps_each_transformer_block(tmp_path):
    """``trainer=fsdp`` composes into Lightning's FSDPStrategy whose policy wraps exactly the TransformerBlocks.

    Built on the CPU without a process group (Lightning's FSDP itself needs GPUs to train).
    """
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    from omegaconf import OmegaConf
    from torch.distributed.fsdp import ShardingStrategy

    from llamalit.model.llama import TransformerBlock

    assert compose_train(["trainer=fsdp"]).trainer.gradient_clip_val is None  # FSDP cannot clip by norm
    cfg = compose_train(["experiment=alpaca_qlora", f"init_from={tmp_path}", "model.quantize=null", "lora=none",
                         "optim.paged=false", "trainer=fsdp", "trainer.devices=8", "trainer.gradient_clip_val=null",
                         f"run_dir={tmp_path}"])
    assert not cfg.lora.enabled and cfg.model.quantize is None and cfg.model.gradient_checkpointing
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert (trainer["_target_"], trainer["devices"], trainer["gradient_clip_val"]) == ("lightning.Trainer", 8, None)
    assert trainer["max_steps"] == 250 and trainer["precision"] == "auto"  # the experiment's settings kept
    strategy = instantiate(trainer["strategy"])
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    policy = strategy.kwargs["auto_wrap_policy"]
    model = Llama(ModelConfig.preset("tiny", n_layers=3))
    wrapped = policy._run_policy(model, set(), {})
    assert set(wrapped) == set(model.layers) and all(type(m) is TransformerBlock for m in wrapped)


def test_num_params_counts_4bit_weights_at_their_real_shape():
    pytest.importorskip("bitsandbytes")
    model = Llama(ModelConfig.preset("tiny", dim=64, hidden_dim=128, tie_embeddings=False))
    before = model.num_params()
    quantize_linears(model, device="cpu")
    assert model.num_params() == before
