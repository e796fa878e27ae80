"""MMDiffModel: a frozen diffusers base model plus MM-Diff's trainable parts, its losses and save/load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from mmdiff import zoo
from mmdiff.attention import CapturedAttention, MMDiffAttnProcessor, SelfAttnProcessor, SubjectConditioning
from mmdiff.configuration import parse_config
from mmdiff.image_encoder import SubjectImageEncoder
from mmdiff.integrity import folder_sha256, read_json, verify_manifest, write_manifest
from mmdiff.losses import attention_constraint_sum, denoise_loss, inside_share, masks_at
from mmdiff.model_config import MMDiffConfig
from mmdiff.provenance import source_commit
from mmdiff.refiner import QueryMLP, SERefiner
from mmdiff.subject_image import SUBJECT_FILL
from mmdiff.text_fusion import TextFusion, fused_word_embeddings, install_fusion
from mmdiff.zoo.spec import ModelSpec

WEIGHTS_NAME = "mmdiff_adapter.safetensors"
CONFIG_NAME = "mmdiff_config.json"
FORMAT_VERSION = 1


class MMDiffModel(nn.Module):
    """MM-Diff on a SD1.5- or SDXL-family pipeline.

    Trainable: text fusion (one per text encoder), query MLP, SE-Refiner, LoRA on every UNet attention
    layer (self: q/k/v/out; cross: q/k/v/out for text, k/v for subjects) and, if configured, LoRA on the
    text encoders and the last layers of the image encoder. Everything else is frozen. The new modules
    take the UNet's device and dtype. See :meth:`training_loss` for the batch layout.

    The model keeps no per-call state: subjects travel with each UNet call (``cross_attention_kwargs``),
    so one model serves concurrent calls and supports activation checkpointing.
    """

    def __init__(self, base_pipe: Any, image_encoder: Any, config: MMDiffConfig,
                 base_spec: ModelSpec | None = None, image_encoder_spec: ModelSpec | None = None):
        super().__init__()
        is_xl = isinstance(base_pipe, StableDiffusionXLPipeline)
        if is_xl != (config.base_family == "sdxl"):
            raise ValueError(f"config base_family {config.base_family!r} does not match the base pipeline "
                             f"{type(base_pipe).__name__}")
        self.config = config
        self.base_pipe = base_pipe
        # the colour outside the subject in training crops: reference images are padded with it at inference
        self.subject_fill: tuple[int, int, int] = SUBJECT_FILL
        self.base_spec, self.image_encoder_spec = base_spec, image_encoder_spec
        self.unet, self.vae = base_pipe.unet, base_pipe.vae
        encoders = [base_pipe.text_encoder] + ([base_pipe.text_encoder_2] if is_xl else [])
        self.text_encoders = nn.ModuleList(encoders)
        self.tokenizers = [base_pipe.tokenizer] + ([base_pipe.tokenizer_2] if is_xl else [])
        self.noise_scheduler = DDPMScheduler.from_config(base_pipe.scheduler.config)
        for module in (self.unet, self.vae, self.text_encoders):
            module.requires_grad_(False)
        self.image_processor = image_encoder.processor
        self.image_encoder = SubjectImageEncoder(image_encoder.model, config.image_encoder_trainable_layers)

        image_dim, patch_dim = self.image_encoder.embed_dim, self.image_encoder.patch_dim
        unet_dim = self.unet.config.cross_attention_dim
        hidden = image_dim if config.fusion_projection_hidden == "image" else None
        self.text_fusions = nn.ModuleList(TextFusion(image_dim, enc.config.hidden_size, config.fusion_input_norm,
                                                     config.fusion_residual, hidden) for enc in encoders)
        for encoder, fusion in zip(encoders, self.text_fusions):
            install_fusion(encoder, fusion)
        self.query_mlp = QueryMLP(config.face_embed_dim if config.portrait else image_dim, unet_dim, config.num_tokens)
        self.refiner = SERefiner(unet_dim, patch_dim, config.refiner_depth, config.refiner_heads,
                                 config.refiner_dim_head)
        processors = self._add_lora()
        dtype = self.unet.conv_in.weight.dtype
        for module in (self.text_fusions, self.query_mlp, self.refiner, *processors):
            module.to(device=self.device, dtype=dtype)
        if config.text_encoder_lora_rank:
            self._add_text_encoder_lora(config.text_encoder_lora_rank)
        if config.gradient_checkpointing:
            self.enable_gradient_checkpointing()

    # -- construction -------------------------------------------------------------------------
    def _add_lora(self) -> list[MMDiffAttnProcessor]:
        cfg = self.config
        ranks = {"attn1": cfg.self_attn_lora_rank, "attn2": cfg.lora_rank}
        targets = [f"{attn}.{proj}" for attn, rank in ranks.items() if rank for proj in ("to_q", "to_k", "to_v", "to_out.0")]
        if targets:
            rank = max(ranks.values())
            patterns = {rf"{attn}\..*": r for attn, r in ranks.items() if r}
            self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True,
                                             rank_pattern=patterns, alpha_pattern=patterns))
        processors = {}
        for name in self.unet.attn_processors:
            if "attn2" not in name:
                processors[name] = SelfAttnProcessor()
                continue
            layer = self.unet.get_submodule(name.removesuffix(".processor"))
            supervised = any(name.startswith(prefix + ".") for prefix in cfg.supervised_layers)
            to_k = getattr(layer.to_k, "base_layer", layer.to_k)
            processors[name] = MMDiffAttnProcessor(name.removesuffix(".processor"), to_k.out_features,
                                                   to_k.in_features, cfg.lora_rank, supervised, cfg.subject_null_key)
        cross = [p for p in processors.values() if isinstance(p, MMDiffAttnProcessor)]
        self.unet.set_attn_processor(processors)
        return cross

    def _add_text_encoder_lora(self, rank: int) -> None:
        """LoRA on q, k, v, out of every text-encoder layer whose output is used.

        SDXL reads the penultimate hidden states of both encoders and the pooled output of the second
        only, so the first encoder's last layer never reaches the UNet and gets no LoRA (it would get no
        gradient, which data-parallel training rejects).
        """
        is_xl = len(self.text_encoders) == 2
        for i, encoder in enumerate(self.text_encoders):
            layers = encoder.config.num_hidden_layers - (1 if is_xl and i == 0 else 0)
            targets = [name for name, _ in encoder.named_modules()
                       if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")
                       and int(name.split("layers.")[1].split(".")[0]) < layers]
            encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=targets))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the UNet's block activations in backward instead of keeping them (training)."""
        self.unet.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()

    @classmethod
    def from_components(cls, base_pipe: Any, image_encoder: Any, config: MMDiffConfig) -> "MMDiffModel":
        return cls(base_pipe, image_encoder, config)

    @classmethod
    def from_specs(cls, base: ModelSpec, image_encoder: ModelSpec, config: MMDiffConfig) -> "MMDiffModel":
        return cls(zoo.build(base), zoo.build(image_encoder), config, base, image_encoder)

    # -- parameters and persistence -------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the trainable weights (safetensors), the config (JSON) and their checksums to ``directory``.

        The base model and the image encoder are recorded by what identifies them (family, source, seed,
        options; for a folder or a hub id also the hub revision and the content sha256 of its files),
        never by the device and dtype they ran in, so loading can check it got the same models.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}, directory / WEIGHTS_NAME)
        meta = {
            "format_version": FORMAT_VERSION,
            "mmdiff": self.config.model_dump(mode="json"),
            "base": source_record(self.base_spec) if self.base_spec else None,
            "image_encoder": source_record(self.image_encoder_spec) if self.image_encoder_spec else None,
            "subject_fill": list(self.subject_fill),
            "mmdiff_commit": source_commit(),  # the code that wrote it
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        write_manifest(directory, [WEIGHTS_NAME, CONFIG_NAME])  # checked by from_adapter
        return directory

    @staticmethod
    def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], MMDiffConfig]:
        """An adapter folder's checked metadata and config (files verified against its checksums first)."""
        adapter_dir = Path(adapter_dir)
        config_path = adapter_dir / CONFIG_NAME
        if not config_path.is_file() or not (adapter_dir / WEIGHTS_NAME).is_file():
            raise ValueError(f"{adapter_dir}: not an MM-Diff adapter (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        verify_manifest(adapter_dir, [WEIGHTS_NAME, CONFIG_NAME])  # sizes and sha256, before reading anything
        meta = read_json(config_path)
        if not isinstance(meta, dict) or "mmdiff" not in meta:
            raise ValueError(f"{config_path}: not an MM-Diff adapter config (no 'mmdiff' section)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
        # adapters saved before the subject null key existed have none
        return meta, parse_config({"subject_null_key": False, **meta["mmdiff"]}, MMDiffConfig, str(config_path))

    @classmethod
    def recorded_spec(cls, adapter_dir: str | Path, key: str) -> ModelSpec | None:
        """The ``base`` or ``image_encoder`` spec an adapter records (placed by ModelSpec's defaults)."""
        record = cls.read_adapter(adapter_dir)[0].get(key)
        return None if record is None else spec_of(record)

    @classmethod
    def from_pretrained(cls, base: ModelSpec | str | Path, adapter_dir: str | Path,
                        image_encoder: ModelSpec | None = None) -> "MMDiffModel":
        """Base model (spec, diffusers folder or hub id) + an adapter written by :meth:`save_pretrained`.

        The base is checked against the one the adapter records before it is built.
        """
        meta, config = cls.read_adapter(adapter_dir)
        if not isinstance(base, ModelSpec):
            base = ModelSpec(family=config.base_family, source=str(base))
        check_source(meta.get("base"), base, "base model", Path(adapter_dir) / CONFIG_NAME)
        return cls.from_adapter(zoo.build(base), adapter_dir, image_encoder, base, checked=True)

    @classmethod
    def from_adapter(cls, base_pipe: Any, adapter_dir: str | Path, image_encoder: ModelSpec | None = None,
                     base_spec: ModelSpec | None = None, checked: bool = False) -> "MMDiffModel":
        """MM-Diff installed into a built base pipeline (a stock diffusers one, changed in place, as
        ``load_ip_adapter`` does) with an adapter's weights.

        The base is checked against the one the adapter records (``base_spec``, else the folder or hub
        id the pipeline was loaded from); the image encoder is the recorded one unless given, built on
        the UNet's device and in its dtype.
        """
        adapter_dir = Path(adapter_dir)
        config_path = adapter_dir / CONFIG_NAME
        meta, config = cls.read_adapter(adapter_dir)
        if base_spec is None and base_pipe.config.get("_name_or_path"):
            base_spec = ModelSpec(family=config.base_family, source=str(base_pipe.config["_name_or_path"]))
        if base_spec is not None and not checked:
            check_source(meta.get("base"), base_spec, "base model", config_path)
        placement = {"device": str(base_pipe.unet.device), "dtype": str(base_pipe.unet.dtype).removeprefix("torch.")}
        if image_encoder is None:
            if meta.get("image_encoder") is None:
                raise ValueError(f"{config_path}: no image encoder recorded; pass image_encoder=")
            image_encoder = spec_of(meta["image_encoder"])
        check_source(meta.get("image_encoder"), image_encoder, "image encoder", config_path)
        # one device and dtype for the whole model: the base's
        image_encoder = image_encoder.model_copy(update=placement)
        model = cls(base_pipe, zoo.build(image_encoder), config, base_spec, image_encoder)
        try:
            weights = load_file(adapter_dir / WEIGHTS_NAME, device=str(model.device))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; name the file
            raise ValueError(f"{adapter_dir / WEIGHTS_NAME}: not a readable safetensors file (truncated or "
                             f"corrupt?): {exc}") from None
        expected = set(model.trainable_state_dict())
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise ValueError(f"{adapter_dir / WEIGHTS_NAME}: does not match the model "
                             f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
        model.load_state_dict(weights, strict=False)
        fill = meta.get("subject_fill", list(SUBJECT_FILL))  # adapters written before it was recorded: the default
        if not (isinstance(fill, list) and len(fill) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in fill)):
            raise ValueError(f"{config_path}: subject_fill {fill!r} is not an RGB colour [r, g, b] in 0..255")
        model.subject_fill = tuple(fill)
        return model

    # -- encoders -------------------------------------------------------------------------------
    def encode_subjects(self, subject_pixel_values: torch.Tensor, subject_valid: torch.Tensor,
                        face_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, 3, h, w] crops -> (CLS embeddings [B, S, E], subject tokens [B, S*K, D]).

        Only valid slots are encoded; padded slots get zeros (and are masked in attention).
        """
        b, s = subject_valid.shape
        if s > self.config.max_subjects:
            raise ValueError(f"{s} subject slots, more than max_subjects={self.config.max_subjects}")
        # every slot is encoded, padded ones zeroed after: a batch may have no valid subject (subject dropout),
        # and data-parallel ranks must all use every trainable parameter for the gradient reduction
        pixels = subject_pixel_values.flatten(0, 1).to(self.device, self.image_encoder.dtype)
        cls_embeds, patches = self.image_encoder(pixels)
        if self.config.portrait:
            if face_embeds is None:
                raise ValueError("portrait model: batch needs face_embeds [B, S, 512]")
            query_source = face_embeds.flatten(0, 1).to(self.device, self.query_mlp.norm.weight.dtype)
        else:
            query_source = cls_embeds.to(self.query_mlp.norm.weight.dtype)
        tokens = self.refiner(self.query_mlp(query_source), patches)
        k, d = self.config.num_tokens, tokens.shape[-1]
        keep = subject_valid.flatten().to(self.device)[:, None]
        all_cls = cls_embeds * keep.to(cls_embeds.dtype)
        all_tokens = tokens * keep[:, :, None].to(tokens.dtype)
        return all_cls.view(b, s, -1), all_tokens.view(b, s * k, d)

    def encode_text(self, input_ids: list[torch.Tensor], subject_token_index: torch.Tensor | None = None,
                    subject_valid: torch.Tensor | None = None, cls_embeds: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings as the base pipeline computes them, with subject words fused with their CLS.

        ``input_ids``: one [B, L] tensor per text encoder. Returns (prompt_embeds, pooled) where pooled is
        the SDXL pooled embedding (None for SD1.5).
        """
        hidden, pooled = [], None
        is_xl = len(self.text_encoders) == 2
        for encoder, ids in zip(self.text_encoders, input_ids):
            ids = ids.to(self.device)
            if cls_embeds is None:
                out = encoder(ids, output_hidden_states=is_xl)
            else:
                with fused_word_embeddings(subject_token_index.to(self.device), subject_valid.to(self.device),
                                           cls_embeds):
                    out = encoder(ids, output_hidden_states=is_xl)
            hidden.append(out.hidden_states[-2] if is_xl else out[0])
            if is_xl:
                pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    @property
    def device(self) -> torch.device:
        # not ``self.unet.device``: diffusers walks every submodule looking for offload hooks on each call
        return self.unet.conv_in.weight.device

    # -- training -------------------------------------------------------------------------------
    def training_loss(self, batch: dict[str, torch.Tensor], return_attention_maps: bool = True) -> dict[str, torch.Tensor]:
        """Denoising loss + weighted attention constraint on one batch (keys: see docs/DESIGN.md / README).

        ``latent_parameters`` [B, 2C, h, w] (the VAE posterior's mean and log-variance, cached by
        train/latents.py) replaces the VAE encoder pass when present. Noise, timesteps, the posterior
        sample and the in-mask choice come from torch's global RNG. Returns "loss",
        "denoise_loss", "attention_loss", "inside_share/<down|mid|up>" (a metric of the supervised map,
        NaN without a subject),
        and the detached maps (for logging) of the subject tokens, "attention_maps", and of the class
        words, "text_attention_maps", both [B, S, h, w], unless ``return_attention_maps`` is False (the
        training loop asks for them on sample steps only).
        """
        cfg = self.config
        batch = {k: v.to(self.device) for k, v in batch.items()}
        valid = batch["subject_valid"].bool()
        with torch.no_grad():
            if "latent_parameters" in batch:  # cached VAE output (mean, logvar): same sampling, no encoder pass
                posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(self.vae.dtype))
            else:
                posterior = self.vae.encode(batch["pixel_values"].to(self.vae.dtype)).latent_dist
            latents = posterior.sample() * self.vae.config.scaling_factor
        latents = latents.to(self.unet.conv_in.weight.dtype)  # an fp16 base keeps a force_upcast VAE in fp32
        # by shape, not randn_like: the VAE output may be channels-last, and cached latents are not
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r} in the base scheduler config")

        cls_embeds, tokens = self.encode_subjects(batch["subject_pixel_values"], valid, batch.get("face_embeds"))
        token_index = batch["subject_token_index"]
        ids = [batch["input_ids"]] + ([batch["input_ids_2"]] if len(self.text_encoders) == 2 else [])
        prompt_embeds, pooled = self.encode_text(ids, token_index, valid & (token_index >= 0), cls_embeds)
        added = None
        if pooled is not None:
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # the image size, from the latents'
            # filled on the device (torch.tensor(list, device=...) would be a blocking host->device copy per step)
            original = batch["original_size"]
            target_size = torch.stack([original.new_full((latents.shape[0],), side * factor) for side in latents.shape[-2:]],
                                      dim=1)
            time_ids = torch.cat([original, batch["crop_top_left"], target_size], dim=1)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(prompt_embeds.dtype)}

        conditioning = SubjectConditioning(tokens, valid, cfg.subject_scale, cfg.num_tokens, token_index.clamp(min=0),
                                           captured={} if cfg.supervised_layers else None)
        prediction = self.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added,
                               cross_attention_kwargs={"subjects": conditioning}).sample
        captured = list((conditioning.captured or {}).values())

        masks = batch["subject_masks"]  # the loader's are uint8 coverage (0..255) at the latent resolution
        masks = masks.float() / 255 if masks.dtype == torch.uint8 else masks.float()
        region = None
        if cfg.denoise_in_mask_prob > 0 and torch.rand(()) < cfg.denoise_in_mask_prob:
            union = (masks * valid[:, :, None, None]).amax(dim=1, keepdim=True)
            region = (F.interpolate(union, size=latents.shape[-2:], mode="area") > 0).to(latents.dtype)
            region = torch.where(region.flatten(1).any(1)[:, None, None, None], region, torch.ones_like(region))
        losses = {"denoise_loss": denoise_loss(prediction, target, region)}
        losses["attention_loss"] = self._attention_loss(captured, masks, valid, token_index, latents.shape[-2:])
        # the metric follows the supervised map: the class word's, unless only the subject tokens are supervised
        form = "subject" if cfg.attention_loss_tokens == "subject" else "text"
        measured = valid if form == "subject" else valid & (token_index >= 0)
        aspect, shares = latents.shape[-1] / latents.shape[-2], {}
        for layer in captured:
            subject_masks = masks_at(masks, layer.subject.shape[2], aspect)
            present = measured & (subject_masks.sum(-1) > 0)
            # NaN when no subject is present (the mean over none), so every batch reports the same metric
            # names; no branch on the value, so the step also runs on shape-only (meta) tensors
            shares.setdefault(layer.layer.split(".")[0].removesuffix("_blocks").removesuffix("_block"), []).append(
                inside_share(getattr(layer, form).detach(), subject_masks, present))
        # the share of the supervised attention inside the subject's mask, per UNet part (down / mid / up)
        losses.update({f"inside_share/{part}": torch.stack(values).nanmean() for part, values in shares.items()})
        losses["loss"] = losses["denoise_loss"] + cfg.attention_loss_weight * losses["attention_loss"]
        for key, form in (("attention_maps", "subject"), ("text_attention_maps", "text")) if return_attention_maps else ():
            maps = [self._as_image(getattr(layer, form).mean(1), latents.shape[-2:]) for layer in captured]
            losses[key] = (torch.stack(maps).mean(0) if maps
                           else latents.new_zeros(valid.shape[0], valid.shape[1], *latents.shape[-2:]).float()).detach()
        return losses

    def _attention_loss(self, captured: list[CapturedAttention], masks: torch.Tensor, valid: torch.Tensor,
                        token_index: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """The constraint, averaged over every (layer, form, subject) term that carries signal.

        A term is left out (not counted as zero) when its subject is padded, has no class word (text
        form), shares its sample with no other subject in a model without a null key (subject form: the
        map is then 1/K everywhere), or has vanished from the layer's mask.
        """
        cfg = self.config
        who = {"text": valid & (token_index >= 0),
               "subject": valid if cfg.subject_null_key else valid & (valid.sum(1, keepdim=True) >= 2)}
        forms = ["text", "subject"] if cfg.attention_loss_tokens == "both" else [cfg.attention_loss_tokens]
        aspect = latent_size[1] / latent_size[0]
        total, count = masks.new_zeros(()), masks.new_zeros(())
        for layer in captured:
            layer_masks = masks_at(masks, layer.subject.shape[2], aspect)
            for form in forms:
                term_sum, term_count = attention_constraint_sum(getattr(layer, form), layer_masks, who[form],
                                                                cfg.attention_loss_kind)
                total, count = total + term_sum, count + term_count
        return total / count.clamp(min=1.0)

    @staticmethod
    def _as_image(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B, N, S] attention over positions -> [B, S, h, w] at ``size`` (the latent grid)."""
        n = probs.shape[1]
        h = round((n * size[0] / size[1]) ** 0.5)
        grid = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], h, n // h)
        return F.interpolate(grid.float(), size=tuple(size), mode="bilinear", align_corners=False)


# -- what identifies a model, recorded in adapters ---------------------------------------------------
FINGERPRINT_KEYS = ("revision", "sha256")


def source_record(spec: ModelSpec) -> dict[str, Any]:
    """What identifies the model ``spec`` names, without where it runs: family, source, seed, options,
    and for a folder or a hub id in the local cache the hub revision and the content sha256 of its files.
    A generated model (tiny, random) is fixed by its seed."""
    record = spec.model_dump(mode="json", exclude={"device", "dtype"})
    if spec.is_tiny or spec.is_random:
        return record
    folder, revision = Path(spec.source).expanduser(), None
    if not folder.is_dir():
        try:  # a hub id: the snapshot in the local cache (never the network)
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec.source, local_files_only=True))
            revision = folder.name
        except Exception:  # noqa: BLE001 - not in the cache, or not a hub id: nothing here to hash
            return {**record, "revision": None, "sha256": None}
    return {**record, "revision": revision, "sha256": folder_sha256(folder)}


def spec_of(record: dict[str, Any]) -> ModelSpec:
    return ModelSpec.model_validate({k: v for k, v in record.items() if k not in FINGERPRINT_KEYS})


def check_source(recorded: dict[str, Any] | None, given: ModelSpec, what: str, config_path: Path) -> None:
    """Refuse ``given`` when it is not the model the adapter records (by content hash, or for generated
    models by source, seed and options); an adapter that records nothing is not checked."""
    if not recorded:
        return
    mine = source_record(given)
    if recorded.get("sha256"):
        if mine.get("sha256") != recorded["sha256"]:
            found = f"content sha256 {mine['sha256'][:16]}" if mine.get("sha256") else "no hashable files"
            raise ValueError(f"{config_path}: the {what} given ({given.source}) is not the one this adapter was "
                             f"trained with ({recorded.get('source')}, sha256 {recorded['sha256'][:16]}): {found}")
        return
    identity = ("family", "source", "seed", "options")
    if spec_of(recorded).is_tiny or spec_of(recorded).is_random:
        if any(mine.get(k) != recorded.get(k) for k in identity if k in recorded):
            raise ValueError(f"{config_path}: the {what} given ({given.source}, seed {given.seed}) is not the "
                             f"generated one this adapter was trained with ({recorded.get('source')}, seed "
                             f"{recorded.get('seed')})")

