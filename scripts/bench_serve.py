"""Throughput of ``llamalit-serve`` under N concurrent streaming clients, with llama.cpp's server as the anchor.

    python scripts/bench_serve.py [--ckpt RUN_DIR | --random-shape stories15m] [--clients 1,4,8,16]
                                  [--requests 4] [--max-tokens 128] [--temperature 0] [--gguf auto|none|FILE]
                                  [--gguf-dtypes f32,q8_0] [--threads T] [--budget-s 900]

Starts ``llamalit-serve`` on 127.0.0.1 (a free port) and, when ``llama_cpp.server`` is importable
(``pip install 'llama-cpp-python[server]'``), llama.cpp's own OpenAI server (``python -m llama_cpp.server``) on
the GGUF export of the same checkpoint (``llamalit-export format=gguf``, f32 by default; ``--gguf-dtypes
f32,q8_0`` adds a q8_0 one; ``--gguf FILE`` uses a GGUF you made). For each N both servers, in turn, get N
clients, each sending M streamed ``/v1/completions`` requests one after another; the same prompts, the same
body (``max_tokens``, ``min_tokens = max_tokens`` so EOS never ends a request early, temperature, no top-k /
top-p / min-p / repeat penalty). Prints aggregate completion tokens/s, p50/p95 time to first token and errors
per server, the llamalit / llama.cpp ratios, and (greedy) whether both servers wrote the same text.
Without ``--ckpt``: the demo model in the cache (``experiment=demo``), else a random stories260K-shaped model.
Everything is bounded: requests per client, ``--max-tokens``, a per-request timeout, start and export timeouts,
and ``--budget-s``; every server started here is stopped however the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llamalit.inference.server_process import free_port, start_server, wait_ready

PROMPTS = ["Once upon a time", "The little dog", "One day, a girl named Lily", "Tom and his mom went to the park",
           "There was a big tree", "A cat sat on the mat", "The sun was hot and", "Ben had a red ball"]
START_TIMEOUT_S = 120
EXPORT_TIMEOUT_S = 300


@dataclass
class Server:
    """A running OpenAI server: its name in the tables, base URL, model id, process and the texts it wrote."""

    name: str
    url: str
    model: str
    proc: subprocess.Popen
    texts: dict[str, str] = field(default_factory=dict)


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


def request_body(model: str, prompt: str, args: argparse.Namespace, seed: int) -> dict:
    """The body both servers get: llama.cpp's sampling extras set to 'off' so it samples as llamalit does."""
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["min_tokens"] = args.max_tokens
    return body


async def one_request(client: httpx.AsyncClient, server: Server, body: dict,
                      timeout: float) -> tuple[int, float, str]:
    """(completion tokens, seconds to the first token, text) of one streamed request; raises on any error.
    Tokens: the server's ``usage``, else ``max_tokens`` when it finished for ``length``, else the text chunks."""
    start, first, chunks, used, finish, text = time.perf_counter(), None, 0, None, None, []
    async with client.stream("POST", f"{server.url}/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                used = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                finish = choice.get("finish_reason") or finish
                if choice.get("text"):
                    chunks += 1
                    text.append(choice["text"])
                    first = first if first is not None else time.perf_counter() - start
    if first is None:
        raise RuntimeError("no text came back")
    tokens = used if used is not None else body["max_tokens"] if finish == "length" else chunks
    return tokens, first, "".join(text)


async def run_level(server: Server, clients: int, requests: int, args: argparse.Namespace) -> dict:
    ttfts, errors, tokens = [], [], 0

    async def worker(c: int, client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in range(requests):
            prompt = PROMPTS[(c + i) % len(PROMPTS)]
            try:
                n, first, text = await one_request(client, server, request_body(server.model, prompt, args,
                                                                                1000 * c + i),
                                                   args.request_timeout)
                tokens += n
                ttfts.append(first)
                server.texts.setdefault(prompt, text)
            except Exception as e:  # noqa: BLE001 -- every failure counts as an error of the run
                errors.append(f"{type(e).__name__}: {e}")

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(c, client) for c in range(clients)))
        wall = time.perf_counter() - start
    ttfts.sort()
    p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] * 1e3 if ttfts else float("nan")
    return {"server": server.name, "clients": clients, "requests": clients * requests, "tokens": tokens,
            "wall_s": wall, "tok_s": tokens / wall, "ttft_p50_ms": statistics.median(ttfts) * 1e3 if ttfts
            else float("nan"), "ttft_p95_ms": p95, "errors": len(errors), "first_error": errors[0] if errors else ""}


