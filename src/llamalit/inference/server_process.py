"""A ``llamalit-serve`` in a child process on 127.0.0.1, for the tests and ``scripts/bench_serve.py``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT_S = 90


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, log: Path, timeout_s: float = START_TIMEOUT_S,
                 **overrides) -> tuple[subprocess.Popen, str]:
    """``llamalit-serve ckpt=...`` on a free port of 127.0.0.1, its output in ``log``; returns (process, base
    URL) once ``/health`` answers. Raises RuntimeError with the log when it exits or does not answer in time."""
    port = free_port()
    args = [f"ckpt={ckpt}", f"port={port}", "device=cpu", *(f"{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llamalit.cli.serve", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env)
    return proc, wait_ready(proc, f"http://127.0.0.1:{port}", "/health", log, timeout_s, "llamalit-serve")


def wait_ready(proc: subprocess.Popen, url: str, route: str, log: Path, timeout_s: float, name: str) -> str:
    """``url`` once ``route`` answers 200; RuntimeError with the end of ``log`` when ``proc`` exits or the time
    runs out (the process is then killed)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}{route}", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not answer {route} within {timeout_s} s:\n{log.read_text()[-4000:]}")
