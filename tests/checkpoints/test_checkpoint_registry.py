"""The registry of checkpoint formats: detection order, each writer's output detected as its own format and read
back through the registry, and no import cycle inside ``llamalit.checkpoints``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamalit.checkpoints as checkpoints_pkg
from llamalit.checkpoints import load_checkpoint, save_hf, save_llama2c_bin, save_model, save_peft
from llamalit.checkpoints.adapter import save_adapter
from llamalit.checkpoints.detect import detect_format
from llamalit.checkpoints.registry import BY_NAME, FORMATS, format_of
from llamalit.model.llama import Llama, ModelConfig
from llamalit.model.lora import LoraConfig, apply_lora

PKG_DIR = Path(checkpoints_pkg.__file__).parent
# Modules that each read one format; they may use the helpers below, never the loader or each other
# (native's directory is a Hugging Face one plus llamalit.json, so it builds on hf; our adapter directory is
# a PEFT one plus llamalit_adapter.json, so it builds on peft).
FORMAT_MODULES = {"native", "hf", "llama2c", "peft", "adapter", "lightning_ckpt"}
HELPERS = {"common", "hf_layout", "fingerprint", "tokenizer"}
ALLOWED_FORMAT_IMPORTS = {("native", "hf"), ("adapter", "peft")}


def tiny(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig.preset("tiny")).eval()


def with_lora(model: Llama) -> Llama:
    apply_lora(model, LoraConfig(rank=2, alpha=4.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model.eval()


def lightning_ckpt(model: Llama) -> dict:
    cfg = {"model": model.cfg.to_dict(), "lora": {"enabled": False}, "init_from": None}
    return {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"cfg": cfg}, "epoch": 0, "global_step": 1}


def write_every_format(model: Llama, tmp: Path) -> dict[str, tuple[str, Llama]]:
    """Each of our writers' output -> (the format it must be detected as, the model it must load as)."""
    save_model(model, tmp / "native")
    save_hf(model, tmp / "hf")
    save_llama2c_bin(model, tmp / "v0.bin", version=0)
    save_llama2c_bin(model, tmp / "v1.bin", version=1)
    torch.save(lightning_ckpt(model), tmp / "last.ckpt")
    torch.save({"model": model.state_dict(), "model_args": model.cfg.to_dict()}, tmp / "ckpt.pt")
    adapted = with_lora(tiny(0))
    save_adapter(adapted, tmp / "adapter", base=str(tmp / "native"), lora_cfg=LoraConfig(rank=2, alpha=4.0))
    save_peft(adapted, tmp / "peft", base=str(tmp / "hf"))
    return {"native": ("native", model), "hf": ("hf", model), "v0.bin": ("llama2c_bin", model),
            "v1.bin": ("llama2c_bin", model), "last.ckpt": ("torch", model), "ckpt.pt": ("torch", model),
            "adapter": ("adapter", adapted), "peft": ("peft", adapted)}


def test_formats_in_detection_order():
    assert [f.name for f in FORMATS] == ["native", "adapter", "peft", "hf", "torch", "llama2c_bin"]
    assert set(BY_NAME) == {f.name for f in FORMATS}
    # directory formats before files; the more specific before what it extends
    assert [f.is_dir for f in FORMATS] == [True, True, True, True, False, False]


def test_each_writer_detected_as_its_format_and_read_back(tmp_path):
    model = tiny(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 8))
    for src, (name, want) in write_every_format(model, tmp_path).items():
        path = tmp_path / src
        assert detect_format(path) == name, src
        assert format_of(path) is BY_NAME[name], src
        loaded = BY_NAME[name].load(path, True, load_checkpoint)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(tokens), want(tokens), msg=src)


def test_order_decides_between_formats_a_directory_also_matches(tmp_path):
    """Ours is also a Hugging Face directory and our adapter also a PEFT one: the earlier entry wins."""
    write_every_format(tiny(0), tmp_path)
    assert BY_NAME["hf"].detect(tmp_path / "native") and BY_NAME["native"].detect(tmp_path / "native")
    assert BY_NAME["peft"].detect(tmp_path / "adapter") and BY_NAME["adapter"].detect(tmp_path / "adapter")
    assert format_of(tmp_path / "native").name == "native"
    assert format_of(tmp_path / "adapter").name == "adapter"
    assert not BY_NAME["native"].detect(tmp_path / "hf")
    assert not BY_NAME["adapter"].detect(tmp_path / "peft")


def test_unmerged_adapter_load_keeps_lora_layers(tmp_path):
    write_every_format(tiny(0), tmp_path)
    for src in ("adapter", "peft"):
        kept = BY_NAME[src].load(tmp_path / src, False, load_checkpoint)
        assert any(k.endswith("lora_A") for k in kept.state_dict()), src


def _checkpoints_imports(module: str) -> set[str]:
    """The ``llamalit.checkpoints`` modules ``module`` imports anywhere in it (function-level imports included)."""
    tree = ast.parse((PKG_DIR / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "llamalit.checkpoints":
                found |= {a.name for a in node.names}
            elif node.module.startswith("llamalit.checkpoints."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("llamalit.checkpoints.")}
    return found


@pytest.mark.parametrize("module", sorted(FORMAT_MODULES))
def test_format_modules_import_only_the_shared_helpers(module):
    bad = {m for m in _checkpoints_imports(module) - HELPERS if (module, m) not in ALLOWED_FORMAT_IMPORTS}
    assert not bad, f"checkpoints/{module}.py imports {sorted(bad)}: a format module uses only {sorted(HELPERS)}"


@pytest.mark.parametrize("module", sorted(HELPERS))
def test_helpers_import_no_format_or_loader(module):
    assert _checkpoints_imports(module) <= HELPERS, module


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported first (then the rest, and all in reverse order) with no llamalit module loaded: a
    cycle fails with a partially initialised module. One interpreter, llamalit's modules dropped between orders."""
    modules = sorted(f"llamalit.checkpoints.{p.stem}" for p in PKG_DIR.glob("*.py") if p.stem != "__init__")
    orders = [[m, *modules] for m in [*modules, "llamalit.model.build", "llamalit.model.lora"]] + [modules[::-1]]
    script = f"""
import importlib, sys
import torch  # loaded once: only llamalit's own modules are dropped between orders
for order in {orders!r}:
    for name in [n for n in sys.modules if n == "llamalit" or n.startswith("llamalit.")]:
        del sys.modules[name]
    try:
        for m in order:
            importlib.import_module(m)
    except Exception as e:
        sys.exit(f"importing {{order[0]}} first: {{type(e).__name__}}: {{e}}")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-1500:]
