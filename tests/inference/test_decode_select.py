"""Issue 25: the kernel or PyTorch's decode step, chosen by a timed probe cached beside the kernel; the
CUDA-graph decoder captures thread-locally."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from llamalit.inference import decode
from llamalit.inference.decode import StaticDecoder, decode_weights
from llamalit.inference.kernels import build_decode_kernel, load_decode_kernel, select
from llamalit.model.llama import Llama, ModelConfig


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMALIT_KERNEL_DIR", str(tmp_path))
    monkeypatch.delenv("LLAMALIT_DECODE_KERNEL", raising=False)
    monkeypatch.delenv("LLAMALIT_DECODE_PROBE", raising=False)
    load_decode_kernel.cache_clear()
    select.probe_choice.cache_clear()
    yield tmp_path
    load_decode_kernel.cache_clear()
    select.probe_choice.cache_clear()


def _model() -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig.preset("tiny", max_seq_len=32)).eval()


@pytest.mark.parametrize("kernel_wins", [True, False])
def test_the_probe_decides_and_its_choice_is_cached_with_the_kernel(kernel_dir, monkeypatch, kernel_wins):
    if load_decode_kernel() is None:
        pytest.skip("no C++ compiler: the kernel never builds, PyTorch decodes")
    calls = []
    real = select.measure

    def measured(*a, **kw):
        calls.append(1)
        out = real(tokens=4, rounds=1)  # the real probe, short: both paths run on this machine
        assert out["kernel_tok_s"] > 0 and out["torch_tok_s"] > 0
        return {**out, "kernel": kernel_wins}

    monkeypatch.setattr(select, "measure", measured)
    model = _model()
    with torch.inference_mode():  # as generate() asks: the probe builds its own model outside it
        assert (decode_weights(model).kernel is not None) == kernel_wins
    lib = build_decode_kernel()
    saved = json.loads((lib.parent / f"{lib.stem}.choice-t{torch.get_num_threads()}.json").read_text())
    assert saved["kernel"] == kernel_wins and saved["threads"] == torch.get_num_threads()
    select.probe_choice.cache_clear()  # a new process: read back from disk, not measured again
    assert select.use_kernel(None, model) == kernel_wins and len(calls) == 1
    monkeypatch.setenv("LLAMALIT_DECODE_PROBE", "1")  # asked to measure again
    select.probe_choice.cache_clear()
    select.use_kernel(None, model)
    assert len(calls) == 2


def test_the_environment_and_the_argument_override_the_probe(kernel_dir, monkeypatch):
    monkeypatch.setattr(select, "measure", lambda *a, **kw: pytest.fail("the probe ran"))
    model = _model()
    assert select.use_kernel(True, model) is True and select.use_kernel(False, model) is False
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "0")
    assert select.use_kernel(None, model) is False
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "on")
    assert select.use_kernel(None, model) is True
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "auto")
    assert select.use_kernel(None, model.to(torch.bfloat16)) is True  # not fp32: no kernel, no probe
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "fast")
    with pytest.raises(ValueError, match="LLAMALIT_DECODE_KERNEL='fast': use 1"):
        select.use_kernel(None, model)


def test_cuda_graph_capture_is_thread_local(monkeypatch):
    """Loader threads may still run while the sample callback decodes: a global-mode capture fails on their
    CUDA calls. The capture call is checked through stand-ins for torch.cuda's stream and graph objects."""
    captured = {}

    class FakeStream:
        def wait_stream(self, other):
            pass

    @contextmanager
    def fake_graph(graph, **kw):
        captured.update(kw)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextmanager(lambda: (yield))())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    model = _model()
    weights = decode.DecodeWeights(model, kernel=False)
    decoder = StaticDecoder(weights, model.new_caches(1), 1, torch.device("cpu"), graph=False)
    decoder._capture()
    assert captured == {"capture_error_mode": "thread_local"}
    assert decoder.logits is not None and decoder.logits.shape == (1, model.cfg.vocab_size)
