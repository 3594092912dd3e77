"""Bad input to generate.py / export.py / train_tokenizer: a clear error naming the key and value, raised
before anything is printed or written (and never a write over the source checkpoint)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_interop import VOCAB, Recorder, tiny, tokenizer_path  # noqa: F401 (tokenizer_path: a fixture)

from llamalit.checkpoints import load_hf, read_llama2c_bin, save_model
from llamalit.cli.export import run_export
from llamalit.cli.generate import run_generate
from llamalit.data.tokenizer import Tokenizer, TokenizerError, fetch_tokenizer, train_tokenizer
from llamalit.inference.generate import generate, generate_stream
from llamalit.inference.loading import resolve_device
from llamalit.model.llama import Llama, ModelConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer_path) -> Path:  # noqa: F811
    """A native model dir (vocab 300) that names its tokenizer."""
    out = tmp_path_factory.mktemp("src") / "run"
    save_model(tiny(5), out, extra={"tokenizer": str(tokenizer_path)})
    return out


def tokenizer_of(run_dir: Path) -> Path:
    from llamalit.checkpoints import find_tokenizer

    return find_tokenizer(run_dir)


def snapshot(path: Path) -> dict[str, bytes]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


# --- generate -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("max_new_tokens", 0), ("max_new_tokens", -3), ("top_p", 1.5), ("top_p", -0.5), ("top_p", 0.0),
    ("top_k", -5), ("top_k", 0), ("top_k", "abc"), ("temperature", -1.0), ("temperature", "hot"), ("seed", "x"),
])
def test_generate_rejects_bad_settings_before_printing(run_dir, key, value):
    cfg = {"ckpt": str(run_dir), "prompt": "once upon", "max_new_tokens": 5, "temperature": 1.0, "top_k": None,
           "top_p": 0.9, "seed": 0, "device": "cpu", key: value}
    out = Recorder()
    with pytest.raises(ValueError, match=f"^{key}={value!r}: must be"):
        run_generate(cfg, out)
    assert out.getvalue() == ""


def test_generate_api_raises_for_the_same_values():
    torch.manual_seed(0)
    model = Llama(ModelConfig.preset("tiny"))
    bad = [({"max_new_tokens": 0}, "max_new_tokens=0"), ({"top_p": 1.5}, "top_p=1.5"), ({"top_p": -0.5}, "top_p"),
           ({"top_k": 0}, "top_k=0"), ({"top_k": -5}, "top_k=-5"), ({"top_k": 2.5}, "top_k=2.5"),
           ({"temperature": -0.1}, "temperature=-0.1"), ({"temperature": float("nan")}, "temperature=nan")]
    for kwargs, match in bad:
        args = {"max_new_tokens": 3, **kwargs}
        with pytest.raises(ValueError, match=match):
            generate(model, [1, 2], **args)
        with pytest.raises(ValueError, match=match):  # at the call, not at the first next()
            generate_stream(model, [1, 2], **args)
    assert len(generate(model, [1, 2], 3, top_p=1.0, top_k=1)) == 3  # the edges of the valid ranges


def test_generate_max_new_tokens_past_the_context_is_capped(run_dir):
    cfg = {"ckpt": str(run_dir), "prompt": "once upon", "temperature": 0.0, "device": "cpu", "stop_at_eos": False}
    n_prompt = len(Tokenizer(tokenizer_of(run_dir)).encode("once upon", bos=True))
    capped = run_generate({**cfg, "max_new_tokens": 10_000}, Recorder())
    full = run_generate({**cfg, "max_new_tokens": None}, Recorder())  # null: fill the context
    assert len(capped) == 128 - n_prompt  # tiny's context is 128
    assert capped == full


def test_generate_device_errors():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda: no CUDA GPU is visible; use device=cpu"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match=r"device='gpu': not a device name; use auto, cpu, cuda"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_generate_names_its_own_tokenizer_key(run_dir, tmp_path):
    with pytest.raises(TokenizerError, match=r"^tokenizer='.*nope\.model': no such file"):
        run_generate({"ckpt": str(run_dir), "tokenizer": str(tmp_path / "nope.model"), "device": "cpu"}, Recorder())
    with pytest.raises(TokenizerError, match=r"^data\.tokenizer=.*train:N"):  # prepare's key stays the default
        fetch_tokenizer(str(tmp_path / "nope.model"), tmp_path)


def test_generate_cli_negative_temperature_prints_nothing(run_dir, tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "generate.py"), f"ckpt={run_dir}", "prompt=the cat",
                          "temperature=-1", "device=cpu"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.startswith("error: temperature=-1: must be a number >= 0"), res.stderr


# --- export -------------------------------------------------------------------------------------------------

def export(ckpt: Path, fmt: str, out: Path, **extra) -> list[Path]:
    return run_export({"ckpt": str(ckpt), "format": fmt, "out": str(out), "tokenizer": None, "group_size": 64,
                       "overwrite": False, **extra})


def test_export_never_writes_over_the_source(run_dir, tmp_path):
    src = tmp_path / "ckpt" / "model.bin"
    export(run_dir, "llama2c_v1", src)
    before = snapshot(src.parent)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"out=.*model\.bin: .*source checkpoint.*pick a new path for out="):
            export(src, "llama2c", src, overwrite=overwrite)
        native_before = snapshot(run_dir)
        with pytest.raises(ValueError, match="source checkpoint.*pick a new path for out="):
            export(run_dir, "hf", run_dir, overwrite=overwrite)
        with pytest.raises(ValueError, match="holds the source checkpoint"):  # out=RUN's parent would replace RUN
            export(run_dir, "merged", run_dir.parent, overwrite=overwrite)
        with pytest.raises(ValueError, match="source checkpoint"):  # out=RUN: RUN/model.bin lands inside it
            export(run_dir, "llama2c_v1", run_dir, overwrite=overwrite)
        with pytest.raises(ValueError, match="source checkpoint"):  # ckpt=RUN/model.safetensors stands for RUN
            export(run_dir / "model.safetensors", "llama2c", run_dir / "model.bin", overwrite=overwrite)
        assert snapshot(run_dir) == native_before
    assert snapshot(src.parent) == before


def test_export_refuses_existing_out_unless_overwrite(run_dir, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out=.*busy: .* not empty; pick a new path for out= or pass "
                                              r"overwrite=true"):
        export(run_dir, "hf", busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    export(run_dir, "hf", busy, overwrite=True)
    assert load_hf(busy).cfg.vocab_size == VOCAB

    existing = tmp_path / "old.bin"
    existing.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"old\.bin already exists"):
        export(run_dir, "llama2c", existing)
    assert existing.read_bytes() == b"old"
    (tmp_path / "tokenizer.bin").write_bytes(b"old tok")
    with pytest.raises(FileExistsError, match=r"tokenizer\.bin already exists.*overwrite=true"):
        export(run_dir, "llama2c", tmp_path / "new.bin")  # the sibling tokenizer.bin counts too
    assert not (tmp_path / "new.bin").exists()
    assert (tmp_path / "tokenizer.bin").read_bytes() == b"old tok"
    export(run_dir, "llama2c", existing, overwrite=True)
    assert read_llama2c_bin(existing)[1]["version"] == 0
    assert (tmp_path / "tokenizer.bin").read_bytes() != b"old tok"

    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"out=.*old\.bin: is a file, but format=peft writes a directory; "
                                             r"out must be a directory"):
            export(run_dir, "peft", existing, overwrite=overwrite)
    with pytest.raises(ValueError, match=r"overwrite='yes': use true or false"):
        export(run_dir, "hf", tmp_path / "fresh", overwrite="yes")


def test_export_checks_the_tokenizer_before_writing(run_dir, tmp_path):
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00garbage")
    out = tmp_path / "out" / "model.bin"
    with pytest.raises(TokenizerError, match=r"corrupt\.model: not a SentencePiece model.*fix tokenizer="):
        export(run_dir, "llama2c", out, tokenizer=str(corrupt))
    with pytest.raises(TokenizerError, match=r"^tokenizer='.*missing\.model': no such file"):
        export(run_dir, "hf", tmp_path / "hf", tokenizer=str(tmp_path / "missing.model"))
    save_model(Llama(ModelConfig.preset("tiny")), tmp_path / "v256")  # vocab 256; the tokenizer has 300 pieces
    with pytest.raises(ValueError, match=r"has 300 pieces but the model's vocab_size is 256"):
        export(tmp_path / "v256", "llama2c", out, tokenizer=str(tokenizer_of(run_dir)))
    assert not out.parent.exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("value", [-4, 0, "abc", 2.5])
def test_export_rejects_bad_group_size(run_dir, tmp_path, value):
    with pytest.raises(ValueError, match=f"^group_size={value!r}: must be an integer >= 1"):
        export(run_dir, "llama2c_q8", tmp_path / "q8.bin", group_size=value)
    assert not (tmp_path / "q8.bin").exists()


def test_export_q8_group_divides_hidden_dim_for_runq(tmp_path, capsys):
    """runq.c multiplies w2 (rows of hidden_dim values) in whole groups: 64 does not divide 96, 32 does."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=96, max_seq_len=16))
    save_model(model, tmp_path / "m")
    export(tmp_path / "m", "llama2c_q8", tmp_path / "q8.bin")
    back, info = read_llama2c_bin(tmp_path / "q8.bin")
    assert info["group_size"] == 32
    assert "group_size=64 -> 32" in capsys.readouterr().err
    w2, w2_back = model.layers[0].feed_forward.w2.weight, back.layers[0].feed_forward.w2.weight
    per_row_max = w2.abs().amax(1, keepdim=True)
    assert ((w2_back - w2).abs() <= per_row_max / 127).all()  # every group's error is within one Q8 step


