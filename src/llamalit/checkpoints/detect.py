"""``load_checkpoint(path_or_url)``: detect which supported format a path holds and load it.

Directories: ours (a Hugging Face Llama directory + ``llamalit.json``; earlier versions:
``model.safetensors`` + ``config.json`` with ``format: llamalit/1``), a llamalit LoRA adapter (PEFT
files + ``llamalit_adapter.json`` naming its base; earlier versions: ``adapter.safetensors`` +
``adapter_config.json``), a PEFT adapter (``adapter_model.safetensors``), a Hugging Face Llama
(``config.json`` + weights).
Files: a torch pickle (Lightning ``.ckpt`` or llama2.c ``.pt``, read with ``weights_only=True``),
a llama2.c ``.bin`` (v1/v2 by magic, v0 by a plausible header and exact size), or a
``.safetensors`` file inside one of the directories above. URLs are downloaded into the cache
first. Adapters are merged into the base on load unless ``merge=False``, which returns the
model with LoRA layers applied (for further training or PEFT export).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from llamalit.checkpoints import hf, llama2c, native, peft
from llamalit.checkpoints.lightning_ckpt import is_lightning_ckpt, model_from_lightning
from llamalit.checkpoints.llama2c import CheckpointError
from llamalit.model import Llama, ModelConfig

_PICKLE_HEADS = (b"PK\x03\x04", b"\x80")  # torch zip archive, legacy pickle protocol 2+
# The weights file of each directory format: a .safetensors path given for the directory must be it.
_DIR_WEIGHTS = {"native": native.WEIGHTS, "adapter": "adapter*.safetensors", "peft": peft.PEFT_WEIGHTS,
                "hf": "model*.safetensors"}
# JSON files that stand for the checkpoint directory they are in
_CONFIG_NAMES = ("config.json", "adapter_config.json", native.META, "llamalit_adapter.json")
_ACCEPTED = ("accepted: a llamalit, adapter, PEFT or Hugging Face checkpoint directory (or a file in one), "
             "a Lightning .ckpt, a llama2.c .pt or .bin")


def resolve_relative(ref: str, base_dir: Path) -> str:
    """A path named inside a checkpoint's JSON: URLs and absolute paths as is, others relative to it."""
    from llamalit.data.download import is_url

    if is_url(ref) or Path(ref).expanduser().is_absolute():
        return str(Path(ref).expanduser()) if not is_url(ref) else ref
    candidate = base_dir / ref
    return str(candidate if candidate.exists() else Path(ref))


def fetch(path_or_url: str | Path) -> Path:
    """A local path for ``path_or_url``: URLs are downloaded into the cache (once); a Hugging Face Hub id
    (``org/name[@revision]``, see :mod:`llamalit.hub`) comes from the Hub cache; a local path wins."""
    from llamalit.data.download import cached_download, default_cache_dir, is_url
    from llamalit.hub import hub_checkpoint, parse_hub_id

    if is_url(str(path_or_url)):
        return cached_download(str(path_or_url), default_cache_dir())
    path = Path(path_or_url).expanduser()
    if not path.exists():
        if (ref := parse_hub_id(str(path_or_url))) is not None:
            return hub_checkpoint(ref, "checkpoint")
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    return path


def detect_format(path: Path) -> str:
    """One of ``native``, ``adapter``, ``peft``, ``hf``, ``torch``, ``llama2c_bin``, or an error."""
    if path.is_dir():
        from llamalit.lora import is_adapter_dir

        if native.is_native_dir(path):
            return "native"
        if is_adapter_dir(path):
            return "adapter"
        if peft.is_peft_dir(path):
            return "peft"
        if hf.is_hf_dir(path):
            return "hf"
        listing = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(
            f"{path}: unknown checkpoint directory (found {listing}); expected model.safetensors + "
            "config.json (Hugging Face, with llamalit.json: llamalit), adapter_model.safetensors + "
            "adapter_config.json (PEFT, with llamalit_adapter.json: llamalit)"
        )
    if path.suffix == ".safetensors" or path.name in _CONFIG_NAMES:
        try:
            fmt = detect_format(path.parent)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {_lone_file_problem(path)}; {_ACCEPTED}") from e
        if path.suffix == ".safetensors" and not fnmatch.fnmatchcase(path.name, _DIR_WEIGHTS[fmt]):
            raise CheckpointError(f"{path}: not the weights of the {fmt} checkpoint directory {path.parent} "
                                  f"(that is {_DIR_WEIGHTS[fmt]}); pass the directory, or move the file out")
        return fmt
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_PICKLE_HEADS):
        return "torch"
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == llama2c.MAGIC:
        return "llama2c_bin"
    if path.suffix == ".bin":
        return "llama2c_bin"  # v0 has no magic: its header and size are checked while reading
    raise CheckpointError(f"{path}: unknown checkpoint format (first bytes {head!r}); {_ACCEPTED}")


