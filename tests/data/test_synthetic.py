"""The synthetic TinyStories-schema corpus: deterministic, fast, and every story honours its instruction."""

from __future__ import annotations

import random
import re
import time
from collections import Counter

import pytest

from llamalit.data.synthetic import (
    ADJECTIVES,
    FEATURES,
    NOUNS,
    OPENING,
    VERBS,
    feature_present,
    make_corpus,
    make_prompt,
    make_record,
    story_honours_instruction,
)
from llamalit.data.text_formats import read_records, shorten_prompt

FORMATS_EXAMPLE = ('Write a story. In the story, try to use the verb "eat", the noun "clock" and the adjective '
                   '"clever". The story has the following features: the story should contain at least one '
                   'dialogue. Possible story:')


@pytest.fixture(scope="module")
def records():
    rng = random.Random(7)
    return [make_record(rng) for _ in range(3000)]


def test_corpus_is_deterministic_in_the_seed(tmp_path):
    a = make_corpus(tmp_path / "a", 2, 50, seed=1)
    b = make_corpus(tmp_path / "b", 2, 50, seed=1)
    c = make_corpus(tmp_path / "c", 2, 50, seed=2)
    assert [p.name for p in a] == ["data00.json", "data01.json"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes() and a[0].read_bytes() != a[1].read_bytes()
    with pytest.raises(ValueError, match="n_shards >= 1"):
        make_corpus(tmp_path / "d", 0, 5)


def test_tinystories_schema(synthetic_corpus):
    recs = read_records(synthetic_corpus[0])
    assert len(recs) == 120
    for r in recs:
        assert set(r) == {"story", "instruction", "summary", "source"}
        ins = r["instruction"]
        assert set(ins) == {"prompt:", "words", "features"}  # "prompt:" with the colon, like the original
        verb, noun, adjective = ins["words"]
        assert verb in VERBS and noun in NOUNS and adjective in ADJECTIVES
        assert set(ins["features"]) <= set(FEATURES)
        assert r["story"] == r["story"].strip() and 3 <= r["story"].count("\n\n") + 1 <= 5


def test_every_story_honours_its_instruction(records):
    for r in records:
        ins = r["instruction"]
        check = story_honours_instruction(r["story"], ins["words"], ins["features"])
        assert check["ok"] and check["score"] == 1.0, (r["story"], ins)
        for feature in set(FEATURES) - set(ins["features"]):  # and shows no feature it was not asked for
            assert not feature_present(r["story"], feature), (feature, r["story"])
    counts = Counter(f for r in records for f in r["instruction"]["features"])
    assert set(counts) == set(FEATURES) and min(counts.values()) > 100
    assert {w for r in records for w in r["instruction"]["words"]} == set(VERBS + NOUNS + ADJECTIVES)


def test_template_uses_no_list_word_outside_its_slot(records):
    inflected = {}
    for w in VERBS + NOUNS + ADJECTIVES:
        for form in (w, w + "s", w + "ed", w + "ing", w + "d"):
            inflected[form] = w
    for r in records:
        used = {inflected[t] for t in re.findall(r"[a-z]+", r["story"].lower()) if t in inflected}
        assert used == set(r["instruction"]["words"]), r["story"]


def test_checker_rejects_stories_that_miss_the_instruction(records):
    r = next(r for r in records if r["instruction"]["features"])
    verb, noun, adjective = r["instruction"]["words"]
    other_verb = next(v for v in VERBS if v != verb)
    check = story_honours_instruction(r["story"], [other_verb, noun, adjective], r["instruction"]["features"])
    assert not check["ok"] and check["words"] == {other_verb: False, noun: True, adjective: True}
    missing = next(f for f in FEATURES if f not in r["instruction"]["features"])
    check = story_honours_instruction(r["story"], [verb, noun, adjective], [missing])
    assert check["features"] == {missing: False} and check["score"] == 0.75
    assert not feature_present('Tom said hi. In the end, Tom was happy.', "BadEnding")
    assert feature_present('Tom said "hi".', "Dialogue") and not feature_present("Tom said hi.", "Dialogue")
    with pytest.raises(ValueError, match="unknown feature"):
        feature_present("x", "Romance")


def test_prompts_use_the_real_wording_and_shorten_as_documented(records):
    for r in records[:200]:
        prompt = r["instruction"]["prompt:"]
        assert prompt.startswith(OPENING + " ")
        assert prompt.endswith("Remember to only use simple words!\n\nPossible story:")
        short = shorten_prompt(prompt)
        assert short.startswith("Write a story. ") and short.endswith(". Possible story:")
        assert "Remember" not in short and "\n" not in short and "at some point" not in short
        for word in r["instruction"]["words"]:
            assert f'"{word}"' in short
    assert {r["instruction"]["prompt:"].split(". ")[1].split(" the verb")[0] for r in records} == {
        "The story should use", "In the story, try to at some point use"}
    assert shorten_prompt(make_prompt("eat", "clock", "clever", ["Dialogue"], variant=1)) == FORMATS_EXAMPLE


def test_thousands_of_stories_in_seconds(tmp_path):
    t0 = time.perf_counter()
    make_corpus(tmp_path, 2, 2500, seed=0)
    assert time.perf_counter() - t0 < 5.0
