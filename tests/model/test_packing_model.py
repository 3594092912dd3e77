"""Packed rows: with per-document RoPE positions and a document mask, no example sees another."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamalit.model.llama import IGNORE_INDEX, Llama, ModelConfig, document_mask


def _pack(examples: list[torch.Tensor], length: int, pad_id: int = 0):
    """Concatenate examples into one row of ``length``; the tail is a padding segment of its own."""
    tokens, positions, segments = [], [], []
    for i, ex in enumerate(examples):
        tokens.append(ex)
        positions.append(torch.arange(len(ex)))
        segments.append(torch.full((len(ex),), i))
    tail = length - sum(len(e) for e in examples)
    tokens.append(torch.full((tail,), pad_id))
    positions.append(torch.arange(tail))
    segments.append(torch.full((tail,), len(examples)))
    return tuple(torch.cat(x)[None] for x in (tokens, positions, segments))


@pytest.fixture
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig.preset("tiny", max_seq_len=32)).double().eval()  # GQA: 4 heads, 2 kv heads


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_packed_row_equals_examples_run_alone(model: Llama, backend: str) -> None:
    torch.manual_seed(1)
    examples = [torch.randint(1, 256, (n,)) for n in (5, 9, 3)]
    tokens, positions, segments = _pack(examples, 20)
    model.attention_backend = backend
    with torch.no_grad():  # flex attention has no backward on the CPU (forward parity is what counts here)
        packed = model.hidden(tokens, positions=positions, segments=segments)[0]
    start = 0
    for ex in examples:
        alone = model.hidden(ex[None])[0]
        torch.testing.assert_close(packed[start:start + len(ex)], alone, rtol=0, atol=1e-12)
        start += len(ex)


def test_packed_loss_is_the_token_weighted_mean_of_the_examples(model: Llama) -> None:
    torch.manual_seed(2)
    examples = [torch.randint(1, 256, (n,)) for n in (6, 4, 8)]
    labels_alone = [torch.cat([torch.full((2,), IGNORE_INDEX), torch.randint(0, 256, (n - 2,))]) for n in (6, 4, 8)]
    tokens, positions, segments = _pack(examples, 21)
    labels = torch.cat([*labels_alone, torch.full((3,), IGNORE_INDEX)])[None]
    packed_loss = model.loss(tokens, labels, positions=positions, segments=segments)
    sums = [F.cross_entropy(model(ex[None])[0], lab, reduction="sum") for ex, lab in zip(examples, labels_alone)]
    counted = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels_alone)
    torch.testing.assert_close(packed_loss, sum(sums) / counted, rtol=1e-12, atol=0)


def test_without_the_mask_examples_would_leak(model: Llama) -> None:
    """The check above can fail: attending across documents changes the later example's states."""
    examples = [torch.randint(1, 256, (n,)) for n in (5, 6)]
    tokens, positions, _ = _pack(examples, 11)
    leaky = model.hidden(tokens, positions=positions)[0, 5:]
    alone = model.hidden(examples[1][None])[0]
    assert (leaky - alone).abs().max() > 1e-3


def test_document_mask_dense_layout() -> None:
    mask = document_mask(torch.tensor([[0, 0, 1, 1, 1]]), backend="dense")
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
                            dtype=torch.bool)
    assert mask.shape == (1, 1, 5, 5) and torch.equal(mask[0, 0], expected)
    with pytest.raises(ValueError, match="backend"):
        document_mask(torch.zeros(1, 3, dtype=torch.long), backend="sparse")
    with pytest.raises(ValueError, match="attention=dense"):  # not a NotImplementedError deep in backward
        document_mask(torch.zeros(1, 3, dtype=torch.long), backend="flex")


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_in_the_model_matches_plain_grads_everywhere(tie: bool) -> None:
    """Through the whole model (tied embedding included), packed rows and masked labels: chunked == plain."""
    torch.manual_seed(3)
    model = Llama(ModelConfig.preset("tiny", max_seq_len=32, tie_embeddings=tie)).double()
    tokens, positions, segments = _pack([torch.randint(1, 256, (n,)) for n in (7, 11)], 24)
    labels = torch.randint(0, 256, (1, 24))
    labels[0, :3] = labels[0, 18:] = IGNORE_INDEX
    grads = {}
    for impl in ("plain", "chunked"):
        model.zero_grad()
        out = model.loss_and_correct(tokens, labels, accuracy=True, loss_impl=impl, positions=positions,
                                     segments=segments)
        out.loss.backward()
        grads[impl] = (out.loss.detach(), out.correct, {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp, cp, gp), (lc, cc, gc) = grads["plain"], grads["chunked"]
    torch.testing.assert_close(lc, lp, rtol=1e-12, atol=0)
    assert int(cc) == int(cp)
    for name in gp:
        torch.testing.assert_close(gc[name], gp[name], rtol=1e-10, atol=1e-14, msg=name)


def test_host_counted_positions_give_the_same_loss_without_a_device_count(model: Llama) -> None:
    """``counted`` made on the host before the batch moves (what the module adds) == the on-device mask path."""
    from llamalit.training.module import add_counted_positions, batch_loss

    torch.manual_seed(4)
    batch = {"input_ids": torch.randint(0, 256, (3, 12)), "labels": torch.randint(0, 256, (3, 12))}
    batch["labels"][0, :5] = batch["labels"][2, 7:] = IGNORE_INDEX
    plain = batch_loss(model, batch, accuracy=True)
    with_index = add_counted_positions(dict(batch), pin=False)
    assert torch.equal(with_index["counted"], (batch["labels"].flatten() != IGNORE_INDEX).nonzero()[:, 0])
    out = batch_loss(model, with_index, accuracy=True)
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)
    assert int(out.correct) == int(plain.correct)