def _lone_file_problem(path: Path) -> str:
    """Why a ``.safetensors`` / config file is no checkpoint when its folder is not a checkpoint directory."""
    if path.suffix != ".safetensors":
        return f"its folder {path.parent} is not a checkpoint directory (weights missing beside it?)"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as st:
            st.keys()
    except Exception as e:  # safetensors raises its own error types
        return f"not a readable safetensors file (truncated or corrupt? {e})"
    return (f"a safetensors file alone is not a checkpoint, and its folder {path.parent} lacks the config "
            "that goes with it")


def _load_torch(path: Path, merge: bool) -> Llama:
    obj = llama2c.safe_torch_load(path)
    if is_lightning_ckpt(obj):
        llama2c.check_state_dict(obj["state_dict"], f"{path}: 'state_dict'")
        return model_from_lightning(obj, path, merge)
    if isinstance(obj, dict) and "model" in obj and "model_args" in obj:
        return llama2c.load_llama2c_pt(path)
    raise CheckpointError(
        f"{path}: a torch pickle that is neither a Lightning .ckpt (a dict with 'state_dict' and "
        "'hyper_parameters') nor a llama2.c .pt (a dict with 'model', a state dict of tensors, and "
        f"'model_args'); found {llama2c.describe_keys(obj)}"
    )


def _load_native(path: Path) -> Llama:
    """Our directory, through the shape-checked loader (errors name the tensor and both shapes)."""
    return native.load_model(path)


def _load_adapter_dir(path: Path, merge: bool) -> Llama:
    from llamalit.checkpoints.fingerprint import check_base
    from llamalit.lora import apply_lora, load_adapter, load_lora_state_dict, merge_lora

    lora_cfg, sd, meta = load_adapter(path)
    base_ref = meta.get("base")
    if not base_ref:
        raise CheckpointError(f"{path}: its adapter config records no 'base'; load the base model and "
                              "apply the adapter yourself (llamalit.lora.load_adapter)")
    base_local = fetch(resolve_relative(str(base_ref), path))
    check_base(path, meta, str(base_ref), base_local)
    base = load_checkpoint(base_local)
    if isinstance(meta.get("model"), dict):  # the shape trained with (e.g. a longer context)
        want = ModelConfig.from_dict(meta["model"])
        if want != base.cfg:
            base = llama2c.model_from_state_dict(want, base.state_dict(), f"{base_ref} (base of {path})")
    model = apply_lora(base, lora_cfg)
    try:
        load_lora_state_dict(model, sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return merge_lora(model) if merge else model


def load_checkpoint(path_or_url: str | Path, merge: bool = True) -> Llama:
    """Load any supported checkpoint (see the module docstring): a float32 Llama on the CPU, in eval mode.

    ``merge``: fold LoRA adapters into the weights (default) or keep them as LoRA layers.
    """
    return _load(fetch(path_or_url), merge).eval()


def _load(path: Path, merge: bool) -> Llama:
    fmt = detect_format(path)
    if fmt != "torch" and path.is_file() and path.suffix in (".safetensors", ".json"):
        path = path.parent
    if fmt == "native":
        return _load_native(path)
    if fmt == "adapter":
        return _load_adapter_dir(path, merge)
    if fmt == "peft":
        return peft.load_peft(path, merge=merge)
    if fmt == "hf":
        return hf.load_hf(path)
    if fmt == "torch":
        return _load_torch(path, merge)
    return llama2c.read_llama2c_bin(path)[0]


def find_tokenizer(ckpt: str | Path, _follow_base: bool = True) -> Path | None:
    """The tokenizer a checkpoint names (``config.json`` "tokenizer") or a ``tokenizer.model`` beside it;
    for an adapter, else its base's (the local directory its adapter config names).

    For a file (e.g. ``RUN/checkpoints/last.ckpt``) its folder is searched, then the folder above.
    """
    path = Path(ckpt)
    folders = [path] if path.is_dir() else [path.parent, path.parent.parent]
    found = _tokenizer_in(folders)
    if found is None and _follow_base and path.is_dir():
        base = _adapter_base(path)
        found = find_tokenizer(base, _follow_base=False) if base is not None else None
    return found


def _adapter_base(folder: Path) -> Path | None:
    """The local base directory an adapter config names (PEFT "base_model_name_or_path", ours "base")."""
    for name in ("llamalit_adapter.json", "adapter_config.json"):
        try:
            meta = json.loads((folder / name).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        for key in ("base_model_name_or_path", "base"):
            ref = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(ref, str) and ref and (base := Path(resolve_relative(ref, folder))).is_dir():
                return base
    return None


def _tokenizer_in(folders: list[Path]) -> Path | None:
    for folder in folders:
        for cfg_name in (native.META, "llamalit_adapter.json", "config.json", "adapter_config.json"):
            cfg = folder / cfg_name
            if cfg.is_file():
                try:
                    ref = json.loads(cfg.read_text()).get("tokenizer")
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    ref = None
                if isinstance(ref, str) and ref:
                    candidate = Path(resolve_relative(ref, folder))
                    if candidate.is_file():
                        return candidate
        if (folder / "tokenizer.model").is_file():
            return folder / "tokenizer.model"
    return None
