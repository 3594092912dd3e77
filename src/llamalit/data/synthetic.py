"""An offline TinyStories-schema corpus from a small story grammar, and a checker for its instructions.

Each story uses its requested verb, noun and adjective, and shows each requested feature through
fixed cue phrases, so :func:`story_honours_instruction` can check any text (a generated one too).
The template text never uses a word from the three word lists outside its slot.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

from llamalit.utils.fileio import atomic_write_text

VERBS = ("run", "jump", "play", "swim", "dance", "sing", "climb", "hide", "share", "help",
         "draw", "paint", "build", "read", "fly", "kick", "throw", "catch", "dig", "bake")
NOUNS = ("ball", "tree", "kite", "box", "cake", "hat", "boat", "flower", "book", "car",
         "bird", "cat", "dog", "toy", "cup", "drum", "shell", "rock", "bike", "sock")
ADJECTIVES = ("big", "little", "red", "blue", "shiny", "soft", "funny", "tall", "green", "pretty",
              "brave", "gentle", "fast", "tiny", "yellow", "warm", "fluffy", "bright", "quiet", "silly")
FEATURES = ("Dialogue", "BadEnding", "MoralValue", "Twist", "Foreshadowing", "Conflict")
FEATURE_TEXT = {  # the wording of the real TinyStories prompts
    "Dialogue": "the story should contain at least one dialogue",
    "BadEnding": "the story has a bad ending",
    "MoralValue": "the story has a moral value",
    "Twist": "something unexpected happens / there is a plot twist",
    "Foreshadowing": "the narrative uses foreshadowing or setup and payoff",
    "Conflict": "the story has some sort of conflict",
}
OPENING = ("Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year old "
           "child would understand.")

GIRLS = ("Lily", "Mia", "Anna", "Lucy", "Sue", "Zoe")
BOYS = ("Tom", "Ben", "Max", "Tim", "Sam", "Jack")
PLACES = ("garden", "yard", "street", "forest", "beach", "house")
SETUPS = ("rope", "lamp", "whistle", "map", "stick")  # foreshadowing: found early, saves the day later
TWISTS = ("a frog came out and said hello", "the sun went away and it began to snow",
          "a mouse came and took it away", "it turned into gold")
MORALS = ("it is good to be kind to friends", "sharing makes everyone glad",
          "it is good to listen to mom", "it is good to say sorry")

# Cue phrases that show a feature (the checker's evidence); a story without the feature has none.
_CUES = {
    "MoralValue": re.compile(r"\blearned that\b", re.I),
    "Twist": re.compile(r"\bsomething unexpected happened\b", re.I),
    "Foreshadowing": re.compile(r"\bwould be important later\b.*\bgood thing\b", re.I | re.S),
    "Conflict": re.compile(r"\b(argued|both wanted)\b", re.I),
    "Dialogue": re.compile(r'"[^"\n]+"'),
}
_SAD = re.compile(r"\b(sad|cried)\b", re.I)
_HAPPY = re.compile(r"\bhappy\b", re.I)


def make_prompt(verb: str, noun: str, adjective: str, features: Iterable[str], variant: int = 0) -> str:
    """A prompt in the wording of the real TinyStories instructions (two variants, like the originals)."""
    use = "The story should use" if variant == 0 else "In the story, try to at some point use"
    text = f'{OPENING} {use} the verb "{verb}", the noun "{noun}" and the adjective "{adjective}".'
    features = list(features)
    if features:
        text += " The story has the following features: " + ", ".join(FEATURE_TEXT[f] for f in features) + "."
    return text + " Remember to only use simple words!\n\nPossible story:"


def make_story(rng: random.Random, verb: str, noun: str, adjective: str, features: Iterable[str]) -> str:
    """A story of 3-4 paragraphs that uses the three words and shows each of ``features``."""
    f = set(features)
    girl = rng.random() < 0.5
    hero = rng.choice(GIRLS if girl else BOYS)
    friend = rng.choice(BOYS if girl else GIRLS)
    he, his = ("she", "her") if girl else ("he", "his")
    He = he.capitalize()
    place = rng.choice(PLACES)
    setup = rng.choice(SETUPS)

    intro = [f"Once upon a time, there was a {'girl' if girl else 'boy'} named {hero}.",
             f"{He} had a {adjective} {noun}." if rng.random() < 0.5
             else f"{hero} loved {his} {adjective} {noun} very much."]
    if "Foreshadowing" in f:
        intro.append(f"{He} found an old {setup} that would be important later.")

    middle = [f"{hero} liked to {verb} with {his} friend {friend} in the {place}."]
    if "Dialogue" in f:
        middle.append(f'{friend} said, "Can I {verb} with your {noun} too?"')
        middle.append(f'{hero} said, "No, it is mine!"' if "Conflict" in f else f'{hero} said, "Yes, let us {verb} together!"')
    if "Conflict" in f:
        middle.append(f"They both wanted the {noun}, so they argued and pulled.")
    if "Twist" in f:
        middle.append(f"Then something unexpected happened: {rng.choice(TWISTS)}!")

    end = []
    if "Foreshadowing" in f:
        end.append(f"Good thing {he} had the {setup} to get the {noun} back.")
    if "BadEnding" in f:
        end.append(rng.choice((f"In the end, the {noun} was gone, and {hero} was very sad.",
                               f"But the {noun} broke, and {hero} cried all day.")))
    else:
        end.append(rng.choice((f"In the end, {hero} and {friend} were happy.",
                               f"{hero} smiled, and {friend} was happy too.")))
    if "MoralValue" in f:
        end.append(f"{hero} learned that {rng.choice(MORALS)}.")
    return "\n\n".join(" ".join(p) for p in (intro, middle, end))


def make_record(rng: random.Random) -> dict:
    """One TinyStories-schema record (story, instruction, summary, source)."""
    verb, noun, adjective = rng.choice(VERBS), rng.choice(NOUNS), rng.choice(ADJECTIVES)
    features = sorted(rng.sample(FEATURES, rng.choice((0, 1, 1, 2, 2))), key=FEATURES.index)
    story = make_story(rng, verb, noun, adjective, features)
    return {
        "story": story,
        "instruction": {"prompt:": make_prompt(verb, noun, adjective, features, variant=rng.randrange(2)),
                        "words": [verb, noun, adjective], "features": features},
        "summary": f"A child likes to {verb} with a {adjective} {noun}.",
        "source": "synthetic",
    }


def make_corpus(out_dir: str | Path, n_shards: int, stories_per_shard: int, seed: int = 0) -> list[Path]:
    """Write ``data00.json`` ... as JSON arrays of TinyStories-schema records; deterministic in ``seed``."""
    if n_shards < 1 or stories_per_shard < 1:
        raise ValueError(f"make_corpus needs n_shards >= 1 and stories_per_shard >= 1, "
                         f"got {n_shards} and {stories_per_shard}")
    out_dir = Path(out_dir)
    paths = []
    for shard in range(n_shards):
        rng = random.Random(f"llamalit-synthetic/{seed}/{shard}")
        records = [make_record(rng) for _ in range(stories_per_shard)]
        path = out_dir / f"data{shard:02d}.json"
        atomic_write_text(path, json.dumps(records))
        paths.append(path)
    return paths


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.I) is not None


def feature_present(story: str, feature: str) -> bool:
    """Whether ``story`` shows ``feature`` (one of FEATURES) through the grammar's cue phrases."""
    if feature == "BadEnding":
        last = story.strip().split("\n\n")[-1]
        return bool(_SAD.search(last)) and not _HAPPY.search(last)
    if feature not in _CUES:
        raise ValueError(f"unknown feature {feature!r}; expected one of {FEATURES}")
    return bool(_CUES[feature].search(story))


def story_honours_instruction(story: str, words: Iterable[str], features: Iterable[str]) -> dict:
    """Check a story against its instruction.

    Returns ``{"words": {word: bool}, "features": {feature: bool}, "score": fraction met, "ok": all met}``.
    Words match whole words, case-insensitively.
    """
    word_hits = {w: _has_word(story, w) for w in words}
    feature_hits = {f: feature_present(story, f) for f in features}
    checks = list(word_hits.values()) + list(feature_hits.values())
    return {"words": word_hits, "features": feature_hits,
            "score": sum(checks) / len(checks) if checks else 1.0, "ok": all(checks)}
