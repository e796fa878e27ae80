"""Grounding DINO, the open-set detector that finds each caption phrase in the image.

``build(spec)`` returns, by ``spec.backend``:

- ``transformers``: a :class:`GroundingDinoBundle` ``(model, processor)`` with
  ``transformers.GroundingDinoForObjectDetection`` (eval mode) and ``GroundingDinoProcessor``. Source: a
  local folder or hub id of an HF-format checkpoint (e.g. ``IDEA-Research/grounding-dino-tiny``).
- ``official``: the groundingdino-py ``GroundingDINO`` module (eval mode; ``.tokenizer`` is its BERT
  tokenizer). Source: the official ``.pth`` checkpoint (e.g. ``groundingdino_swint_ogc.pth``), read with
  ``torch.load(weights_only=True)``. Options: ``config_file`` (the official SLConfig ``.py``; default the
  package's ``GroundingDINO_SwinT_OGC.py``) and ``text_encoder`` (a local ``bert-base-uncased`` folder,
  required: the package would otherwise fetch it from the hub). The transformers 5 compatibility layer
  (:mod:`mmdiff.zoo.compat.groundingdino`) is installed before building.

``tiny`` builds the same classes with a tiny BERT text encoder (WordPiece vocab in ``assets/bert_tiny``)
and a small transformer (2 decoder layers, 30 queries; hidden 32, but 256 in the official twin,
whose text position embedding is fixed at 256 wide), deterministic from ``spec.seed``.
The transformers twin uses a 2-stage Swin with embed dim 16; the official twin keeps the package's
Swin-T backbone, the smallest its registry offers. ``save_tiny(path, backend=...)`` writes the twin in the
real format: an HF folder, or ``groundingdino.pth`` (``{"model": state_dict}``) + ``config.py`` +
``bert/`` for the official backend. ``random`` (transformers backend): the real Swin-T model
(``grounding-dino-tiny``'s architecture: transformers' ``GroundingDinoConfig`` defaults, BERT-base text
encoder) with random weights and the tiny twin's tokenizer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SwinConfig,
)

from mmdiff.zoo import default_dtype
from mmdiff.zoo.spec import ModelSpec

__all__ = ["GroundingDinoBundle", "build", "save_tiny", "OFFICIAL_CHECKPOINT", "OFFICIAL_CONFIG", "OFFICIAL_BERT"]

BERT_ASSETS = Path(__file__).parent / "assets" / "bert_tiny"
# File names save_tiny(backend="official") writes, mirroring the official release's files.
OFFICIAL_CHECKPOINT = "groundingdino.pth"
OFFICIAL_CONFIG = "config.py"
OFFICIAL_BERT = "bert"
TINY_IMAGE_SIZE = 64

# Overrides of the official SwinT_OGC config that make the tiny official twin.
_TINY_OFFICIAL = dict(
    enc_layers=1, dec_layers=2, dim_feedforward=64, hidden_dim=256, nheads=2, num_queries=30,
    use_checkpoint=False, use_transformer_ckpt=False, max_text_len=256,
)


class GroundingDinoBundle(NamedTuple):
    model: GroundingDinoForObjectDetection
    processor: GroundingDinoProcessor


def _tiny_bert_config(vocab_size: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256)


def _tiny_transformers(seed: int) -> GroundingDinoBundle:
    tokenizer = BertTokenizer.from_pretrained(BERT_ASSETS)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, image_size=TINY_IMAGE_SIZE,
                                   out_features=["stage1", "stage2"]),
        text_config=_tiny_bert_config(len(tokenizer)).to_dict(),
        num_queries=30, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, num_feature_levels=2,
        encoder_n_points=2, decoder_n_points=2, max_text_len=256,
    )
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE, "longest_edge": 2 * TINY_IMAGE_SIZE})
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    return GroundingDinoBundle(model, GroundingDinoProcessor(image_processor, tokenizer))


def _package_config() -> Path:
    import groundingdino.config

    return Path(groundingdino.config.__file__).parent / "GroundingDINO_SwinT_OGC.py"


def _official_args(config_file: str | Path | None, text_encoder: str | Path):
    from groundingdino.util.slconfig import SLConfig

    config_file = _package_config() if config_file is None else Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"grounding_dino: official config file {config_file} not found")
    if not Path(text_encoder).is_dir():
        raise FileNotFoundError(f"grounding_dino: text_encoder {text_encoder} is not a local BERT folder "
                                "(the official backend never fetches bert-base-uncased from the hub)")
    args = SLConfig.fromfile(str(config_file))
    args.text_encoder_type = str(text_encoder)
    args.device = "cpu"
    return args


def _build_official(args) -> torch.nn.Module:
    from groundingdino.models import build_model

    from mmdiff.zoo.compat.groundingdino import install

    install()
    return build_model(args)


def _tiny_official(seed: int, folder: Path) -> torch.nn.Module:
    """Write the tiny BERT and config into ``folder`` (the official layout), then build the model from them."""
    tokenizer = BertTokenizer.from_pretrained(BERT_ASSETS)
    torch.manual_seed(seed)
    BertModel(_tiny_bert_config(len(tokenizer))).save_pretrained(folder / OFFICIAL_BERT)
    tokenizer.save_pretrained(folder / OFFICIAL_BERT)
    # the package's SwinT_OGC config with the tiny settings assigned after it
    overrides = "".join(f"{key} = {value!r}\n" for key, value in _TINY_OFFICIAL.items())
    (folder / OFFICIAL_CONFIG).write_text(_package_config().read_text() + "\n" + overrides)
    torch.manual_seed(seed)
    return _build_official(_official_args(folder / OFFICIAL_CONFIG, folder / OFFICIAL_BERT)).eval()


def _load_official(spec: ModelSpec) -> torch.nn.Module:
    checkpoint = Path(spec.source)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"grounding_dino: official checkpoint {checkpoint} not found (backend 'official' "
                                "needs a local .pth file)")
    if "text_encoder" not in spec.options:
        raise ValueError("grounding_dino: backend 'official' needs options.text_encoder (a local BERT folder)")
    model = _build_official(_official_args(spec.options.get("config_file"), spec.options["text_encoder"]))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The checkpoint carries no BERT position_ids buffer; anything else missing is a wrong config.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"grounding_dino: checkpoint {checkpoint} does not match config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


def build(spec: ModelSpec):
    """Built in ``spec.dtype`` from the start: no float32 copy of the weights on the host."""
    with default_dtype(getattr(torch, spec.dtype)):
        return _build(spec)


def _build(spec: ModelSpec):
    if spec.backend == "official":
        if spec.is_tiny:
            with tempfile.TemporaryDirectory() as folder:
                model = _tiny_official(spec.seed, Path(folder))
        else:
            model = _load_official(spec)
        return model.to(device=spec.device, dtype=getattr(torch, spec.dtype))
    if spec.is_tiny:
        bundle = _tiny_transformers(spec.seed)
    elif spec.is_random:
        torch.manual_seed(spec.seed)
        bundle = GroundingDinoBundle(GroundingDinoForObjectDetection(GroundingDinoConfig()).eval(),
                                     GroundingDinoProcessor(GroundingDinoImageProcessor(),
                                                            BertTokenizer.from_pretrained(BERT_ASSETS)))
    else:
        try:
            bundle = GroundingDinoBundle(GroundingDinoForObjectDetection.from_pretrained(
                                             spec.source, dtype=getattr(torch, spec.dtype)).eval(),
                                         GroundingDinoProcessor.from_pretrained(spec.source))
        except OSError as exc:
            raise OSError(f"grounding_dino: cannot load model {spec.source!r} (a local folder or a cached hub id): "
                          f"{exc}") from exc
    bundle.model.to(device=spec.device, dtype=getattr(torch, spec.dtype))
    return bundle


def save_tiny(path: Path, seed: int = 0, backend: str = "transformers") -> Path:
    """Write the tiny twin in the real format of ``backend``; returns ``path``."""
    path = Path(path)
    if backend == "official":
        path.mkdir(parents=True, exist_ok=True)
        model = _tiny_official(seed, path)
        torch.save({"model": model.state_dict()}, path / OFFICIAL_CHECKPOINT)
        return path
    bundle = _tiny_transformers(seed)
    bundle.model.save_pretrained(path)
    bundle.processor.save_pretrained(path)
    return path
