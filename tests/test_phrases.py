"""Entity phrases from captions: spans, head nouns, and the counted/plural flags the filter drops."""

import pytest

from preprocess.phrases import PhraseConfig, PhraseExtractor, extract_phrases


def summary(caption):
    return [(p.text, p.head) for p in extract_phrases(caption)]


@pytest.mark.parametrize("caption, expected", [
    ("a man riding a horse on a beach", [("a man", "man"), ("a horse", "horse"), ("a beach", "beach")]),
    ("a woman in a red dress holding an umbrella",
     [("a woman", "woman"), ("a red dress", "dress"), ("an umbrella", "umbrella")]),
    ("a man and a woman sitting on a bench", [("a man", "man"), ("a woman", "woman"), ("a bench", "bench")]),
    ("a red motorcycle parked in front of a building", [("a red motorcycle", "motorcycle"), ("a building", "building")]),
    ("a close up of a cat sitting on a couch next to a laptop", [("a cat", "cat"), ("a couch", "couch"), ("a laptop", "laptop")]),
    ("a dog, a cat", [("a dog", "dog"), ("a cat", "cat")]),
])
def test_blip2_style_captions(caption, expected):
    assert summary(caption) == expected


def test_spans_locate_phrase_and_head_in_the_caption():
    caption = "Émile's brown dog chasing a ball in the park"
    for phrase in extract_phrases(caption):
        assert caption[phrase.start : phrase.end] == phrase.text
        assert caption[phrase.head_start : phrase.head_end] == phrase.head
    assert [p.head for p in extract_phrases(caption)] == ["dog", "ball", "park"]


def test_counted_and_plural_phrases_are_flagged():
    phrases = {p.text: p for p in extract_phrases("two dogs and a cat playing with toys near some people")}
    assert phrases["two dogs"].counted and not phrases["two dogs"].is_single_entity
    assert phrases["toys"].plural and not phrases["toys"].counted
    assert phrases["a cat"].is_single_entity
    assert not any(p.is_single_entity for p in extract_phrases("a group of people standing around"))
    # one object despite the plural form
    assert extract_phrases("a man wearing sunglasses")[1].is_single_entity


def test_extractor_is_batched_and_caps_phrases():
    extractor = PhraseExtractor(PhraseConfig(max_phrases=2))
    out = extractor(["a man riding a horse on a beach", "a cat"])
    assert [[p.head for p in ps] for ps in out] == [["man", "horse"], ["cat"]]


def test_missing_spacy_is_a_clear_error():
    try:
        import spacy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"spacy_model='en_core_web_sm' needs spacy, .*pip install 'mmdiff\[spacy\]'"):
            PhraseExtractor(PhraseConfig(spacy_model="en_core_web_sm"))
    else:
        pytest.skip("spaCy is installed here; the missing-spaCy error cannot be exercised")
