"""Every device-dependent setting of a run, resolved in one place and shown as one table.

A run's config leaves several speed settings to the device (``auto``/null): precision, fused AdamW,
``compile``, ``data.packing``, ``attention``, ``loss_impl``, ``data.loader_workers``. They are resolved here
for the device the run trains on, or, with ``resolve_as=cuda``, as a CUDA machine would resolve them
while the run stays where it is: the CPU tests run the GPU defaults that way. A value the real device
cannot run (flex attention's backward off CUDA) falls back, and the table says why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

import torch

from llamalit.model.llama import FLEX_MIN_HEAD_DIM
from llamalit.model.losses import resolve_loss_impl

log = logging.getLogger(__name__)

DEVICE_TYPES = ("cpu", "cuda", "mps")
CUDA_LOADER_WORKERS = 2  # loader processes on CUDA when data.loader_workers is null


@dataclass(frozen=True)
class DeviceSettings:
    """What a run uses on its device; ``why`` names, per field, the reason for a value that was not set."""

    device: str                 # the device type the run trains on
    resolved_as: str            # the device type the auto settings were resolved for
    precision: str | int        # Lightning precision
    fused_adamw: bool
    compile: bool               # torch.compile the training step (one graph; see compile_mode)
    packing: bool               # several instruct examples per train row
    attention: str              # packed rows' attention: flex | dense
    loss_impl: str              # llamalit.model.losses: compiled | plain | chunked | liger | cce
    loader_workers: int
    eval_device: str            # where the end-of-run evaluation generates
    eval_batching: str          # padded (left-padded batches, CUDA) | length (prompts of equal length)
    why: dict[str, str] = field(default_factory=dict, compare=False)

    def table(self) -> str:
        """A small text table: setting, value, why."""
        rows = [(f.name, str(getattr(self, f.name)), self.why.get(f.name, "set"))
                for f in fields(self) if f.name not in ("why", "device", "resolved_as")]
        title = f"device settings: training on {self.device}" + (
            f", auto settings resolved as {self.resolved_as}" if self.resolved_as != self.device else "")
        width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        return "\n".join([title] + [f"  {n:<{width[0]}}  {v:<{width[1]}}  {w}" for n, v, w in rows])


def device_type_of(accelerator: str | None) -> str:
    """The device type a Lightning ``accelerator`` setting trains on here."""
    acc = str(accelerator or "auto").lower()
    if acc in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return "cuda"
        if acc == "auto" and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return acc if acc in DEVICE_TYPES else "cpu"


def _choice(value, what: str, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{what}={value!r}: choose one of {', '.join(map(str, choices))}")
    return value


def _tristate(value, key: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("auto", "null", "none", "true", "false"):
        return {"true": True, "false": False}.get(value.lower())
    raise ValueError(f"{key}={value!r}: use true, false or null (auto)")


def resolve_device_settings(cfg: Mapping, device_type: str, head_dim: int | None = None) -> DeviceSettings:
    """Resolve every auto/null device setting of the run config ``cfg`` (a plain dict) for ``device_type``.

    ``cfg['resolve_as']`` (null or a device type) resolves the auto settings as that device would while the run
    stays on ``device_type``; values that device cannot run fall back (``why`` says so). ``head_dim`` is the
    model's (default: ``cfg['model']``'s dim / n_heads).
    """
    model = cfg.get("model") or {}
    if head_dim is None and model.get("dim") and model.get("n_heads"):
        head_dim = int(model["dim"]) // int(model["n_heads"])
    return resolve_attention(resolve_run_settings(cfg, device_type), cfg.get("attention"), head_dim)


def resolve_run_settings(cfg: Mapping, device_type: str) -> DeviceSettings:
    """Every device setting but the attention backend, which needs the built model's heads (a base loaded from
    ``init_from`` has its own): ``attention`` holds the requested value until :func:`resolve_attention`."""
    device = _choice(device_type, "device", DEVICE_TYPES)
    target = _choice(cfg.get("resolve_as") or device, "resolve_as", DEVICE_TYPES)
    tag = f"auto on {target}"
    why: dict[str, str] = {}
    trainer, optim, data = cfg.get("trainer") or {}, cfg.get("optim") or {}, cfg.get("data") or {}
    quantized = bool((cfg.get("model") or {}).get("quantize"))

    precision = trainer.get("precision", "auto")
    if str(precision) == "auto":
        bf16 = target == "cuda" and (device != "cuda" or torch.cuda.is_bf16_supported())
        precision = "bf16-mixed" if bf16 else "32-true"
        why["precision"] = tag + ("" if bf16 or target != "cuda" else ": this GPU has no bf16")

    fused = optim.get("fused")
    if fused is None:
        fused = target == "cuda" and not optim.get("paged")
        why["fused_adamw"] = tag
    elif optim.get("paged"):
        why["fused_adamw"] = "unused: optim.paged=true takes bitsandbytes' PagedAdamW"

    compile_ = _tristate(cfg.get("compile"), "compile")
    if compile_ is None:
        compile_ = target == "cuda" and not quantized
        why["compile"] = tag + (": off for 4-bit bases" if quantized and target == "cuda" else "")

    kind = data.get("kind", "instruct")
    packing = _tristate(data.get("packing", False), "data.packing")
    if packing is None:
        packing = target == "cuda" and kind == "instruct"
        why["packing"] = tag + ("" if kind == "instruct" else ": pretraining windows are dense already")

    attention = _choice(cfg.get("attention") or "auto", "attention", ("auto", "flex", "dense"))

    loss_impl = str(cfg.get("loss_impl") or "auto")
    if loss_impl == "auto":
        loss_impl = resolve_loss_impl("auto", target, compile_)
        why["loss_impl"] = tag + (": traced into the compiled step" if loss_impl == "compiled" else "")
    else:  # refused now, before data preparation, if this device cannot run it
        resolve_loss_impl(loss_impl, device, compile_)

    workers = data.get("loader_workers")
    if workers is None:
        workers = min(CUDA_LOADER_WORKERS, os.cpu_count() or 1) if target == "cuda" else 0
        why["loader_workers"] = tag
    workers = int(workers)

    why["eval_device"] = "the training device"
    eval_batching = "padded" if target == "cuda" else "length"
    why["eval_batching"] = tag
    return DeviceSettings(device=device, resolved_as=target, precision=precision, fused_adamw=bool(fused),
                          compile=bool(compile_), packing=bool(packing), attention=attention, loss_impl=loss_impl,
                          loader_workers=workers, eval_device=device, eval_batching=eval_batching, why=why)


def resolve_attention(settings: DeviceSettings, requested: str | None, head_dim: int | None) -> DeviceSettings:
    """``settings`` with packed rows' attention resolved for a model whose heads are ``head_dim`` wide: ``auto``
    is flex on CUDA when the heads are wide enough, else dense; an explicit flex off CUDA is kept (the model
    refuses it, naming the setting)."""
    attention = _choice(requested or "auto", "attention", ("auto", "flex", "dense"))
    why = dict(settings.why)
    why.pop("attention", None)
    target, device = settings.resolved_as, settings.device
    if attention == "auto":
        wide = head_dim is None or head_dim >= FLEX_MIN_HEAD_DIM
        attention = "flex" if target == "cuda" and wide else "dense"
        why["attention"] = f"auto on {target}" + (
            "" if wide else f": head_dim {head_dim} < {FLEX_MIN_HEAD_DIM}, flex's minimum")
        if attention == "flex" and device != "cuda":
            attention = "dense"
            why["attention"] = f"flex on {target}, dense here: flex attention has no backward on the {device}"
    return replace(settings, attention=attention, why=why)


def apply_device_settings(cfg: dict, settings: DeviceSettings) -> dict:
    """``cfg`` (a plain run dict) with the resolved values written where the code reads them."""
    out = {**cfg, "compile": settings.compile, "attention": settings.attention, "loss_impl": settings.loss_impl}
    out["trainer"] = {**(cfg.get("trainer") or {}), "precision": settings.precision}
    out["optim"] = {**(cfg.get("optim") or {}), "fused": settings.fused_adamw}
    out["evaluation"] = {**(cfg.get("evaluation") or {}), "batching": settings.eval_batching}
    data = cfg.get("data") or {}
    # explicit packing=true on pretraining data stays true: the DataModule refuses it with the reason
    out["data"] = {**data, "packing": settings.packing or bool(data.get("packing")),
                   "loader_workers": settings.loader_workers}
    return out


def log_device_settings(settings: DeviceSettings) -> None:
    """Log the table once, at the start of a run."""
    log.info("%s", settings.table())
