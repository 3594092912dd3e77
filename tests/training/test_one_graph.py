"""The compiled training step is one graph: embedding, blocks, head and loss, no graph break, same numbers.

On the CPU packed rows take the dense SDPA mask (what ``attention=auto`` resolves to here): flex attention
has no backward on the CPU, so its path is checked under ``explain`` for the forward only; on CUDA the same
step traces the BlockMask build and flex attention into the graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamalit.model.llama import IGNORE_INDEX, Llama, ModelConfig
from llamalit.training.module import LlamaLitModule, batch_loss, compile_step, run_compiled_step

VOCAB = 256


def _batches() -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (2, 16), generator=g)
    y = torch.randint(0, VOCAB, (2, 16), generator=g)
    y[0, :5] = IGNORE_INDEX  # a prompt
    y[1, 12:] = IGNORE_INDEX  # padding
    segments = torch.tensor([[0] * 6 + [1] * 10, [0] * 9 + [1] * 4 + [2] * 3])
    positions = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, -1).clone()
    positions[1] = torch.cat([torch.arange(9), torch.arange(4), torch.arange(3)])
    packed_y = y.clone()
    packed_y[0, 5] = IGNORE_INDEX  # the last position of a document predicts nothing
    return {"padded": {"input_ids": x, "labels": y},
            "packed": {"input_ids": x, "labels": packed_y, "positions": positions, "segments": segments}}


def _module_step(**settings) -> LlamaLitModule:
    """A module with compile on, as ``on_fit_start`` sets it up on this device."""
    module = LlamaLitModule(ModelConfig.preset("tiny", max_seq_len=32), {}, **{"compile": True, **settings})
    module.on_fit_start()
    return module


def test_the_module_compiles_batch_loss_as_one_graph() -> None:
    module = _module_step()
    assert module._train_impl == "compiled"  # what loss_impl=auto resolves to with compile on
    assert module._step._torchdynamo_orig_callable is batch_loss  # the function traced below
    assert module._eval_impl == "chunked"  # validation stays eager on the CPU


def test_a_loss_the_graph_cannot_hold_falls_back_to_compiled_blocks() -> None:
    module = _module_step(loss_impl="chunked")
    assert getattr(module, "_step", None) is None
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in module.model.layers)
    with pytest.raises(ValueError, match="compile_mode='fast'"):
        _module_step(compile_mode="fast")


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("accuracy", [False, True])
def test_training_forward_and_loss_have_no_graph_break(kind: str, accuracy: bool) -> None:
    model = Llama(ModelConfig.preset("tiny", max_seq_len=32))
    batch = {**_batches()[kind], "counted": torch.arange(7)}  # counted is dropped on the compiled path
    explain = torch._dynamo.explain(batch_loss)(model, {k: v for k, v in batch.items() if k != "counted"},
                                                accuracy, "compiled")
    assert explain.graph_break_count == 0, [str(b.reason) for b in explain.break_reasons]
    assert explain.graph_count == 1


def test_flex_path_forward_has_no_graph_break() -> None:
    """The BlockMask build and flex attention trace into the same graph (forward: no flex backward on the CPU)."""
    model = Llama(ModelConfig.preset("tiny", dim=64, max_seq_len=32), attention="flex")  # head_dim 16
    with torch.no_grad():
        explain = torch._dynamo.explain(batch_loss)(model, _batches()["packed"], False, "compiled")
    assert explain.graph_break_count == 0, [str(b.reason) for b in explain.break_reasons]
    assert explain.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind, backend", [("packed", "inductor"), ("padded", "aot_eager")])
def test_compiled_step_matches_the_eager_reference_loss_and_grads(kind: str, backend: str) -> None:
    """The one-graph step == the eager mean over counted positions (inductor on packed rows, the slower
    compile; the padded graph through AOT autograd only, to keep the test short)."""
    torch.manual_seed(0)
    eager = Llama(ModelConfig.preset("tiny", max_seq_len=32))
    compiled = Llama(eager.cfg)
    compiled.load_state_dict(eager.state_dict())
    batch = _batches()[kind]
    kw = {k: batch[k] for k in ("positions", "segments") if k in batch}
    labels = batch["labels"]
    logits = eager.output(eager.hidden(batch["input_ids"], **kw))
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    ref.backward()
    # the padded case also takes the CUDA-graph call path (a new graph step, outputs cloned): grads flow through
    out = run_compiled_step(compile_step(backend=backend), compiled, {**batch, "counted": torch.arange(3)}, True,
                            "compiled", cudagraphs=kind == "padded")
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    counted = labels != IGNORE_INDEX
    assert int(out.correct) == int((logits.argmax(-1) == labels)[counted].sum())
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