def test_export_cli_refuses_existing_out(run_dir, tmp_path):
    out = tmp_path / "old.bin"
    out.write_bytes(b"old")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), f"ckpt={run_dir}",
                          "format=llama2c_v1", f"out={out}"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    assert f"error: out={out}: {out} already exists; pick a new path for out= or pass overwrite=true" in res.stderr
    assert out.read_bytes() == b"old"


# --- train_tokenizer ----------------------------------------------------------------------------------------

def test_train_tokenizer_too_small_vocab_says_how_many(tmp_path):
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x3b1, 0x3c9)] + list("abcdefghijklmnopqrstuvwxyz")  # ~50 characters
    lines = ["".join(rng.choice(alphabet) for _ in range(30)) for _ in range(200)]
    with pytest.raises(TokenizerError, match=r"train:270: too few pieces.*at least (\d+).*use a larger N") as e:
        train_tokenizer(lines, 270, tmp_path / "t.model", num_threads=1)
    assert "smaller N" not in str(e.value)
    need = int(str(e.value).split("at least ")[1].split()[0])
    assert need > 270
    assert Tokenizer(train_tokenizer(lines, need, tmp_path / "t.model", num_threads=1)).vocab_size == need


# --- required keys, numbers and paths (every CLI) ------------------------------------------------------------