def bench(servers: list[Server], levels: list[int], args: argparse.Namespace, deadline: float) -> list[dict]:
    """Each level on every server in turn (the order alternates per level, so load drift hits both)."""
    rows = []
    for k, n in enumerate(levels):
        if time.monotonic() > deadline:
            print(f"--budget-s spent: {n} clients and more not measured")
            break
        for server in servers if k % 2 == 0 else servers[::-1]:
            asyncio.run(run_level(server, 1, 1, argparse.Namespace(**{**vars(args), "max_tokens": 8})))  # warm-up
            rows.append(asyncio.run(run_level(server, n, args.requests, args)))
            print(f"  {server.name}: {n} clients done ({rows[-1]['tok_s']:.0f} tok/s)", flush=True)
    return rows


def print_tables(rows: list[dict], names: list[str]) -> None:
    for name in names:
        print(f"\n{name}:\n\n| clients | requests | tokens | wall s | tokens/s | x one client | TTFT p50 ms | "
              "TTFT p95 ms | errors |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        mine = [r for r in rows if r["server"] == name]
        one = next((r["tok_s"] for r in mine if r["clients"] == 1), None)
        for r in mine:
            ratio = f"{r['tok_s'] / one:.2f}" if one else "-"
            print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.0f} | "
                  f"{ratio} | {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['errors']} |")
        for r in mine:
            if r["errors"]:
                print(f"{name} {r['clients']} clients, first error: {r['first_error']}")
    at = {(r["server"], r["clients"]): r for r in rows}
    levels = sorted({r["clients"] for r in rows})
    for anchor in names[1:]:
        print(f"\nllamalit / {anchor} (> 1: llamalit better):\n\n| | "
              + " | ".join(f"{n} clients" for n in levels) + " |\n| --- |" + " ---: |" * len(levels))
        for label, key, invert in (("tokens/s", "tok_s", False), ("TTFT p50 (inverse)", "ttft_p50_ms", True)):
            cells = []
            for n in levels:
                a, b = at.get((names[0], n)), at.get((anchor, n))
                cells.append(f"{(b[key] / a[key] if invert else a[key] / b[key]):.2f}x" if a and b else "-")
            print(f"| {label} | " + " | ".join(cells) + " |")
        for n in levels:
            a, b = at.get((names[0], n)), at.get((anchor, n))
            if a and b and a["tokens"] != b["tokens"]:
                print(f"note: {n} clients: llamalit returned {a['tokens']} tokens, {anchor} {b['tokens']}")


