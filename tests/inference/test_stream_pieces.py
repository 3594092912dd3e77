"""``_Run.pieces`` sends each token as its own piece when the client keeps up, and a backlog as one piece:
the engine is a stand-in that hands its sink to the test, so no timing decides what the assertions see."""

from __future__ import annotations

import asyncio

from llamalit.inference.engine import SamplingParams
from llamalit.inference.openai_api import Job
from llamalit.inference.server import _Run


class _Request:
    def __init__(self):
        self.finish_reason, self.error, self.n_generated, self.cancelled = None, None, 0, False

    def cancel(self) -> None:
        self.cancelled = True


class _Engine:
    def submit(self, prompt_ids, params, eos_id, sink):
        self.sink, self.req = sink, _Request()
        return self.req


class _Client:
    async def is_disconnected(self) -> bool:
        return False


def test_pieces_as_decoded_and_a_backlog_as_one(served_model):
    tok = served_model[2]
    prompt = tok.encode("once upon a time", bos=True)
    story = tok.encode(" there was a little cat who liked the sun", bos=False)
    assert len(story) >= 5

    async def scenario() -> tuple[list[str], list[str], _Request, str | None]:
        engine = _Engine()
        run = _Run(engine, tok, Job(prompt_ids=prompt, params=SamplingParams(max_tokens=len(story))))
        pieces = run.pieces(_Client())  # type: ignore[arg-type]
        one_by_one = []
        for token in story[:3]:  # the reader waits for each token before the next is decoded
            engine.sink(token)
            one_by_one.append(await asyncio.wait_for(anext(pieces), 10))
        for token in story[3:]:  # the reader fell behind: these wait in its queue
            engine.sink(token)
        engine.req.finish_reason = "length"
        engine.sink(None)
        await asyncio.sleep(0)  # let call_soon_threadsafe deliver all of them
        rest = [p async for p in pieces]
        return one_by_one, rest, engine.req, run.finish

    one_by_one, rest, req, finish = asyncio.run(scenario())
    assert len(one_by_one) == 3 and all(one_by_one)
    assert len(rest) == 1  # the backlog, then the end, in one piece
    assert "".join(one_by_one + rest) == tok.decode(prompt + story)[len(tok.decode(prompt)):]
    assert finish == "length" and req.cancelled
