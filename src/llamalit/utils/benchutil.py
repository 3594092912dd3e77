"""Helpers shared by the benchmark scripts in ``scripts/``."""

from __future__ import annotations

import argparse
import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path

import torch

from llamalit.utils.fileio import atomic_write_json


def _child(fn: Callable[[dict], dict], args: dict, queue) -> None:
    try:
        queue.put(fn(args))
    except BaseException as e:  # report (out of memory included), do not hang the parent
        queue.put({**args, "error": f"{type(e).__name__}: {str(e)[:300]}"})


def run_isolated(fn: Callable[[dict], dict], args: dict) -> dict:
    """``fn(args)`` in a fresh spawned process, so memory counters (CUDA peak, peak RSS) and the allocator
    start clean for every case; an exception there comes back as ``{**args, "error": "..."}``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def write_json(path: str | Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """The rows of a benchmark with its arguments and torch version, written atomically."""
    atomic_write_json(path, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                             "torch": torch.__version__, "rows": rows})