def stop(proc: subprocess.Popen) -> None:
    """End a server this script started: SIGTERM, then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def export_gguf(ckpt: Path, dtype: str, out: Path) -> Path:
    """``llamalit-export ckpt=... format=gguf dtype=...`` as a user runs it; RuntimeError with its output."""
    cmd = [sys.executable, "-m", "llamalit.cli.export", f"ckpt={ckpt}", "format=gguf", f"dtype={dtype}",
           f"out={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"llamalit-export format=gguf dtype={dtype} failed:\n{done.stdout}{done.stderr}")
    return out


def llama_cpp_server(gguf: Path, ctx: int, threads: int, log: Path, stack: contextlib.ExitStack,
                     extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """``python -m llama_cpp.server`` on 127.0.0.1: one context of the model's length (it decodes one request at
    a time), requests queued rather than interrupted, ``threads`` threads; returns once ``/v1/models`` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
           str(port), "--n_ctx", str(ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--interrupt_requests", "False", "--model_alias", "gguf", "--verbose", "False", *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    stack.callback(stop, proc)
    return proc, wait_ready(proc, f"http://127.0.0.1:{port}", "/v1/models", log, START_TIMEOUT_S, "llama_cpp.server")


def anchors(args: argparse.Namespace, ckpt: Path, ctx: int, tmp: Path, stack: contextlib.ExitStack) -> tuple[
        list[Server], str | None]:
    """llama.cpp servers on the GGUF(s) of ``ckpt``, or none and the reason."""
    if args.gguf == "none":
        return [], "--gguf none"
    try:
        import llama_cpp.server.app  # noqa: F401 -- the server's own imports (fastapi, sse_starlette, ...)
    except ImportError as e:
        return [], f"llama_cpp.server is not importable ({e}); pip install 'llama-cpp-python[server]'"
    if args.gguf == "auto":
        files = []
        for dtype in args.gguf_dtypes.split(","):
            t0 = time.perf_counter()
            files.append((f"llama.cpp {dtype}", export_gguf(ckpt, dtype, tmp / f"model-{dtype}.gguf")))
            print(f"exported {files[-1][1].name} ({files[-1][1].stat().st_size / 2**20:.1f} MiB, "
                  f"{time.perf_counter() - t0:.1f} s)", flush=True)
    else:
        files = [(f"llama.cpp {Path(args.gguf).name}", Path(args.gguf))]
    servers = []
    for name, path in files:
        proc, url = llama_cpp_server(path, ctx, args.threads, tmp / f"{path.stem}.log", stack,
                                     args.llama_cpp_args.split())
        servers.append(Server(name, url, "gguf", proc))
    return servers, None


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="checkpoint to serve (default: the demo model, else a random stories260K)")
    ap.add_argument("--random-shape", help="serve a random model of this preset's shape (stories260k, stories15m)")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (both servers' texts compared)")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="send min_tokens=max_tokens, so every request decodes exactly max_tokens tokens")
    ap.add_argument("--slots", type=int, default=16, help="llamalit-serve slots=")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="CPU threads of each server (OMP_NUM_THREADS for llamalit, --n_threads for llama.cpp)")
    ap.add_argument("--gguf", default="auto", help="auto: export the checkpoint; none: no anchor; or a .gguf")
    ap.add_argument("--gguf-dtypes", default="f32", help="with --gguf auto: f32, f16, bf16, q8_0 (comma list)")
    ap.add_argument("--llama-cpp-args", default="--logits_all False",
                    help="more llama_cpp.server options (default: no logits kept for prompt tokens, its faster mode)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--budget-s", type=float, default=900.0, help="stop starting new levels after this")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    if args.gguf not in ("auto", "none") and not Path(args.gguf).is_file():
        sys.exit(f"error: --gguf {args.gguf}: no such file; give a .gguf, 'auto' (export the checkpoint) or 'none'")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("error: terminated (servers stopped)"))
    deadline = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        ckpt, what = (Path(args.ckpt), f"--ckpt {args.ckpt}") if args.ckpt else default_model(tmp, args.random_shape)
        load = os.getloadavg()
        print(f"model: {what}\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / "
              f"{load[2]:.1f} (1/5/15 min; shared: figures are noisy); {args.threads} threads per server\n"
              f"llama_cpp.server {args.llama_cpp_args} --interrupt_requests False --n_threads {args.threads}\n"
              f"{args.requests} requests x {args.max_tokens} tokens per client"
              f"{' (min_tokens = max_tokens)' if args.ignore_eos else ''}, temperature {args.temperature:g}",
              flush=True)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        proc, url = start_server(ckpt, tmp / "serve.log", slots=args.slots, max_queue=64, device=args.device)
        stack.callback(stop, proc)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]
        servers = [Server("llamalit", url, model["id"], proc)]
        more, why_not = anchors(args, ckpt, model["max_model_len"], tmp, stack)
        servers += more
        rows = bench(servers, levels, args, deadline)
        load = os.getloadavg()
        print(f"load average after: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
        print_tables(rows, [s.name for s in servers])
        if why_not:
            print(f"\nllama.cpp anchor not measured: {why_not}")
        if args.temperature == 0:
            for s in servers[1:]:
                same = sum(s.texts.get(p) == t for p, t in servers[0].texts.items())
                print(f"greedy texts: {s.name} wrote llamalit's text for {same} of {len(servers[0].texts)} prompts")
        ours = {r["clients"]: r for r in rows if r["server"] == "llamalit"}
        if 1 in ours and 8 in ours:
            ratio = ours[8]["tok_s"] / ours[1]["tok_s"]
            ok = ratio >= 4 and ours[8]["errors"] == 0
            print(f"goal (8 clients >= 4x one client, 0 errors): {ratio:.2f}x, {ours[8]['errors']} errors -> "
                  f"{'met' if ok else 'NOT met'}")
        for s in servers[1:]:
            theirs = next((r for r in rows if r["server"] == s.name and r["clients"] == 8), None)
            if 8 in ours and theirs:
                print(f"8 clients: llamalit {ours[8]['tok_s']:.0f} tok/s vs {s.name} {theirs['tok_s']:.0f} tok/s -> "
                      f"{ours[8]['tok_s'] / theirs['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
