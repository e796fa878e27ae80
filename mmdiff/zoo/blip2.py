"""BLIP-2, the captioner of the annotation pipeline (transformers port).

``build(spec)`` returns a :class:`Blip2Bundle` ``(model, processor)``:

- ``model``: ``transformers.Blip2ForConditionalGeneration`` in eval mode on ``spec.device`` / ``spec.dtype``;
- ``processor``: ``transformers.Blip2Processor`` (image processor + tokenizer, ``num_query_tokens`` set).

Sources: a local folder or hub id holding a ``save_pretrained`` checkpoint of both (e.g.
``Salesforce/blip2-opt-2.7b``), or ``tiny``: the same classes with a two-layer vision tower, Q-Former
and OPT language model (hidden sizes 32) and a byte-level BPE tokenizer built from ``assets/blip2_tiny``,
whose merges make the ~50 words of ``caption_words.txt`` single tokens; weights are deterministic from
``spec.seed``. Its generation config suppresses every other token and repeats, so the random twin writes random
but real words ("a cat sitting on ...") that downstream phrase extraction can work with.
``random``: the real BLIP-2 OPT-2.7b architecture (ViT-g/14 at 224 px, 32-query Q-Former, OPT-2.7b) with
random weights and the tiny twin's tokenizer; tokens beyond that tokenizer are suppressed so its random
captions decode. ``save_tiny`` writes the tiny twin (generation config included) with ``save_pretrained``.
No options.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    GPT2Tokenizer,
    OPTConfig,
)

from mmdiff.zoo import default_dtype
from mmdiff.zoo.spec import ModelSpec

__all__ = ["Blip2Bundle", "build", "save_tiny", "TINY_IMAGE_SIZE"]

ASSETS = Path(__file__).parent / "assets" / "blip2_tiny"
TINY_IMAGE_SIZE = 32
TINY_QUERY_TOKENS = 4
# Salesforce/blip2-opt-2.7b (the vision and Q-Former sizes are transformers' Blip2Config defaults)
OPT_2_7B = {"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
            "word_embed_proj_dim": 2560, "vocab_size": 50272, "max_position_embeddings": 2048}
REAL_QUERY_TOKENS = 32


class Blip2Bundle(NamedTuple):
    model: Blip2ForConditionalGeneration
    processor: Blip2Processor


def _tiny_processor(image_size: int = TINY_IMAGE_SIZE, query_tokens: int = TINY_QUERY_TOKENS) -> Blip2Processor:
    tokenizer = GPT2Tokenizer.from_pretrained(ASSETS)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=query_tokens)


def _random(seed: int) -> Blip2Bundle:
    processor = _tiny_processor(224, REAL_QUERY_TOKENS)
    tokenizer = processor.tokenizer
    text = OPTConfig(**OPT_2_7B, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    config = Blip2Config(text_config=text.to_dict(), num_query_tokens=REAL_QUERY_TOKENS,
                         image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = list(range(len(tokenizer), OPT_2_7B["vocab_size"]))
    return Blip2Bundle(model, processor)


def _tiny(seed: int) -> Blip2Bundle:
    processor = _tiny_processor()
    tokenizer = processor.tokenizer
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        word_embed_proj_dim=32, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TINY_IMAGE_SIZE, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=32, cross_attention_frequency=1, vocab_size=64),
        text_config=text.to_dict(),
        num_query_tokens=TINY_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    vocab = tokenizer.get_vocab()
    words = {vocab["Ġ" + word] for word in (ASSETS / "caption_words.txt").read_text().split()}
    model.generation_config.suppress_tokens = sorted(set(range(len(tokenizer))) - words - {tokenizer.eos_token_id})
    model.generation_config.no_repeat_ngram_size = 1
    return Blip2Bundle(model, processor)


def build(spec: ModelSpec) -> Blip2Bundle:
    """Built in ``spec.dtype`` from the start (OPT-2.7b in float32 would take 15.5 GB of host memory)."""
    dtype = getattr(torch, spec.dtype)
    if spec.is_tiny or spec.is_random:
        with default_dtype(dtype):
            bundle = _tiny(spec.seed) if spec.is_tiny else _random(spec.seed)
    else:
        try:
            processor = Blip2Processor.from_pretrained(spec.source)
            model = Blip2ForConditionalGeneration.from_pretrained(spec.source, dtype=dtype)
        except OSError as exc:
            raise OSError(f"blip2: cannot load model {spec.source!r} (a local folder or a cached hub id): {exc}") from exc
        bundle = Blip2Bundle(model.eval(), processor)
    bundle.model.to(device=spec.device, dtype=dtype)
    return bundle


def save_tiny(path: Path, seed: int = 0) -> Path:
    """Write the tiny twin as a transformers checkpoint folder (model + processor)."""
    bundle = _tiny(seed)
    bundle.model.save_pretrained(path)
    bundle.processor.save_pretrained(path)
    return Path(path)
