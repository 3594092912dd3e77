"""Shared fixtures: a tiny synthetic corpus, a 512-piece tokenizer trained on it, prepared shards, a local HTTP server.

- ``synthetic_corpus``: list of 3 TinyStories-schema JSON shards (data00..data02, 120 stories each).
- ``tiny_tokenizer``: a ``Tokenizer`` (512 pieces, llama2.c settings) trained on that corpus.
- ``prepared_instruct`` / ``prepared_pretrain``: ``manifest.json`` paths of the corpus prepared as
  instruct rows (seq_len 256) / flat pretraining shards with that tokenizer; data00 is validation.
- ``http_server``: a local server with Range support; see :class:`FileServer`.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from llamalit.data.prepare import prepare
from llamalit.data.synthetic import make_corpus
from llamalit.data.text_formats import read_records, shorten_prompt
from llamalit.data.tokenizer import Tokenizer, train_tokenizer

CORPUS_SHARDS, CORPUS_STORIES = 3, 120


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> list[Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"), CORPUS_SHARDS, CORPUS_STORIES, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(synthetic_corpus, tmp_path_factory) -> Tokenizer:
    texts = []
    for f in synthetic_corpus:
        for r in read_records(f):
            texts += [r["story"], shorten_prompt(r["instruction"]["prompt:"])]
    return Tokenizer(train_tokenizer(texts, 512, tmp_path_factory.mktemp("tok") / "tok512.model"))


def _prepared(kind: str, corpus: list[Path], tok: Tokenizer, out: Path) -> Path:
    cfg = {"name": "fixture", "kind": kind, "format": "tinystories", "source": str(corpus[0].parent),
           "tokenizer": str(tok.path), "dir": str(out), "seq_len": 256, "num_workers": 1}
    return prepare(cfg, out.parent / "cache")


@pytest.fixture(scope="session")
def prepared_instruct(synthetic_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    return _prepared("instruct", synthetic_corpus, tiny_tokenizer, tmp_path_factory.mktemp("instruct") / "data")


@pytest.fixture(scope="session")
def prepared_pretrain(synthetic_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    return _prepared("pretrain", synthetic_corpus, tiny_tokenizer, tmp_path_factory.mktemp("pretrain") / "data")


class FileServer:
    """Serves ``files`` (URL path -> bytes) with HTTP Range support.

    ``cut[path] = n`` makes the next full (non-Range) response for ``path`` announce the whole
    length but stop after ``n`` bytes; ``ignore_range`` answers every request with the whole file.
    ``requests`` records (path, Range header) of every request.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if not rng and self.path in server.cut:
                    body = body[:server.cut.pop(self.path)]
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    server = FileServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP threads waiting for a busy core make
    every op many times slower; one thread keeps these runs fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
