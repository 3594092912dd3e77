"""The ``README.md`` model card of a run's exported weights: the Hugging Face Hub's metadata header (base model,
datasets, library, tags, pipeline tag, license) and what the run measured, so ``hf upload org/name <run dir>``
publishes a usable model repository as it is."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from llamalit.utils.fileio import atomic_write_text
from llamalit.utils.hub import is_url, parse_hub_id

__all__ = ["base_model_id", "dataset_ids", "model_card", "write_model_card", "write_run_cards"]

_HUB_URL = re.compile(r"https?://huggingface\.co/(?P<datasets>datasets/)?(?P<repo>[\w.-]+/[\w.-]+)(?:/|$)")


def _hub_repo(ref: object, datasets: bool) -> str | None:
    """The Hub repo id ``ref`` names: an ``org/name`` id, or a huggingface.co URL of that kind of repo."""
    if ref is None or ref == "":
        return None
    if is_url(str(ref)):
        match = _HUB_URL.match(str(ref))
        return match["repo"] if match and bool(match["datasets"]) == datasets else None
    hub = parse_hub_id(str(ref))
    return hub.repo_id if hub else None


def base_model_id(init_from: object) -> str | None:
    """The Hub id of the base model (``init_from`` as an id or a huggingface.co URL); None for a local base."""
    return _hub_repo(init_from, datasets=False)


def dataset_ids(data: Mapping) -> list[str]:
    """The Hub datasets a run trained on: ``data.source`` as a Hub id or URL, or the config's ``hub_id`` when
    ``data.source`` is ``hub`` or a file of that dataset. A synthetic or local corpus has none."""
    source, hub_id = data.get("source"), data.get("hub_id")
    if source == "hub" and hub_id:
        return [str(hub_id)]
    repo = _hub_repo(source, datasets=True)
    return [repo] if repo else []


def _base_license(init_from: object) -> str | None:
    """The ``license`` of a local base model's own card (its ``README.md``), if it has one."""
    if not init_from or is_url(str(init_from)):
        return None
    card = Path(str(init_from)).expanduser() / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.license
    except ValueError:  # a README without a metadata header
        return None


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _results(summary: Mapping) -> list[tuple[str, object]]:
    rows = [("validation loss", summary.get("val/loss")), ("validation perplexity", summary.get("val/ppl")),
            ("uniform loss (ln vocab)", summary.get("uniform_loss")), ("optimizer steps", summary.get("step")),
            ("tokens seen", summary.get("tokens_seen")), ("tokens / s", summary.get("tokens_per_s")),
            ("parameters", summary.get("params")), ("trainable parameters", summary.get("trainable_params"))]
    adherence = summary.get("adherence") or {}
    rows += [(f"adherence: {key}", adherence.get(key)) for key in ("adherence", "word_recall", "feature_rate",
                                                                     "n_stories")]
    return [(name, value) for name, value in rows if value is not None]


def model_card(summary: Mapping, cfg: Mapping, kind: str = "model") -> str:
    """The card text. ``kind``: ``model`` (our HF Llama directory), ``adapter`` (PEFT files; the base named in
    the header) or ``merged`` (base and adapter folded together, an HF directory)."""
    from huggingface_hub import ModelCard, ModelCardData

    if kind not in ("model", "adapter", "merged"):
        raise ValueError(f"model_card: kind={kind!r}; choose model, adapter or merged")
    data, model, lora = cfg.get("data") or {}, cfg.get("model") or {}, cfg.get("lora") or {}
    init_from = cfg.get("init_from")
    base = base_model_id(init_from)
    license_id = _base_license(init_from) or (cfg.get("export") or {}).get("license") or "mit"
    tags = ["llamalit", "llama", "llama2.c", "text-generation-inference"]
    if lora.get("enabled"):
        tags += ["lora"] + (["peft"] if kind == "adapter" else ["merge"] if kind == "merged" else [])
    meta = ModelCardData(
        base_model=base, datasets=dataset_ids(data) or None, library_name="peft" if kind == "adapter" else
        "transformers", tags=tags, pipeline_tag="text-generation", license=license_id,
        **({"base_model_relation": "adapter" if kind == "adapter" else "merge"} if base and lora.get("enabled")
           else {}))
    name = summary.get("experiment") or cfg.get("experiment_name") or "llamalit model"
    shape = ", ".join(f"{k}={model[k]}" for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                    "max_seq_len") if model.get(k) is not None)
    lines = [f"# {name}", "",
             f"A Llama of the llama2.c architecture ({shape}) trained with "
             "llamalit (PyTorch Lightning + Hydra).", "",
             "## Training", "",
             f"- data: `{data.get('name', '-')}` from `{data.get('source', '-')}`, tokenizer `{data.get('tokenizer', '-')}`"]
    if init_from:
        lines.append(f"- initialized from `{init_from}`")
    if lora.get("enabled"):
        lines.append(f"- LoRA rank {lora.get('rank')}, alpha {lora.get('alpha')} on {', '.join(lora.get('targets') or [])}"
                     + (" (this directory holds the adapter alone)" if kind == "adapter" else
                        " (merged into the base weights here)" if kind == "merged" else ""))
    lines += ["", "## Results (from the run's `summary.json`)", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {metric} | {_fmt(value)} |" for metric, value in _results(summary)]
    lines += ["", "## Use", "", "```python"]
    if kind == "adapter":
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  f"base = AutoModelForCausalLM.from_pretrained({(base or 'BASE_DIR')!r})",
                  "model = PeftModel.from_pretrained(base, 'THIS_DIR')"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained('THIS_DIR')",
                  "tokenizer = AutoTokenizer.from_pretrained('THIS_DIR')"]
    lines += ["```", "", "With llamalit: `llamalit-generate ckpt=THIS_DIR prompt=\"...\"`; for llama.cpp / Ollama: "
              "`llamalit-export ckpt=THIS_DIR format=gguf out=model.gguf dtype=q8_0`"
              + (" (`adapter=true` writes the adapter alone as llama.cpp's adapter GGUF)" if kind == "adapter" else "")
              + ".", ""]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)).content


def write_model_card(folder: str | Path, summary: Mapping, cfg: Mapping, kind: str = "model") -> Path:
    """Write ``folder/README.md`` (atomically) and return its path."""
    path = Path(folder) / "README.md"
    atomic_write_text(path, model_card(summary, cfg, kind))
    return path


def write_run_cards(cfg: Mapping, summary: Mapping, run_dir: str | Path,
                    export_dir: str | Path | None = None) -> list[Path]:
    """Cards for what a run exported: the run directory (model or adapter), ``merged_hf`` when written, and the
    copy in ``export_dir``."""
    files = summary.get("files") or {}
    kind = "adapter" if "adapter" in files else "model"
    written = [write_model_card(run_dir, summary, cfg, kind)]
    if files.get("merged_hf"):
        written.append(write_model_card(files["merged_hf"], summary, cfg, "merged"))
    if export_dir and Path(export_dir).expanduser().is_dir():
        written.append(write_model_card(Path(export_dir).expanduser(), summary, cfg, kind))
    return written
