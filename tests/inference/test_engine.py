"""The batching engine gives each request the tokens generate() gives it alone, frees slots, bounds its queue."""

from __future__ import annotations

import threading

import pytest
import torch
from attentive_llamas import attentive_llama

from llamalit.generate import generate
from llamalit.inference.engine import Engine, QueueFull, SamplingParams, tokens
from llamalit.model import Llama, ModelConfig

EOS = 2
SETTINGS = [dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=20, seed=5),
            dict(temperature=1.0, top_p=0.9, seed=7), dict(temperature=0.0), dict(temperature=1.2, seed=11)]
PROMPTS = [[1, 5, 9, 33], [1, 7], [1, 100, 200, 250, 44, 12, 9], [1, 3, 3], [1, 8, 8, 8, 8, 8, 8, 8, 8], [1, 60]]


@pytest.fixture(params=["kernel", "torch"])
def decode_path(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both CPU decode steps, forced as LLAMALIT_DECODE_KERNEL forces them (generate() takes the same one)."""
    if request.param == "kernel":
        request.getfixturevalue("lib")  # skips where the kernel cannot be built
    monkeypatch.setenv("LLAMALIT_DECODE_KERNEL", "1" if request.param == "kernel" else "0")
    return request.param


def test_batched_tokens_equal_generate_alone(decode_path):
    """Six requests of different lengths, settings and budgets through 3 slots: some wait, then join the
    running batch as others finish; each one's tokens are generate()'s for that request alone, on the
    compiled CPU step (each slot at its own cache column) and on the PyTorch one."""
    model = attentive_llama(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=8,
                            max_seq_len=128)
    engine = Engine(model, slots=3, max_queue=8).start()
    assert (engine.weights.kernel is not None) == (decode_path == "kernel")
    try:
        budgets = [30 + 13 * i for i in range(len(PROMPTS))]
        first = [engine.submit(p, SamplingParams(max_tokens=n, **s), EOS)
                 for p, s, n in list(zip(PROMPTS, SETTINGS, budgets))[:4]]
        early = [next(tokens(r)) for r in first[:1]]  # the batch is running when the rest arrive
        late = [engine.submit(p, SamplingParams(max_tokens=n, **s), EOS)
                for p, s, n in list(zip(PROMPTS, SETTINGS, budgets))[4:]]
        outs = [early + list(tokens(first[0]))] + [list(tokens(r)) for r in first[1:] + late]
        assert engine.stats()["steps"] < sum(len(o) for o in outs)  # decode steps were shared
    finally:
        engine.close()
    for prompt, setting, budget, out in zip(PROMPTS, SETTINGS, budgets, outs):
        assert out == generate(model, prompt, budget, eos_id=EOS, **setting), (prompt, setting)
    assert engine.stats()["active"] == 0


def test_queue_bound_raises_queue_full(served_model):
    """Not started: nothing is admitted, so the queue fills: one per slot, then max_queue more, then QueueFull."""
    engine = Engine(served_model[1], slots=2, max_queue=1)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    for _ in range(3):
        engine.submit([1, 5], params, EOS)
    with pytest.raises(QueueFull, match=r"all 2 slots are taken and 1 request\(s\) wait \(max_queue=1\)"):
        engine.submit([1, 5], params, EOS)
    engine.close()


def test_cancel_frees_the_slot_for_the_next_request(served_model):
    engine = Engine(served_model[1], slots=1, max_queue=4).start()
    try:
        seen = threading.Event()
        got: list[int | None] = []

        def sink(item):
            got.append(item)
            seen.set()

        long = engine.submit([1, 5], SamplingParams(max_tokens=400, temperature=0.0), None, sink=sink)
        assert seen.wait(30)
        waiting = engine.submit([1, 7], SamplingParams(max_tokens=5, temperature=0.0), None)
        long.cancel()
        assert len(list(tokens(waiting))) == 5  # it got the only slot
        assert long.finish_reason == "cancelled" and long.n_generated < 400 and got[-1] is None
        assert engine.stats()["finished"] == {"cancelled": 1, "length": 1}
    finally:
        engine.close()


def test_bad_settings_and_long_prompts_are_refused(served_model):
    engine = Engine(served_model[1], slots=1)
    ctx = engine.context
    with pytest.raises(ValueError, match="exceed the model's context"):
        engine.submit([1] * (ctx - 3), SamplingParams(max_tokens=4), EOS)
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1], SamplingParams(max_tokens=4, temperature=-1), EOS)
    engine.close()


def _greedy_holding_eos(model, prompt: list[int], n: int, eos: int, hold: int) -> list[int]:
    """Greedy decoding by full forward passes, EOS masked for the first ``hold`` tokens, ending at EOS."""
    ids = list(prompt)
    with torch.inference_mode():
        for i in range(n):
            logits = model.output(model.hidden(torch.tensor([ids]))[:, -1])[0]
            if i < hold:
                logits[eos] = float("-inf")
            if int(logits.argmax()) == eos:
                break
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_min_tokens_holds_eos_back():
    """EOS set to a token greedy decoding picks at the prefill or at a decode step: without min_tokens a request
    stops there; with it (requests batched, different holds) EOS is passed over until min_tokens tokens, as
    llama.cpp's server does, and each request's tokens are those of greedy decoding with EOS masked that long."""
    torch.manual_seed(0)
    model = Llama(ModelConfig.preset("stories260k", vocab_size=300)).eval()
    with torch.no_grad():  # untied random head: greedy tokens vary (a tied random model repeats its last token)
        model.output.weight = torch.nn.Parameter(torch.randn_like(model.output.weight))
    prompts = PROMPTS[:3]
    free = [generate(model, p, 16, temperature=0.0) for p in prompts]
    at = [0, 3, 6]  # where each request's EOS would come: the prefill, then decode steps
    eos = [f[i] for f, i in zip(free, at)]
    assert all(f.index(e) == i for f, e, i in zip(free, eos, at))
    holds = [5, 8, 16]
    engine = Engine(model, slots=3, max_queue=8).start()
    try:
        plain = [engine.submit(p, SamplingParams(max_tokens=16, temperature=0.0), e) for p, e in zip(prompts, eos)]
        held = [engine.submit(p, SamplingParams(max_tokens=16, temperature=0.0, min_tokens=h), e)
                for p, e, h in zip(prompts, eos, holds)]
        outs = [list(tokens(r)) for r in plain + held]
        with pytest.raises(ValueError, match="min_tokens=5"):
            engine.submit(prompts[0], SamplingParams(max_tokens=4, min_tokens=5), eos[0])
    finally:
        engine.close()
    assert outs[:3] == [f[:i] for f, i in zip(free, at)] and all(r.finish_reason == "stop" for r in plain)
    for p, e, h, out in zip(prompts, eos, holds, outs[3:]):
        assert len(out) >= h and e not in out[:h]
        assert out == _greedy_holding_eos(model, p, 16, e, h)
    assert held[2].finish_reason == "length" and len(outs[5]) == 16


@pytest.mark.gpu
def test_cuda_graph_slots_equal_generate_alone(served_model):
    """On CUDA the whole slot batch is one CUDA graph with a position per row; same tokens as generate()."""
    import copy

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = copy.deepcopy(served_model[1]).cuda()
    engine = Engine(model, slots=4, max_queue=8).start()
    try:
        reqs = [engine.submit(p, SamplingParams(max_tokens=40, **s), EOS) for p, s in zip(PROMPTS, SETTINGS)]
        outs = [list(tokens(r)) for r in reqs]
    finally:
        engine.close()
    assert engine.static is not None and engine.static.graph is not None
    for prompt, setting, out in zip(PROMPTS, SETTINGS, outs):
        assert out == generate(model, prompt, 40, eos_id=EOS, **setting), (prompt, setting)
