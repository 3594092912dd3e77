"""A tiny stories260K-shaped model saved as a run directory with its tokenizer, and a live ``serve.py`` on it.

- ``served_model``: (run dir, Llama, Tokenizer); the embedding is scaled so greedy decoding is not decided
  by float noise.
- ``lib``: the C++ decode kernel library, or a skip where it cannot be built.
- ``live_server``: a factory; ``live_server(slots=..., max_queue=..., api_key=...)`` starts
  ``python serve.py ckpt=<run dir>`` on 127.0.0.1 (a free port) and returns its base URL; stopped at the end.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
import torch

from llamalit.checkpoints import save_model
from llamalit.data.tokenizer import Tokenizer, train_tokenizer
from llamalit.inference.kernels import load_decode_kernel
from llamalit.inference.server_process import start_server
from llamalit.model import Llama, ModelConfig

VOCAB = 300


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> tuple[Path, Llama, Tokenizer]:
    rng = random.Random(0)
    words = ("once upon a time there was a little cat who liked to play in the sun with her red ball one day "
             "the dog came and they ran to the big tree happy friend mom park").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(400)]
    root = tmp_path_factory.mktemp("served")
    tok_path = train_tokenizer(lines, VOCAB, root / "tok.model", num_threads=1)
    torch.manual_seed(0)
    model = Llama(ModelConfig.preset("stories260k", vocab_size=VOCAB)).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(20)
    save_model(model, root / "tiny260k", extra={"tokenizer": str(tok_path)})
    return root / "tiny260k", model, Tokenizer(tok_path)


@pytest.fixture(scope="module")
def live_server(served_model, tmp_path_factory):
    procs = []

    def start(**overrides) -> str:
        log = tmp_path_factory.mktemp("server") / "server.log"
        proc, url = start_server(served_model[0], log, **overrides)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def lib():
    """The C++ decode kernel's library (skips where it cannot be built)."""
    found = load_decode_kernel()
    if found is None:
        pytest.skip("the decode kernel cannot be built here (no C++ compiler?)")
    return found
