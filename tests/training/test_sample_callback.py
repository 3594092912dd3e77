"""SampleCallback generates eagerly: sampling during a compiled run never compiles (issue 15).

Generation runs the model in inference mode with a growing KV cache: through compiled blocks each of those
is a new graph (a recompile per cache length), minutes of inductor work on a GPU run's first validation.
The compiles here use dynamo's cheap backends; dynamo's counters show whether anything was traced.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from llamalit.model.llama import Llama, ModelConfig
from llamalit.training.callbacks import SampleCallback
from llamalit.training.module import batch_loss, compile_step, run_compiled_step

pytestmark = pytest.mark.slow


def traced() -> tuple[int, int]:
    """Graphs dynamo has captured, and the operations it traced into them, so far."""
    return counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]


@pytest.mark.parametrize("compiled", ["one_graph", "blocks"])
def test_sampling_after_a_compiled_step_compiles_nothing(compiled: str, tiny_tokenizer) -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Llama(ModelConfig.preset("tiny", vocab_size=tiny_tokenizer.vocab_size, max_seq_len=64)).train()
    tokens = torch.randint(3, tiny_tokenizer.vocab_size, (2, 17))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    if compiled == "one_graph":  # what the module runs with compile on and a traceable loss
        step = compile_step(backend="aot_eager")
        loss = run_compiled_step(step, model, batch, True, "compiled").loss
    else:  # the fallback (compile_blocks) for a loss that cannot be traced, with the cheap backend
        for layer in model.layers:
            layer.compile(backend="eager")
        loss = batch_loss(model, batch, loss_impl="plain").loss
    loss.backward()
    assert traced()[0] > 0  # the training step did go through dynamo

    before = traced()
    cb = SampleCallback(prompts=["Write a story about a cat.", "Once upon a time"], max_new_tokens=12)
    dm = SimpleNamespace(tokenizer_path=str(tiny_tokenizer.path), manifest={"kind": "instruct"})
    trainer = SimpleNamespace(sanity_checking=False, global_rank=0, strategy=object(), datamodule=dm, logger=None,
                              global_step=1, state=SimpleNamespace(fn="fit"))
    cb.on_validation_end(trainer, SimpleNamespace(model=model))
    assert len(cb.last_samples) == 2
    assert traced() == before, "sampling traced new graphs (it must run eagerly)"
    assert model.training  # generation put the model back in training mode