@pytest.mark.parametrize("script", ["generate.py", "scripts/evaluate.py", "scripts/export.py"])
def test_cli_without_ckpt_says_it_is_required(tmp_path, script):
    args = ["format=hf", f"out={tmp_path / 'out'}"] if "export" in script else []
    res = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 1
    assert res.stderr.startswith("error: ckpt= is required: give the checkpoint"), res.stderr
    assert "???" not in res.stderr


@pytest.mark.parametrize("key, value, valid", [("n", -5, "an integer >= 0 or null"),
                                               ("max_new_tokens", 0, "an integer >= 1"),
                                               ("temperature", -0.5, "a number >= 0"),
                                               ("batch_size", 0, "an integer >= 1")])
def test_evaluate_names_a_bad_number_before_loading(run_dir, key, value, valid):
    from llamalit.cli.evaluate import run_evaluate

    cfg = {"ckpt": str(run_dir), "data": {"source": "synthetic"}, "n": 4, "seed": 0, "max_new_tokens": 8,
           "temperature": 0.0, "batch_size": 2, "examples": 0, "device": "cpu", key: value}
    with pytest.raises(ValueError, match=rf"^{key}={value!r}: must be {valid}"):
        run_evaluate(cfg, Recorder())


def test_generate_and_export_expand_home_and_variables(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(run_dir.parent))
    monkeypatch.setenv("OUT_ROOT", str(tmp_path))
    out = Recorder()
    run_generate({"ckpt": f"~/{run_dir.name}", "prompt": "once", "max_new_tokens": 2, "temperature": 0.0,
                  "device": "cpu"}, out)
    assert out.getvalue()
    written = export(Path(f"~/{run_dir.name}"), "hf", Path("$OUT_ROOT/hf"))
    assert written == [tmp_path / "hf"] and (tmp_path / "hf" / "config.json").is_file()