def test_auto_picks_flex_only_where_its_kernel_runs() -> None:
    """flex attention's CUDA kernel needs head_dim >= 16: narrower heads (stories260K, tiny) use the dense mask."""
    from llamalit.training.module import build_model

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    wide, narrow = Llama(ModelConfig.preset("tiny", dim=64)), Llama(ModelConfig.preset("tiny"))  # head_dim 16, 8
    assert (wide.mask_backend(cuda), wide.mask_backend(cpu)) == ("flex", "dense")
    assert narrow.mask_backend(cuda) == "dense"
    narrow.attention_backend = "dense"
    assert wide.mask_backend(cuda) == "flex" and narrow.mask_backend(cuda) == "dense"
    with pytest.raises(ValueError, match="head_dim 8"):
        build_model(ModelConfig.preset("tiny"), attention="flex")
    assert build_model(ModelConfig.preset("tiny", dim=64), attention="flex").attention_backend == "flex"


def test_attention_backend_is_a_constructor_argument() -> None:
    wide, narrow = ModelConfig.preset("tiny", dim=64), ModelConfig.preset("tiny")  # head_dim 16, 8
    cpu = torch.device("cpu")
    assert Llama(wide).attention_backend == "auto" and Llama(wide).mask_backend(cpu) == "dense"
    assert Llama(wide, attention="flex").mask_backend(cpu) == "flex"
    assert Llama(narrow, attention="dense").mask_backend(torch.device("cuda")) == "dense"
    with pytest.raises(ValueError, match="head_dim 8"):
        Llama(narrow, attention="flex")
    with pytest.raises(ValueError, match="attention='sparse'"):
        Llama(wide, attention="sparse")


@pytest.mark.slow
@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 8),
                    reason="torch 2.7's inductor writes C++ that does not compile for flex attention on the CPU "
                           "(bash .ci/min-versions); the CUDA path it stands in for uses Triton")
def test_compiled_blocks_run_flex_without_recompiling_per_batch() -> None:
    """Every packed batch brings a new BlockMask (a new mask_mod closure): the compiled blocks must not
    recompile for it. Forward only (flex attention has no backward on the CPU); on CUDA the same graph trains."""
    from torch._dynamo.utils import counters

    from llamalit.training.module import compile_blocks

    torch.manual_seed(5)
    eager = Llama(ModelConfig.preset("tiny", max_seq_len=48)).eval()
    compiled = Llama(eager.cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    compiled.attention_backend = "flex"
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for cuts in ((10, 30), (17, 40), (25, 31), (5, 6)):
            examples = [torch.randint(1, 256, (n,)) for n in (cuts[0], cuts[1] - cuts[0])]
            tokens, positions, segments = _pack(examples, 48)
            tokens, positions, segments = (x.repeat(2, 1) for x in (tokens, positions, segments))
            expected = eager.hidden(tokens, positions=positions, segments=segments)  # dense mask, eager
            got = compiled.hidden(tokens, positions=positions, segments=segments)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert counters["frames"]["ok"] == 1 and not counters["recompiles"], dict(counters["recompiles"])


def test_compiled_block_mask_builder_matches_eager() -> None:
    """On CUDA the packed batches' BlockMask is built by the compiled builder: the same blocks as eager."""
    from llamalit.model.masks import _block_mask_builder

    g = torch.Generator().manual_seed(6)
    for cuts in (torch.randint(20, 300, (4,), generator=g), torch.randint(5, 60, (4,), generator=g)):
        segments = (torch.arange(349)[None] >= cuts[:, None]).long()
        eager, compiled = (_block_mask_builder(c)(segments) for c in (False, True))
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks"):
            assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
        q, kv = torch.arange(349)[:, None], torch.arange(349)[None]
        assert torch.equal(compiled.mask_mod(torch.tensor(1), 0, q, kv), (segments[1][q] == segments[1][kv]) & (q >= kv))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention trains on CUDA only")
@pytest.mark.parametrize("compiled", [False, True, "step"])
def test_flex_training_on_cuda_matches_the_dense_mask(compiled: bool | str) -> None:
    """The packed training path on a GPU: flex attention (block mask) gives the dense-mask loss and gradients,
    eager, with compiled blocks, and inside the one-graph compiled step (BlockMask built in the graph)."""
    from llamalit.training.module import compile_blocks, compile_step, run_compiled_step

    torch.manual_seed(7)
    cfg = ModelConfig.preset("tiny", dim=64, max_seq_len=160)  # head_dim 16: flex's kernel minimum
    models = {b: Llama(cfg).cuda() for b in ("dense", "flex")}
    models["flex"].load_state_dict(models["dense"].state_dict())
    rows = [_pack([torch.randint(1, 256, (n,)) for n in lengths], 150) for lengths in ((40, 70, 20), (90, 33))]
    tokens, positions, segments = (torch.cat(x).cuda() for x in zip(*rows))
    labels = torch.where(segments < segments.amax(1, keepdim=True), tokens.roll(-1, 1), IGNORE_INDEX)
    grads = {}
    for backend, model in models.items():
        model.attention_backend = backend
        if compiled == "step":
            batch = {"input_ids": tokens, "labels": labels, "positions": positions, "segments": segments}
            loss = run_compiled_step(compile_step(), model, batch, False, "compiled").loss
        else:
            if compiled:
                compile_blocks(model)
            loss = model.loss(tokens, labels, positions=positions, segments=segments)
        loss.backward()
        grads[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["flex"][0], grads["dense"][0], rtol=1e-4, atol=1e-4)
    for name, g in grads["dense"][1].items():
        torch.testing.assert_close(grads["flex"][1][name], g, rtol=1e-3, atol=1e-4, msg=name)
