"""Throughput of ``llamalit-serve`` under N concurrent streaming clients, with llama.cpp's server as the anchor.

    python scripts/bench_serve.py [--ckpt RUN_DIR] [--clients 1,4,8,16] [--requests 4] [--max-tokens 128]
                                  [--random-shape stories15m] [--gguf MODEL.gguf] [--budget-s 900]

Starts ``serve.py`` on 127.0.0.1 (a free port), then for each N runs N clients, each sending M streamed
``/v1/completions`` requests one after another, and prints aggregate completion tokens/s, p50/p95 time to
first token and errors; the goal is 8 clients >= 4x one client's tokens/s with 0 errors. With ``--gguf``
(or a GGUF the run's export writes) and ``llama_cpp`` importable, the same table for llama.cpp's own OpenAI
server (``python -m llama_cpp.server``) on the same model, in the same run. Without ``--ckpt``: the demo
model in the cache (``experiment=demo``), else a random stories260K-shaped model (said in the output).
Everything is bounded: requests per client, ``--max-tokens``, a per-request timeout and ``--budget-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llamalit.inference.server_process import free_port, start_server

PROMPTS = ["Once upon a time", "The little dog", "One day, a girl named Lily", "Tom and his mom went to the park",
           "There was a big tree", "A cat sat on the mat", "The sun was hot and", "Ben had a red ball"]


def default_model(tmp: Path, shape: str | None) -> tuple[Path, str]:
    """The demo model of the cache, else (or with ``shape``) a random model of that preset's shape with a
    300-piece trained tokenizer."""
    from llamalit.data.download import default_cache_dir

    demo = Path(default_cache_dir()) / "models" / "demo"
    if shape is None and (demo / "config.json").is_file():
        return demo, f"demo model {demo}"
    import torch

    from llamalit.checkpoints import save_model
    from llamalit.data.tokenizer import train_tokenizer
    from llamalit.model import Llama, ModelConfig

    rng = random.Random(0)
    words = " ".join(PROMPTS).lower().replace(",", "").split() + "and the was a to she he they".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(500)]
    tok = train_tokenizer(lines, 300, tmp / "tok.model", num_threads=1)
    torch.manual_seed(0)
    shape = shape or "stories260k"
    model = Llama(ModelConfig.preset(shape, vocab_size=300))
    save_model(model, tmp / f"random-{shape}", extra={"tokenizer": str(tok)})
    return tmp / f"random-{shape}", f"random {shape}-shaped model, vocab 300 (--random-shape, or no demo model)"


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      seed: int, timeout: float) -> tuple[int, float]:
    """(completion tokens, seconds to the first token) of one streamed request; raises on any error."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, chunks, used = time.perf_counter(), None, 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                used = data["usage"]["completion_tokens"]
            if data.get("choices") and data["choices"][0].get("text"):
                chunks += 1
                first = first if first is not None else time.perf_counter() - start
    if first is None:
        raise RuntimeError("no text came back")
    return (used if used is not None else chunks), first


async def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int,
                    timeout: float) -> dict:
    ttfts, errors, tokens = [], [], 0
    limits = httpx.Limits(max_connections=clients + 4)

    async def worker(c: int, client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in range(requests):
            try:
                n, first = await one_request(client, url, model, PROMPTS[(c + i) % len(PROMPTS)], max_tokens,
                                             seed=1000 * c + i, timeout=timeout)
                tokens += n
                ttfts.append(first)
            except Exception as e:  # noqa: BLE001 -- every failure counts as an error of the run
                errors.append(f"{type(e).__name__}: {e}")

    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(c, client) for c in range(clients)))
        wall = time.perf_counter() - start
    ttfts.sort()
    pick = (lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] * 1e3) if ttfts else (lambda q: float("nan"))
    return {"clients": clients, "requests": clients * requests, "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50_ms": statistics.median(ttfts) * 1e3 if ttfts else float("nan"),
            "ttft_p95_ms": pick(0.95), "errors": len(errors), "first_error": errors[0] if errors else ""}


def bench(name: str, url: str, model: str, levels: list[int], args, deadline: float) -> list[dict]:
    rows = []
    for n in levels:
        if time.monotonic() > deadline:
            print(f"{name}: --budget-s spent; {n} clients not measured")
            break
        asyncio.run(run_level(url, model, 1, 1, 8, args.request_timeout))  # warm-up
        rows.append({"server": name, **asyncio.run(run_level(url, model, n, args.requests, args.max_tokens,
                                                              args.request_timeout))})
        print(f"  {name}: {n} clients done ({rows[-1]['tok_s']:.0f} tok/s)", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| server | clients | requests | tokens | wall s | tokens/s | x one client | TTFT p50 ms | TTFT p95 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {}
    for r in rows:
        base.setdefault(r["server"], r["tok_s"] if r["clients"] == 1 else None)
        ratio = r["tok_s"] / base[r["server"]] if base[r["server"]] else float("nan")
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | "
              f"{r['tok_s']:.0f} | {ratio:.2f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['errors']} |")
    for r in rows:
        if r["errors"]:
            print(f"{r['server']} {r['clients']} clients, first error: {r['first_error']}")


def llama_cpp_server(gguf: Path, ctx: int, slots: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
           str(port), "--n_ctx", str(ctx * slots), "--model_alias", "gguf"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"llama_cpp.server did not start:\n{log.read_text()[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="checkpoint to serve (default: the demo model, else a random stories260K)")
    ap.add_argument("--random-shape", help="serve a random model of this preset's shape (stories260k, stories15m)")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gguf", help="the same model as GGUF, for llama.cpp's server (llama-cpp-python[server])")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--budget-s", type=float, default=900.0, help="stop starting new levels after this")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    deadline = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt, what = (Path(args.ckpt), f"--ckpt {args.ckpt}") if args.ckpt else default_model(tmp, args.random_shape)
        print(f"model: {what}; {os.cpu_count()} CPUs (shared machine: figures are noisy); "
              f"{args.requests} requests x {args.max_tokens} max tokens per client, temperature 0.8")
        proc, url = start_server(ckpt, tmp / "serve.log", slots=args.slots, max_queue=64, device=args.device)
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]
            rows = bench("llamalit", url, model["id"], levels, args, deadline)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            anchor = "llama_cpp is not installed (pip install 'llama-cpp-python[server]')"
        else:
            anchor = None if args.gguf else "no --gguf given (llamalit-export ckpt=... format=gguf out=FILE.gguf)"
        if anchor is None:
            proc, url = llama_cpp_server(Path(args.gguf), model["max_model_len"], args.slots, tmp / "llama.log")
            try:
                rows += bench("llama.cpp", url, "gguf", levels, args, deadline)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        print_table(rows)
        if anchor:
            print(f"\nllama.cpp anchor not measured: {anchor}")
        ours = {r["clients"]: r for r in rows if r["server"] == "llamalit"}
        if 1 in ours and 8 in ours:
            ratio = ours[8]["tok_s"] / ours[1]["tok_s"]
            ok = ratio >= 4 and ours[8]["errors"] == 0
            print(f"goal (8 clients >= 4x one client, 0 errors): {ratio:.2f}x, {ours[8]['errors']} errors -> "
                  f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
