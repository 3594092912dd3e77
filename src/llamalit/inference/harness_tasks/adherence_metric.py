"""The metric of the ``instruct_adherence`` harness task: :func:`llamalit.inference.adherence.score_story` per story."""

from __future__ import annotations

import math
from collections.abc import Sequence

from llamalit.inference.adherence import score_story


def process_results(doc: dict, results: Sequence[str]) -> dict:
    """Adherence, word recall and feature rate of one generated story (None: nothing of that kind asked)."""
    score = score_story(results[0].strip(), doc["words"], doc["features"])
    return {key: score[key] for key in ("adherence", "word_recall", "feature_rate")}


def mean_known(items: Sequence[float | None]) -> float:
    """Mean over the stories that had something to check (as :func:`llamalit.inference.adherence.aggregate`)."""
    known = [x for x in items if x is not None]
    return sum(known) / len(known) if known else math.nan
