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


class MMDiffPipeline:
    def __init__(self, model: MMDiffModel):
        self.model = model
        self.base = model.base_pipe

    @classmethod
    def from_pretrained(cls, base: ModelSpec | str | Path, adapter_dir: str | Path,
                        image_encoder: ModelSpec | None = None) -> "MMDiffPipeline":
        return cls(MMDiffModel.from_pretrained(base, adapter_dir, image_encoder).eval())

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

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], subjects: Sequence[Any] = (), *, subject_scale: float | None = None,
                 start_step: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", **base_kwargs: Any):
        """Generate images of ``subjects`` as ``prompt`` describes; returns the base pipeline's output (.images).

        ``subjects``: ``Subject(word, image)`` items, or plain images when the prompt marks the words
        as ``[word]`` (in the order of the images); shared by every prompt, or, with a list of prompts,
        one list per prompt (the same number in each), so that different requests run as one batch.
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

        ids, token_index = [], None
        for tokenizer in model.tokenizers:
            tokenized = [tokenize_with_subjects(tokenizer, p, s) for p, s in zip(prompts, spans)]
            ids.append(torch.stack([i for i, _ in tokenized]))
            token_index = torch.stack([t for _, t in tokenized]) if n_subjects else None
        plain_embeds, plain_pooled = model.encode_text(ids)
        embeds, pooled, conditioning = plain_embeds, plain_pooled, None
        if n_subjects:
            # subjects shared by every prompt are encoded once, not once per prompt
            rows = per_prompt[:1] if all(s is per_prompt[0] for s in per_prompt) else per_prompt
            pixels = torch.stack([subject_pixel_values(model.image_processor, i) for i in images[:len(rows)]])
            faces = None
            if cfg.portrait:
                if any(not isinstance(s, Subject) or s.face_embed is None for row in rows for s in row):
                    raise ValueError("portrait model: every subject needs Subject(word, image, face_embed), "
                                     "face_embed being the ArcFace embedding of the subject's face")
                faces = torch.stack([torch.stack([torch.as_tensor(s.face_embed, dtype=torch.float32) for s in row])
                                     for row in rows])
            valid = torch.ones(len(rows), n_subjects, dtype=torch.bool, device=model.device)
            cls_embeds, tokens = model.encode_subjects(pixels, valid, faces)
            cls_embeds, tokens = cls_embeds.expand(n_prompts, -1, -1), tokens.expand(n_prompts, -1, -1)
            valid = valid.expand(n_prompts, -1)
            embeds, pooled = model.encode_text(ids, token_index, valid, cls_embeds)
            tokens, valid = tokens.repeat_interleave(num_images_per_prompt, 0), valid.repeat_interleave(num_images_per_prompt, 0)
            if guidance_scale > 1.0:  # unconditional rows: no subjects
                tokens, valid = torch.cat([torch.zeros_like(tokens), tokens]), torch.cat([torch.zeros_like(valid), valid])
            conditioning = SubjectConditioning(tokens, valid, scale, cfg.num_tokens)

        cfg_on, repeat = guidance_scale > 1.0, num_images_per_prompt
        # This call's own kwargs: the step callback switches the subjects on in it at start_step.
        attention_kwargs: dict[str, Any] = {"subjects": conditioning if start <= 0 else None}

        def on_step_end(pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if conditioning is None or step != start - 1:
                return {}
            attention_kwargs["subjects"] = conditioning
            updates = {"prompt_embeds": self._swap(kwargs["prompt_embeds"], embeds, repeat, cfg_on)}
            if pooled is not None:
                updates["add_text_embeds"] = self._swap(kwargs["add_text_embeds"], pooled, repeat, cfg_on)
            return updates

        conditioned_now = conditioning is not None and start <= 0
        extra = {"pooled_prompt_embeds": pooled if conditioned_now else plain_pooled} if pooled is not None else {}
        inputs = ["prompt_embeds"] + (["add_text_embeds"] if pooled is not None else [])
        output = self._call_pipeline()(
            prompt_embeds=embeds if conditioned_now else plain_embeds, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, height=height, width=width, generator=generator,
            output_type="latent", cross_attention_kwargs=attention_kwargs, callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=inputs, **extra, **base_kwargs,
        )
        if output_type == "latent":
            return output
        return dataclasses.replace(output, images=self.decode(output.images, output_type))

    @staticmethod
    def _swap(current: torch.Tensor, conditioned: torch.Tensor, repeat: int, cfg_on: bool) -> torch.Tensor:
        """Replace the conditional half of the loop's (CFG-concatenated) embeddings."""
        conditioned = conditioned.repeat_interleave(repeat, dim=0).to(current.dtype)
        if not cfg_on:
            return conditioned
        return torch.cat([current[: current.shape[0] - conditioned.shape[0]], conditioned])
