"""Adherence scoring on hand-written TinyStories-like stories."""

from __future__ import annotations

import pytest

from llamalit.inference.adherence import (
    CHECKABLE_FEATURES,
    aggregate,
    check_feature,
    contains_word,
    parse_prompt,
    score_story,
)

HAPPY = ("Once upon a time, a little girl named Lily found a cute kitten in the park. "
         '"Can I keep it?" she asked her mom. Her mom smiled and said, "Yes, you can." '
         "Lily hanged a bell on the kitten's collar. They played all day and were very happy.")
SAD = ("Tom had a red ball. He threw the ball too high and it flew over the wall. "
       "Tom looked for it everywhere, but the ball was gone. Tom cried and went home alone.")
PLAIN = "Ben liked to run. He ran in the sun with his dog. The dog was big and brown."


@pytest.mark.parametrize("requested,text", [
    ("hang", "She hanged the coat."), ("hang", "It hangs there."), ("hang", "Bats were hanging."),
    ("hang", "He hung the picture."), ("hop", "The bunny hopped away."), ("bake", "Mom was baking."),
    ("cry", "The baby cried."), ("happy", "They played happily."), ("big", "It got bigger!"),
    ("mouse", "Two mice ran."), ("leaf", "The leaves fell."), ("go", "They went home."),
    ("knife", "Sharp knives."), ("tie", "He was tying his shoe."), ("gentle", "Pet it gently."),
    ("Cute", "A CUTE dog."), ("ice cream", "They ate ice creams."), ("sun", "The sun's light."),
])
def test_inflected_forms_match(requested, text):
    assert contains_word(text, requested)


@pytest.mark.parametrize("requested,text", [
    ("hang", "The plane was in the hangar."), ("cat", "Catch the ball!"), ("ran", "The rain fell."),
    ("sun", "It was Sunday."), ("ice cream", "The cream was on the ice."), ("go", "A good dog."),
    ("", "anything"),
])
def test_other_words_do_not_match(requested, text):
    assert not contains_word(text, requested)


def test_dialogue_is_quoted_speech():
    assert check_feature(HAPPY, "Dialogue")
    assert check_feature("\u201cHello!\u201d said the frog.", "dialogue")  # curly quotes, any case
    assert not check_feature(SAD, "Dialogue")
    assert not check_feature('He drew a " on the wall.', "Dialogue")  # a lone quote mark is no speech
    assert not check_feature('The sign said "" and nothing else.', "Dialogue")


@pytest.mark.parametrize("feature,yes,no", [
    ("BadEnding", SAD, HAPPY),
    ("BadEnding", "The fox ate the cake. Everyone was sad and the party was ruined.",
     "Sam was sad at first. Then his friend came. They laughed and played until dark."),
    ("MoralValue", "Lily learned that sharing makes everyone happy.", PLAIN),
    ("Twist", "Max opened the box. To his surprise, it was full of frogs!", PLAIN),
    ("Foreshadowing", "Mom warned Sue not to touch the stove. Later, Sue forgot.", PLAIN),
    ("Conflict", '"It is mine!" Tim shouted. Sara was angry and they argued.', PLAIN),
])
def test_feature_heuristics(feature, yes, no):
    assert check_feature(yes, feature) is True
    assert check_feature(no, feature) is False


def test_unknown_feature_is_unchecked():
    assert check_feature(HAPPY, "Rhyme") is None
    assert set(CHECKABLE_FEATURES) == {"Dialogue", "BadEnding", "MoralValue", "Twist", "Foreshadowing", "Conflict"}


def test_score_story_counts_words_and_checkable_features():
    s = score_story(HAPPY, ["hang", "kitten", "gloomy"], ["Dialogue", "BadEnding", "Rhyme"])
    assert s["words_found"] == ["hang", "kitten"] and s["words_missing"] == ["gloomy"]
    assert s["word_recall"] == pytest.approx(2 / 3)
    assert s["features"] == {"Dialogue": True, "BadEnding": False}
    assert s["unchecked_features"] == ["Rhyme"]
    assert s["feature_rate"] == pytest.approx(1 / 2)
    assert s["adherence"] == pytest.approx(3 / 5)
    none = score_story(PLAIN, ["run", "dog"], [])
    assert none["word_recall"] == 1.0 and none["feature_rate"] is None and none["adherence"] == 1.0
    empty = score_story(PLAIN, [], ["Rhyme"])
    assert empty["word_recall"] is None and empty["feature_rate"] is None and empty["adherence"] is None


def test_aggregate_means_skip_missing_values():
    scores = [
        score_story(HAPPY, ["hang", "kitten", "gloomy"], ["Dialogue", "BadEnding"]),  # 2/3, 1/2, 3/5
        score_story(SAD, ["ball", "cry"], ["BadEnding"]),  # 1, 1, 1
        score_story(PLAIN, ["moon"], []),  # 0, None, 0
    ]
    agg = aggregate(scores)
    assert agg["n_stories"] == 3
    assert agg["word_recall"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert agg["feature_rate"] == pytest.approx((1 / 2 + 1) / 2)
    assert agg["adherence"] == pytest.approx((3 / 5 + 1 + 0) / 3)
    assert agg["feature/Dialogue"] == 1.0 and agg["feature/BadEnding"] == pytest.approx(0.5)
    assert "feature/Twist" not in agg
    assert aggregate([])["adherence"] is None


def test_parse_prompt_full_and_short_forms():
    full = ('Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year old '
            'child would understand. The story should use the verb "hang", the noun "foot" and the '
            'adjective "cute". The story has the following features: the story should contain at least '
            "one dialogue, the story has a bad ending. Remember to only use simple words!\n\nPossible story:")
    assert parse_prompt(full) == (["hang", "foot", "cute"], ["Dialogue", "BadEnding"])
    short = ('Write a story. In the story, try to use the verb "eat", the noun "clock" and the adjective '
             '"clever". The story has the following features: something unexpected happens / there is '
             "a plot twist, the narrative uses foreshadowing or setup and payoff. Possible story:")
    assert parse_prompt(short) == (["eat", "clock", "clever"], ["Twist", "Foreshadowing"])
    assert parse_prompt('Write a story. In the story, try to use the verb "run". Possible story:') == (["run"], [])
