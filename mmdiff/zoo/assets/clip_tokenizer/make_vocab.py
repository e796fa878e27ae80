"""Regenerate vocab.json / merges.txt of the tiny CLIP tokenizer (run from this folder).

The tiny text encoders of the zoo use this tokenizer. Its base vocabulary is CLIP's: the 256 byte
symbols with and without the end-of-word marker, so any text tokenizes (byte-level fallback). On top,
BPE merges learned from a short list of caption words make ordinary words ("dog", "sitting", "beach")
single tokens, as they are in the real CLIP vocabulary.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers.convert_slow_tokenizer import bytes_to_unicode

WORDS = """
a an the of on in at with and by near next to under over behind front beside its his her their
dog cat man woman person people child boy girl baby face portrait toy teddy bear car bike bicycle
motorcycle horse bird duck robot rocket cup mug coffee bowl vase clock backpack sunglasses hat shoe
chair table sofa bed book plant flower tree house building castle mountain river lake sea ocean
beach forest park street city road garden room kitchen field snow desert sky grass sand water
sitting standing running walking playing lying jumping swimming riding eating holding looking
wearing smiling posing flying floating floor wall window door background photo picture painting
red blue green yellow black white brown orange pink purple gray grey small big large little old
young cute happy two three many one style oil watercolor sketch cartoon night day sunset
""".split()


def main() -> None:
    byte_symbols = list(bytes_to_unicode().values())
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, min_frequency=1, show_progress=False, initial_alphabet=byte_symbols,
        end_of_word_suffix="</w>",
    )
    tokenizer.train_from_iterator(WORDS * 2, trainer=trainer)
    learned = json.loads(tokenizer.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in learned["merges"]]
    # CLIP's layout: bytes, bytes + "</w>", merge results in merge order, then the two specials.
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    here = Path(__file__).parent
    (here / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (here / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
