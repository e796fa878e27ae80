"""MMDiffPipeline: ``pipe(prompt, subjects=[...])`` on top of the base diffusers pipeline.

The denoising loop is the base pipeline's own. MM-Diff supplies the vision-augmented prompt
embeddings and the subject tokens (through the UNet's ``cross_attention_kwargs``); a step-end callback
switches subject conditioning on at ``start_step`` (before it: the plain prompt and no subject
attention, as in the official code). Each call runs on its own pipeline object and scheduler and
decodes the latents itself, so calls may run concurrently.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmdiff.attention import SubjectConditioning
from mmdiff.modeling import MMDiffModel
from mmdiff.prompting import find_words, parse_markers, subject_pixel_values, tokenize_with_subjects
from mmdiff.zoo.spec import ModelSpec


@dataclass(frozen=True)
class Subject:
    """A reference image (PIL, uint8 array or path) tied to a word of the prompt ("dog")."""

    word: str
    image: Any
    face_embed: Any = None  # portrait variant: the ArcFace embedding (512 floats) of the face


def load_mmdiff_adapter(pipe: Any, adapter_dir: str | Path, image_encoder: ModelSpec | None = None) -> "MMDiffPipeline":
    """MM-Diff on a stock diffusers SD1.5 / SDXL pipeline, the way ``pipe.load_ip_adapter(...)`` adds
    IP-Adapter: the pipeline's UNet and text encoders get MM-Diff's layers and the adapter's weights (in
    place), the recorded image encoder is built on the pipeline's device and dtype, and the returned
    :class:`MMDiffPipeline` generates with subjects::

        pipe = StableDiffusionXLPipeline.from_pretrained(folder_or_hub_id, torch_dtype=torch.bfloat16).to("cuda")
        mm = load_mmdiff_adapter(pipe, "path/to/adapter")
        image = mm("a [dog] on the beach", [dog_photo]).images[0]

    The pipeline must be the base the adapter was trained on: its folder's content hash is checked.
    """
    return MMDiffPipeline(MMDiffModel.from_adapter(pipe, adapter_dir, image_encoder).eval())


class MMDiffPipeline:
    """``pipe(prompt, subjects)`` on an MM-Diff model. Build it with :meth:`from_pretrained` (an adapter
    folder, with or without another base) or :func:`load_mmdiff_adapter` (a stock diffusers pipeline);
    it keeps no per-call state, so one instance serves concurrent calls."""

    def __init__(self, model: MMDiffModel):
        self.model = model
        self.base = model.base_pipe

    @classmethod
    def from_pretrained(cls, pretrained: ModelSpec | str | Path, adapter_dir: str | Path | None = None,
                        image_encoder: ModelSpec | None = None, *, torch_dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None) -> "MMDiffPipeline":
        """``from_pretrained(folder)``: a folder written by :meth:`save_pretrained`, on the base model and
        image encoder it records (checked by content hash); ``from_pretrained(base, adapter_dir)``: that
        base (a ModelSpec, a diffusers folder or a hub id) with the adapter.

        ``torch_dtype`` and ``device`` place the whole model; without them the one-folder form follows
        :mod:`mmdiff.placement` (auto: the GPU in bf16 when there is one, else the CPU in fp32) and the
        two-argument form the base spec's own placement.
        """
        from mmdiff.placement import resolve_placement

        if adapter_dir is None:
            adapter_dir = pretrained
            base = MMDiffModel.recorded_spec(adapter_dir, "base")
            if base is None:
                raise ValueError(f"{adapter_dir}: records no base model; pass it: from_pretrained(base, adapter_dir)")
            device, torch_dtype = device or "auto", torch_dtype or "auto"
        else:
            base = pretrained
            if not isinstance(base, ModelSpec):
                family = MMDiffModel.read_adapter(adapter_dir)[1].base_family
                base = ModelSpec(family=family, source=str(base))
        if device is not None or torch_dtype is not None:
            dtype_name = str(torch_dtype).removeprefix("torch.") if torch_dtype is not None else None
            resolved, dtype_name = resolve_placement(str(device) if device is not None else base.device,
                                                     dtype_name or base.dtype, who="MMDiffPipeline.from_pretrained")
            base = base.model_copy(update={"device": resolved, "dtype": dtype_name})
        return cls(MMDiffModel.from_pretrained(base, adapter_dir, image_encoder).eval())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter (weights, config with the base and image encoder recorded, checksums): a
        folder :meth:`from_pretrained` loads on another machine that has the same base and encoder."""
        return self.model.save_pretrained(directory)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "MMDiffPipeline":
        """Move (and cast) the whole model; under float16 a ``force_upcast`` VAE stays in float32."""
        self.model.to(device=device, dtype=dtype)
        if dtype == torch.float16 and getattr(self.model.vae.config, "force_upcast", False):
            self.model.vae.to(torch.float32)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.unet.dtype

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options of the denoising loop's bar (``disable=False`` shows it; the zoo builds it off)."""
        self.base.set_progress_bar_config(**kwargs)

    def _resolve(self, prompts: list[str], subjects: Sequence[Any]) -> tuple[list[str], list[list[tuple[int, int]]], list[Any]]:
        """Prompts without markers, per-prompt subject spans, and the subjects' images."""
        marked = [parse_markers(p) for p in prompts]
        if any(spans for _, spans in marked):
            images = [s.image if isinstance(s, Subject) else s for s in subjects]
            for prompt, (_, spans) in zip(prompts, marked):
                if len(spans) != len(images):
                    raise ValueError(f"prompt {prompt!r} marks {len(spans)} subjects but {len(images)} "
                                     "subject images were given")
            return [text for text, _ in marked], [spans for _, spans in marked], images
        for i, s in enumerate(subjects):
            if not isinstance(s, Subject):
                raise ValueError(f"subject {i}: give Subject(word, image), or mark the words in the prompt "
                                 "as [word] and pass plain images")
        words = [s.word for s in subjects]
        return prompts, [find_words(p, words) for p in prompts], [s.image for s in subjects]

    def _call_pipeline(self) -> Any:
        """A pipeline object for one call: the base's components (shared, not copied) with a fresh scheduler.

        diffusers pipelines keep per-call state on themselves and their scheduler (timesteps, step
        index, guidance scale), so concurrent calls must not share one (diffusers' server example does
        the same).
        """
        base = self.base
        components = {**base.components, "scheduler": type(base.scheduler).from_config(base.scheduler.config)}
        parameters = inspect.signature(type(base).__init__).parameters
        options = {k: base.config[k] for k in parameters if k in base.config and k not in components}
        pipe = type(base)(**components, **options)
        pipe.set_progress_bar_config(**getattr(base, "_progress_bar_config", {}))
        return pipe

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> Any:
        """Latents -> images, with the VAE in its own dtype (fp32 for a force_upcast VAE under an fp16 base)."""
        vae = self.model.vae
        config = vae.config
        latents = latents.to(vae.dtype)
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = vae.decode(latents).sample
        watermark = getattr(self.base, "watermark", None)
        if watermark is not None:
            image = watermark.apply_watermark(image)
        return self.base.image_processor.postprocess(image, output_type=output_type)

    def _encode_subjects(self, rows: list[list[Any]], images: list[list[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's subjects -> (CLS embeddings [R, S, E], subject tokens [R, S*K, D]).

        A subject may have several reference images (a list): each is encoded on its own and the subject
        is the mean of its references' CLS embeddings and of its K tokens (a portrait subject's
        ``face_embed`` is one embedding for all its references, or one per reference). With one
        reference the mean is that reference's own output.
        """
        model, cfg = self.model, self.model.config
        refs = [[list(ref) if isinstance(ref, (list, tuple)) else [ref] for ref in row] for row in images]
        names, flat, spans = [], [], []
        for row in refs:
            for j, subject_refs in enumerate(row):
                if not subject_refs:
                    raise ValueError(f"subject {j}: no reference image given")
                spans.append((len(flat), len(flat) + len(subject_refs)))
                flat += subject_refs
                names += [f"subject {j}" if len(subject_refs) == 1 else f"subject {j} reference {r}"
                          for r in range(len(subject_refs))]
        pixels = subject_pixel_values(model.image_processor, flat, model.subject_fill, names)
        faces = None
        if cfg.portrait:
            if any(not isinstance(s, Subject) or s.face_embed is None for row in rows for s in row):
                raise ValueError("portrait model: every subject needs Subject(word, image, face_embed), "
                                 "face_embed being the ArcFace embedding of the subject's face")
            faces = []
            for subject, (a, b) in zip((s for row in rows for s in row), spans):
                embed = torch.as_tensor(subject.face_embed, dtype=torch.float32)
                embed = embed.expand(b - a, -1) if embed.ndim == 1 else embed
                if embed.shape[0] != b - a:
                    raise ValueError(f"subject {subject.word!r}: {embed.shape[0]} face embeddings for {b - a} "
                                     "reference images (give one for all, or one per reference)")
                faces.append(embed)
            faces = torch.cat(faces)[:, None]
        valid = torch.ones(len(flat), 1, dtype=torch.bool, device=model.device)
        cls_embeds, tokens = model.encode_subjects(pixels[:, None], valid, faces)  # every reference on its own
        cls_embeds = torch.stack([cls_embeds[a:b, 0].mean(0) for a, b in spans])
        tokens = torch.stack([tokens[a:b].mean(0) for a, b in spans])
        n_rows, n_subjects = len(rows), len(rows[0])
        return cls_embeds.view(n_rows, n_subjects, -1), tokens.view(n_rows, n_subjects * tokens.shape[1], -1)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], subjects: Sequence[Any] = (), *, subject_scale: float | None = None,
                 start_step: int | None = None, num_inference_steps: int = 25, guidance_scale: float = 5.0,
                 negative_prompt: str | list[str] | None = None, fuse_negative_prompt: bool = True,
                 num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None, output_type: str = "pil",
                 **base_kwargs: Any):
        """Generate images of ``subjects`` as ``prompt`` describes; returns the base pipeline's output (.images).

        ``subjects``: ``Subject(word, image)`` items, or plain images when the prompt marks the words
        as ``[word]`` (in the order of the images); shared by every prompt, or, with a list of prompts,
        one list per prompt (the same number in each), so that different requests run as one batch.
        ``Subject(word, [image, image, ...])`` gives a subject several reference images.
        The defaults are the official code's (25 steps, guidance 5.0, the model's ``start_step``, 0 in
        the shipped configs, and ``fuse_negative_prompt``: the subjects' image embeddings are fused into
        the negative prompt at the subject words' token positions, as the official pipeline's second
        prompt encoding does; an empty SDXL negative prompt stays the base's zeros, as there).
        ``seed`` makes a fresh generator. Safe to call from several threads at once.
        """
        model, cfg = self.model, self.model.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty")
        per_prompt = [list(s) for s in subjects] if subjects and all(isinstance(s, (list, tuple)) for s in subjects) \
            else [list(subjects)] * len(prompts)
        if len(per_prompt) != len(prompts) or len({len(s) for s in per_prompt}) != 1:
            raise ValueError(f"per-prompt subjects: {len(per_prompt)} lists of {sorted({len(s) for s in per_prompt})} "
                             f"subjects for {len(prompts)} prompts; give one list per prompt, all the same length")
        if len(per_prompt[0]) > cfg.max_subjects:
            raise ValueError(f"{len(per_prompt[0])} subjects given, this model supports at most {cfg.max_subjects}")
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        resolved = [self._resolve([p], s) for p, s in zip(prompts, per_prompt)]
        prompts, spans = [r[0][0] for r in resolved], [r[1][0] for r in resolved]
        images = [r[2] for r in resolved]
        scale = cfg.subject_scale if subject_scale is None else subject_scale
        start = cfg.start_step if start_step is None else start_step
        if images[0] and start >= num_inference_steps:
            raise ValueError(f"start_step={start} is not below num_inference_steps={num_inference_steps}: the "
                             "subjects would never be used (lower start_step, or pass no subjects)")
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        n_prompts, n_subjects = len(prompts), len(images[0])
        cfg_on, repeat = guidance_scale > 1.0, num_images_per_prompt
        # SDXL's empty negative prompt is zeros (force_zeros_for_empty_prompt): nothing to fuse into
        zero_negative = negatives is None and bool(self.base.config.get("force_zeros_for_empty_prompt", False))
        fuse_negative = fuse_negative_prompt and n_subjects > 0 and cfg_on and not zero_negative

        ids, negative_ids, token_index = [], [], None
        for tokenizer in model.tokenizers:
            tokenized = [tokenize_with_subjects(tokenizer, p, s) for p, s in zip(prompts, spans)]
            ids.append(torch.stack([i for i, _ in tokenized]))
            token_index = torch.stack([t for _, t in tokenized]) if n_subjects else None
            if fuse_negative:
                negative_ids.append(torch.stack([tokenize_with_subjects(tokenizer, n, [])[0]
                                                 for n in negatives or [""] * n_prompts]))
        plain_embeds, plain_pooled = model.encode_text(ids)
        embeds, pooled, conditioning = plain_embeds, plain_pooled, None
        negative = plain_negative = None  # (embeds, pooled) when this call computes the negative prompt's
        if n_subjects:
            # subjects shared by every prompt are encoded once, not once per prompt
            rows = per_prompt[:1] if all(s is per_prompt[0] for s in per_prompt) else per_prompt
            cls_embeds, tokens = self._encode_subjects(rows, images[:len(rows)])
            cls_embeds, tokens = cls_embeds.expand(n_prompts, -1, -1), tokens.expand(n_prompts, -1, -1)
            valid = torch.ones(n_prompts, n_subjects, dtype=torch.bool, device=model.device)
            embeds, pooled = model.encode_text(ids, token_index, valid, cls_embeds)
            if fuse_negative:
                plain_negative = model.encode_text(negative_ids)
                negative = model.encode_text(negative_ids, token_index, valid, cls_embeds)
            tokens, valid = tokens.repeat_interleave(repeat, 0), valid.repeat_interleave(repeat, 0)
            if cfg_on:  # unconditional rows: no subjects
                tokens, valid = torch.cat([torch.zeros_like(tokens), tokens]), torch.cat([torch.zeros_like(valid), valid])
            conditioning = SubjectConditioning(tokens, valid, scale, cfg.num_tokens)

        # This call's own kwargs: the step callback switches the subjects on in it at start_step.
        attention_kwargs: dict[str, Any] = {"subjects": conditioning if start <= 0 else None}

        def on_step_end(pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if conditioning is None or step != start - 1:
                return {}
            attention_kwargs["subjects"] = conditioning
            updates = {"prompt_embeds": self._swap(kwargs["prompt_embeds"], embeds, repeat, cfg_on,
                                                   negative and negative[0])}
            if pooled is not None:
                updates["add_text_embeds"] = self._swap(kwargs["add_text_embeds"], pooled, repeat, cfg_on,
                                                        negative and negative[1])
            return updates

        conditioned_now = conditioning is not None and start <= 0
        extra = {"pooled_prompt_embeds": pooled if conditioned_now else plain_pooled} if pooled is not None else {}
        if negative is not None:  # this call's negative embeddings, fused once the subjects are on
            negative_now = negative if conditioned_now else plain_negative
            extra["negative_prompt_embeds"] = negative_now[0]
            if pooled is not None:
                extra["negative_pooled_prompt_embeds"] = negative_now[1]
        else:
            extra["negative_prompt"] = negatives
        inputs = ["prompt_embeds"] + (["add_text_embeds"] if pooled is not None else [])
        output = self._call_pipeline()(
            prompt_embeds=embeds if conditioned_now else plain_embeds,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, height=height, width=width, generator=generator,
            output_type="latent", cross_attention_kwargs=attention_kwargs, callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=inputs, **extra, **base_kwargs,
        )
        if output_type == "latent":
            return output
        return dataclasses.replace(output, images=self.decode(output.images, output_type))

    @staticmethod
    def _swap(current: torch.Tensor, conditioned: torch.Tensor, repeat: int, cfg_on: bool,
              negative: torch.Tensor | None = None) -> torch.Tensor:
        """Replace the conditional half of the loop's (CFG-concatenated) embeddings, and the unconditional
        half too when ``negative`` is given (the negative prompt with the subjects fused)."""
        conditioned = conditioned.repeat_interleave(repeat, dim=0).to(current.dtype)
        if not cfg_on:
            return conditioned
        kept = current[: current.shape[0] - conditioned.shape[0]]
        if negative is not None:
            kept = negative.repeat_interleave(repeat, dim=0).to(current.dtype)
        return torch.cat([kept, conditioned])
