"""Entity phrases from a caption: noun phrases with character spans and head nouns.

The official annotation uses spaCy noun chunks. No spaCy model ships offline, so the default is a small
rule-based chunker tuned to BLIP-2 style captions ("a man riding a horse on a beach"): a noun phrase is a
run of words between boundary words (prepositions, conjunctions, verbs, pronouns, relative words); its
last word is the head noun. Phrases that name several things ("two dogs", "a group of people", "cars")
are flagged ``counted``/``plural`` so the filter can drop them, as the method prescribes. Set
``spacy_model`` to use spaCy's ``noun_chunks`` instead (spaCy is optional, outside the tested stack: the ``spacy`` extra).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmdiff.configuration import ConfigModel
from mmdiff.extras import require

__all__ = ["Phrase", "PhraseConfig", "PhraseExtractor", "extract_phrases"]

DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their", "my",
               "your", "our", "another", "one", "single"}
COUNT_WORDS = {"two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
               "dozen", "dozens", "hundreds", "thousands", "several", "many", "some", "few", "multiple",
               "various", "numerous", "both", "all", "lots", "lot", "pair", "couple", "group", "groups",
               "bunch", "crowd", "herd", "flock", "team", "row", "rows", "pile", "stack", "set", "number",
               "collection", "family"}
PREPOSITIONS = {"on", "in", "at", "with", "of", "near", "next", "to", "by", "under", "over", "behind",
                "beside", "besides", "between", "among", "around", "above", "below", "into", "onto", "from",
                "through", "across", "along", "against", "inside", "outside", "underneath", "beneath",
                "during", "for", "toward", "towards", "up", "down", "off", "out", "about", "like", "as",
                "while", "without", "atop", "upon", "after", "before", "front", "top"}
CONJUNCTIONS = {"and", "or", "but", "while", "who", "which", "that", "where", "whose", "then", "so"}
PRONOUNS = {"it", "he", "she", "they", "them", "him", "we", "us", "you", "i", "there", "here", "itself",
            "himself", "herself", "themselves", "each", "other"}
VERBS = {"is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "do", "does", "did",
         "sits", "sit", "sat", "stands", "stand", "stood", "looks", "look", "holds", "hold", "held", "wears",
         "wear", "rides", "ride", "lies", "lie", "lays", "lay", "plays", "play", "walks", "walk", "runs",
         "run", "eats", "eat", "shows", "show", "poses", "pose", "appears", "can", "could", "will", "would",
         "made", "covered", "filled", "dressed", "parked", "topped", "surrounded", "taken", "seen", "set",
         "stuffed", "shaped", "painted", "printed", "attached", "placed", "hanging", "very", "not", "no"}
# Nouns that end in -ing (so are not gerunds/verbs) and nouns that end in -s but are singular.
ING_NOUNS = {"building", "ceiling", "painting", "clothing", "ring", "king", "thing", "wedding", "string",
             "wing", "swing", "ping", "spring", "evening", "morning", "railing", "awning", "sibling",
             "pudding", "stocking", "bedding", "icing", "frosting", "sling", "lightning",
             "darling", "dumpling", "duckling", "seedling", "earring", "fencing", "lighting", "opening",
             "landing", "sapling", "herring", "viking"}
SINGULAR_S = {"bus", "lens", "news", "series", "species", "physics", "corps", "chaos", "gas", "atlas", "canvas"}
# Garment/tool nouns that are grammatically plural but denote one object: not counted as plural.
PAIR_NOUNS = {"jeans", "pants", "shorts", "glasses", "sunglasses", "trousers", "scissors", "goggles",
              "overalls", "pajamas", "binoculars", "headphones", "earphones", "leggings", "tights"}
IRREGULAR_PLURALS = {"people", "men", "women", "children", "kids", "mice", "geese", "teeth", "feet",
                     "oxen", "cattle", "police", "sheep", "fish", "deer", "persons", "folks", "animals"}
FRAMING_WORDS = {"close", "closeup", "image", "picture", "photo", "photograph", "view", "shot"}

_WORD = re.compile(r"\w+(?:['\-]\w+)*")


@dataclass(frozen=True)
class Phrase:
    """A noun phrase of a caption. ``caption[start:end] == text`` and ``caption[head_start:head_end] == head``."""

    text: str
    start: int
    end: int
    head: str
    head_start: int
    head_end: int
    counted: bool  # starts with a number or quantity word ("two dogs", "a group", "several cars")
    plural: bool  # the head noun is plural ("dogs", "people")

    @property
    def is_single_entity(self) -> bool:
        return not (self.counted or self.plural)


class PhraseConfig(ConfigModel):
    spacy_model: str | None = None  # a spaCy pipeline name or path; None = the built-in chunker
    max_phrases: int = 8  # detection cost grows with the prompt; later phrases are dropped


def _is_boundary(word: str) -> bool:
    lower = word.lower()
    if lower in PREPOSITIONS or lower in CONJUNCTIONS or lower in PRONOUNS or lower in VERBS:
        return True
    if lower.endswith("ing") and len(lower) > 4 and lower not in ING_NOUNS:
        return True  # gerund / participle: "riding", "sitting"
    if lower.endswith("ly") and len(lower) > 4 and lower not in {"family", "belly", "jelly", "lily", "fly"}:
        return True  # adverb
    return False


def _is_plural(head: str) -> bool:
    lower = head.lower()
    if lower in PAIR_NOUNS:
        return False
    if lower in IRREGULAR_PLURALS:
        return True
    if lower in SINGULAR_S or len(lower) <= 3:
        return False
    return lower.endswith("s") and not lower.endswith(("ss", "us", "is", "ous"))


def _make_phrase(caption: str, words: list[re.Match[str]]) -> Phrase | None:
    # Photo-framing phrases ("a close up of ...", "a picture of ...") are not entities.
    if words[-1].group().lower() in FRAMING_WORDS:
        return None
    lowered = [w.group().lower() for w in words]
    counted = any(w in COUNT_WORDS or (w.isdigit() and w not in {"0", "1"}) for w in lowered)
    content = [w for w in words if w.group().lower() not in DETERMINERS and w.group().lower() not in COUNT_WORDS]
    if not content:
        return None
    head = words[-1]
    if head.group().isdigit():
        return None
    start, end = words[0].start(), words[-1].end()
    return Phrase(
        text=caption[start:end], start=start, end=end, head=head.group(), head_start=head.start(),
        head_end=head.end(), counted=counted, plural=_is_plural(head.group()),
    )


def extract_phrases(caption: str) -> list[Phrase]:
    """Noun phrases of ``caption`` in order, with spans (rule-based chunker, no model needed)."""
    words = list(_WORD.finditer(caption))
    phrases: list[Phrase] = []
    run: list[re.Match[str]] = []
    for word in words:
        lower = word.group().lower()
        if _is_boundary(word.group()):
            _flush(caption, run, phrases)
            run = []
            continue
        # A determiner or punctuation (a comma) between words starts a new phrase ("a dog, a cat").
        if run and (lower in DETERMINERS or caption[run[-1].end():word.start()].strip(" ")):
            _flush(caption, run, phrases)
            run = []
        run.append(word)
    _flush(caption, run, phrases)
    return phrases


def _flush(caption: str, run: list[re.Match[str]], phrases: list[Phrase]) -> None:
    if run:
        phrase = _make_phrase(caption, run)
        if phrase is not None:
            phrases.append(phrase)


class PhraseExtractor:
    """Batched operator: ``extractor(captions) -> [[Phrase, ...], ...]``."""

    def __init__(self, config: PhraseConfig) -> None:
        self.config = config
        self._nlp = None
        if config.spacy_model is not None:
            require(f"phrases.spacy_model={config.spacy_model!r}", "spacy", "spacy")
            import spacy

            self._nlp = spacy.load(config.spacy_model)

    def __call__(self, captions: list[str]) -> list[list[Phrase]]:
        if self._nlp is None:
            return [extract_phrases(c)[: self.config.max_phrases] for c in captions]
        return [self._spacy_phrases(doc)[: self.config.max_phrases] for doc in self._nlp.pipe(captions)]

    @staticmethod
    def _spacy_phrases(doc) -> list[Phrase]:
        phrases = []
        for chunk in doc.noun_chunks:
            root = chunk.root
            counted = any(t.like_num and t.text not in {"one", "1"} or t.lower_ in COUNT_WORDS for t in chunk)
            plural = root.tag_ in {"NNS", "NNPS"} and root.lower_ not in PAIR_NOUNS
            phrases.append(Phrase(
                text=chunk.text, start=chunk.start_char, end=chunk.end_char, head=root.text,
                head_start=root.idx, head_end=root.idx + len(root.text), counted=counted, plural=plural,
            ))
        return phrases
