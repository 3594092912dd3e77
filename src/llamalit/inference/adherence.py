"""Instruction adherence of generated stories: requested words used, checkable features present.

Works on any story text (TinyStories, the synthetic corpus, model samples). Words match with their
inflections ("hang" ~ "hangs", "hanged", "hanging", "hung"). Features of the TinyStories instruct
data: ``Dialogue`` is checked exactly (a closed quotation with words in it); ``BadEnding``,
``MoralValue``, ``Twist``, ``Foreshadowing`` and ``Conflict`` by keyword heuristics, which are
noisy: compare models with them, do not read them as ground truth. Any other feature is reported
as unchecked and counts in no rate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_VOWELS = set("aeiou")
# Irregular forms common in children's stories; every form of a group matches every other.
_IRREGULAR_GROUPS = """
go goes went gone going|run ran running|see saw seen|eat ate eaten|come came|take took taken|give gave given
find found|make made|say said says|think thought|catch caught|bring brought|buy bought|fly flew flown flies
sing sang sung|swim swam swum swimming|drink drank drunk|sit sat sitting|stand stood|hang hung|feel felt
keep kept|sleep slept|leave left|tell told|know knew known|grow grew grown|throw threw thrown|draw drew drawn
win won winning|break broke broken|fall fell fallen|hide hid hidden|ride rode ridden|write wrote written
get got gotten getting|have has had having|do does did done|begin began begun|build built|dig dug digging
fight fought|hold held|lose lost|meet met|shake shook shaken|shine shone|spin spun spinning|steal stole stolen
sting stung|swing swung|teach taught|tear tore torn|wake woke woken|wear wore worn|bite bit bitten
blow blew blown|freeze froze frozen|light lit|lead led|feed fed|seek sought|sweep swept|weep wept
creep crept|kneel knelt|spend spent|send sent|bend bent|lend lent|mean meant|pay paid|lay laid|speak spoke
spoken|choose chose chosen|forget forgot forgotten|understand understood|rise rose risen|drive drove driven
shoot shot|slide slid|stick stuck|strike struck|sell sold|hear heard|lie lay lying|die died dying dead
be is am are was were been being|mouse mice|child children|foot feet|tooth teeth|man men|woman women
goose geese|person people|ox oxen|good better best|bad worse worst|far farther further farthest|little less least
"""
_IRREGULAR: dict[str, set[str]] = {}
for _group in _IRREGULAR_GROUPS.replace("\n", "|").split("|"):
    _forms = set(_group.split())
    for _form in _forms:
        _IRREGULAR.setdefault(_form, set()).update(_forms)

CHECKABLE_FEATURES = ("Dialogue", "BadEnding", "MoralValue", "Twist", "Foreshadowing", "Conflict")

# Phrases of the TinyStories generation prompts for each feature (for parse_prompt).
_FEATURE_PHRASES = {
    "Dialogue": "at least one dialogue",
    "BadEnding": "bad ending",
    "MoralValue": "moral value",
    "Twist": "plot twist",
    "Foreshadowing": "foreshadowing",
    "Conflict": "conflict",
}


def _patterns(*alternatives: str) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b")


_SAD_ENDING = _patterns(
    r"sad(ly|der)?", r"cr(y|ies|ied|ying)", r"tears?", r"died", r"dead", r"hurt", r"broken?", r"lost",
    r"gone", r"alone", r"lonely", r"sorry", r"upset", r"scared", r"afraid", r"ruined", r"destroyed",
    r"no more", r"too late", r"could not", r"couldn't", r"never again", r"never (saw|came|found|got)",
    r"miss(ed)?", r"ate (him|her|them|it)",
)
_MORAL = _patterns(
    r"learn(ed|t|s)?", r"lessons?", r"moral", r"important", r"should (always|never|not)",
    r"it is (good|better|best|wise|kind|nice) to", r"remember(ed)? (to|that)",
)
_TWIST = _patterns(
    r"sudden(ly)?", r"but then", r"to (his|her|their|everyone's|our|my) surprise", r"surprised?",
    r"unexpected(ly)?", r"turned out", r"all along", r"instead", r"realized", r"was not (a|an|really)",
    r"wasn't (a|an|really)", r"it was (really|actually)",
)
_FORESHADOWING = _patterns(
    r"little did", r"did not know", r"didn't know", r"had a feeling", r"would soon", r"warn(ed|ing|s)?",
    r"was about to", r"soon (learn|find|see|discover)", r"remember(ed)? what", r"knew (that )?something",
    r"did not notice", r"didn't notice", r"important later", r"good thing",
)
_CONFLICT = _patterns(
    r"argu(e|ed|es|ing)", r"fight(s|ing)?", r"fought", r"angry", r"mad", r"yell(ed|s|ing)?",
    r"shout(ed|s|ing)?", r"mine", r"problem", r"disagree(d)?", r"push(ed)?", r"grabb?(ed)?",
    r"refused?", r"would not share", r"wouldn't share", r"bull(y|ies|ied)", r"enem(y|ies)",
)
_QUOTE = re.compile(r'["\u201c][^"\u201c\u201d]*[A-Za-z][^"\u201c\u201d]*["\u201d]')


def word_forms(word: str) -> set[str]:
    """The lower-case forms a requested word may take in a story (regular and irregular inflections)."""
    w = word.lower().strip()
    forms = {w, w + "s", w + "es", w + "ed", w + "ing", w + "er", w + "est", w + "ly"}
    if w.endswith("e"):  # bake: baked baking baker; gentle: gently
        forms |= {w + "d", w + "r", w + "st", w[:-1] + "ing", w[:-1] + "y"}
    if w.endswith("ie"):  # tie: tying
        forms.add(w[:-2] + "ying")
    if len(w) > 1 and w.endswith("y") and w[-2] not in _VOWELS:  # cry: cries cried; happy: happily
        forms |= {w[:-1] + s for s in ("ies", "ied", "ier", "iest", "ily", "iness")}
    if w.endswith("f"):  # leaf: leaves
        forms.add(w[:-1] + "ves")
    if w.endswith("fe"):  # knife: knives
        forms.add(w[:-2] + "ves")
    if len(w) >= 3 and w[-1] not in _VOWELS | set("wxy") and w[-2] in _VOWELS and w[-3] not in _VOWELS:
        doubled = w + w[-1]  # hop: hopped hopping; big: bigger
        forms |= {doubled + s for s in ("ed", "ing", "er", "est", "y")}
    return forms | _IRREGULAR.get(w, set())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def contains_word(story: str, word: str) -> bool:
    """True when ``word`` (or one of its inflections) is a whole word of ``story``; phrases match as phrases."""
    parts = _words(word)
    if not parts:
        return False
    tokens = _words(story)
    if len(parts) == 1:
        return bool(word_forms(parts[0]) & set(tokens))
    # A phrase: all but the last word exact, the last one inflected ("ice cream" ~ "ice creams").
    n, last = len(parts), word_forms(parts[-1])
    return any(tokens[i:i + n - 1] == parts[:-1] and tokens[i + n - 1] in last
               for i in range(len(tokens) - n + 1))


def _canonical_feature(feature: str) -> str | None:
    key = re.sub(r"[^a-z]", "", feature.lower())
    return next((f for f in CHECKABLE_FEATURES if f.lower() == key), None)


def _sentences(story: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", story.strip()) if s.strip()]


def check_feature(story: str, feature: str) -> bool | None:
    """Whether ``story`` shows ``feature``; None when the feature is not one we can check."""
    name = _canonical_feature(feature)
    if name is None:
        return None
    if name == "Dialogue":
        return bool(_QUOTE.search(story))
    text = story.lower()
    if name == "BadEnding":  # a sad word in the last two sentences
        return bool(_SAD_ENDING.search(" ".join(_sentences(text)[-2:])))
    pattern = {"MoralValue": _MORAL, "Twist": _TWIST, "Foreshadowing": _FORESHADOWING,
               "Conflict": _CONFLICT}[name]
    return bool(pattern.search(text))


def _fraction(hits: int, total: int) -> float | None:
    return hits / total if total else None


def score_story(story: str, words: Sequence[str], features: Sequence[str]) -> dict:
    """Adherence of one story to its instruction.

    Returns ``word_recall`` (fraction of requested words present), ``feature_rate`` (fraction of
    checkable requested features that hold), ``adherence`` (fraction of all checkable requirements
    met: words and features together); each is None when there was nothing of that kind to check.
    Also ``words_found``, ``words_missing``, ``features`` ({name: bool}) and ``unchecked_features``.
    """
    found = [w for w in words if contains_word(story, w)]
    missing = [w for w in words if w not in found]
    checked: dict[str, bool] = {}
    unchecked: list[str] = []
    for feature in features:
        result = check_feature(story, feature)
        if result is None:
            unchecked.append(feature)
        else:
            checked[_canonical_feature(feature)] = result
    held = sum(checked.values())
    return {
        "word_recall": _fraction(len(found), len(words)),
        "feature_rate": _fraction(held, len(checked)),
        "adherence": _fraction(len(found) + held, len(words) + len(checked)),
        "words_found": found,
        "words_missing": missing,
        "features": checked,
        "unchecked_features": unchecked,
    }


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def aggregate(scores: Sequence[dict]) -> dict:
    """Means over stories of ``word_recall``, ``feature_rate`` and ``adherence`` (None values skipped),
    ``n_stories``, and ``feature/<Name>``: how often each requested checkable feature held."""
    out = {key: _mean(s[key] for s in scores) for key in ("word_recall", "feature_rate", "adherence")}
    out["n_stories"] = len(scores)
    for name in CHECKABLE_FEATURES:
        rate = _mean(float(s["features"][name]) for s in scores if name in s["features"])
        if rate is not None:
            out[f"feature/{name}"] = rate
    return out


def parse_prompt(prompt: str) -> tuple[list[str], list[str]]:
    """Requested words and features of a TinyStories-style prompt (the full or the shortened form)."""
    words = [m.group(2) for m in re.finditer(r'the (verb|noun|adjective) "([^"]+)"', prompt)]
    _, _, feature_text = prompt.partition("features:")
    feature_text = feature_text.lower()
    features = [name for name, phrase in _FEATURE_PHRASES.items() if phrase in feature_text]
    return words, features
