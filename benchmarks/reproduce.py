"""A miniature reproduction of MM-Diff's claims on generated scenes, end to end on CPU.

Claims tested: (1) subject embeddings give fidelity to a reference without tuning, on identities never
seen in training; (2) the cross-attention constraint lets two subjects appear without layout and without
leaking into each other. The design and the metrics are fixed here, before any result:

* Data: 32 px scenes on grey with exact masks. Three shape classes with single-token words (square "dog",
  disc "cat", triangle "car"). An identity is a colour and a pattern (8 x 7 = 56): 40 for training, 16
  held out. A reference is the same identity rendered alone, at another size and place, cropped.
* Models: a tiny SD1.5-layout base (VAE fitted as an autoencoder on scenes; UNet and tiny text encoder
  trained from scratch together on class-only captions; then all frozen);
  a tiny CLIP tower pretrained to classify the 40 training identities only; MM-Diff adapters trained
  through the real ``MMDiffModel``, shards in the real format (``Sample.to_wds``) read by the real
  ``ShardStream``/``BatchBuilder``, stepped by the real ``Trainer`` on a DeepSpeed engine (1 CPU rank).
* Conditions: no constraint (weight 0), text map only, both maps (the shipped setting); a control with
  random boxes as masks; each at ``--seeds`` seeds. References and noise are paired across conditions.
  (``--conditions`` runs a subset and ``--constraint-weight`` sets the constrained ones' weight, for sweeps.)
* Metrics: a separate judge (a small CNN trained on fresh single-object renders of all 56 identities at
  random slight blur, shown the object's pixels and its silhouette; it must reach >= 95 % on fresh sharp
  renders in identity and in class, or its figures are marked invalid) gives identity and class of
  generated objects; dominant colour cross-checks identity. The judge's reading of the VAE's own
  reconstructions of held-out renders is reported as the ceiling any generation through the base can
  reach. (Revised after the first full run: its judge was scored on identity only and, measured
  afterwards, told the class of fresh renders in only ~72 % of cases, so that run's quality gate measured
  the judge as much as the base; the thresholds did not change.) Fidelity = the judged identity of a
  held-out single-subject generation equals its reference's, against no-adapter (subject scale 0) and
  shuffled-reference (another held-out identity's reference, scored against the intended one) baselines,
  each made with the adapter under test (named ``no_adapter[none]`` etc.; the shipped "both" condition's
  keep the plain names). (Revised after the second full run: its baselines came from the "both" adapter
  only, so the "none" adapter's fidelity had no baselines of its own.)
  Two-subject prompts, same class ("a dog and a dog") and cross class ("a dog and a car"): objects found as
  connected non-background regions; missing (< 2 objects), merged (one region holding both references'
  colours), wrong class, leak (an object's identity is neither reference's) and collapse (both objects
  take the same reference's identity). Quality gate: the base alone must draw the prompted class
  (judged) in >= 60 % of single-object samples before adapter results count. (Revised after the third
  full run: the gate read the "both" adapter at subject scale 0, whose LoRA and fused word embeddings
  stay active, 0.28, while the unconstrained adapter at scale 0 drew the class in 0.62; it now samples
  the frozen base as a plain diffusers pipeline.)
* Output: bootstrap 95 % CIs resampling reference pairs (clusters), JSON and a PNG (sample grids and
  bars) under ``benchmarks/results/``.

``--quick`` runs every stage at toy sizes, with the "none" and "both" conditions only; ``--smoke`` runs one
step of every stage with the "both" condition and its baselines only (the CI smoke, seconds). Both check
the machinery, not the claims.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

SIZE, REF = 32, 32
BACKGROUND = (128, 128, 128)
CLASSES = ["dog", "cat", "car"]  # square, disc, triangle: single tokens of the tiny tokenizer
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "magenta": (210, 50, 200), "cyan": (40, 200, 210), "orange": (240, 140, 30), "white": (245, 245, 245)}
PATTERNS = ["solid", "hstripes", "vstripes", "checker", "dots", "ring", "diagonal"]
IDENTITIES = [(c, p) for c in COLOURS for p in PATTERNS]  # 56
RESULTS = Path("benchmarks/results")
JUDGE_MAX_SIGMA = 0.5  # pixels


@dataclass(frozen=True)
class Sizes:
    """Every step count and sample count of a run (``--quick`` or full)."""

    vae_steps: int = 1000
    base_steps: int = 3000
    encoder_steps: int = 600
    judge_steps: int = 1200
    judge_eval: int = 512  # fresh renders the judge is scored on
    adapter_steps: int = 600
    train_scenes: int = 2000
    references: int = 16  # held-out reference pairs per evaluation
    gen_steps: int = 20
    batch: int = 8
    seeds: int = 2
    bootstrap: int = 1000


QUICK = Sizes(vae_steps=4, base_steps=4, encoder_steps=4, judge_steps=4, judge_eval=16, adapter_steps=2, train_scenes=8,
              references=2, gen_steps=2, batch=2, seeds=1, bootstrap=50)
# one step of everything, one reference pair: the CI smoke of the whole path (seconds)
SMOKE = Sizes(vae_steps=1, base_steps=1, encoder_steps=1, judge_steps=1, judge_eval=8, adapter_steps=1, train_scenes=4,
              references=1, gen_steps=1, batch=2, seeds=1, bootstrap=20)


def split_identities(seed: int = 0) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed).permutation(len(IDENTITIES))
    return sorted(order[:40].tolist()), sorted(order[40:].tolist())


# -- rendering -----------------------------------------------------------------------------------
def shape_mask(cls: str, side: int, y0: int, x0: int, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    if cls == "dog":
        return (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
    if cls == "cat":
        return (yy - y0 - side / 2 + 0.5) ** 2 + (xx - x0 - side / 2 + 0.5) ** 2 <= (side / 2) ** 2
    # triangle, apex up
    rel_y = (yy - y0) / max(side - 1, 1)
    half = rel_y * side / 2
    return (yy >= y0) & (yy < y0 + side) & (np.abs(xx - x0 - side / 2 + 0.5) <= half)


def paint(image: np.ndarray, mask: np.ndarray, identity: int) -> None:
    """Fills ``mask`` with the identity's colour, its pattern drawn in a darker shade of the same colour."""
    colour, pattern = IDENTITIES[identity]
    base = np.array(COLOURS[colour], np.float32)
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.mean(), xs.mean()) if len(ys) else (0, 0)
    marks = {"solid": np.zeros_like(mask), "hstripes": (yy // 2) % 2 == 0, "vstripes": (xx // 2) % 2 == 0,
             "checker": ((yy // 2) + (xx // 2)) % 2 == 0, "dots": (yy % 3 == 0) & (xx % 3 == 0),
             "ring": np.abs(np.hypot(yy - cy, xx - cx) - 3) < 1.0, "diagonal": ((yy + xx) // 2) % 2 == 0}[pattern]
    image[mask] = base.astype(np.uint8)
    image[mask & marks] = (base * 0.45).astype(np.uint8)


def render(objects: list[tuple[str, int]], rng: np.random.Generator, size: int = SIZE,
           side_range: tuple[int, int] = (10, 15)) -> tuple[np.ndarray, np.ndarray]:
    """Objects (class, identity) at random places, one per horizontal half when two -> image, masks [n, H, W]."""
    image = np.full((size, size, 3), BACKGROUND, np.uint8)
    masks = np.zeros((len(objects), size, size), bool)
    halves = rng.permutation(2) if len(objects) == 2 else [None]
    for i, (cls, identity) in enumerate(objects):
        side = int(rng.integers(*side_range))
        if halves[i] is None:
            x0 = int(rng.integers(0, size - side + 1))
        else:
            x0 = int(halves[i]) * size // 2 + int(rng.integers(0, max(1, size // 2 - side + 1)))
        y0 = int(rng.integers(0, size - side + 1))
        masks[i] = shape_mask(cls, side, y0, x0, size)
        paint(image, masks[i], identity)
    return image, masks


def reference(cls: str, identity: int, rng: np.random.Generator) -> np.ndarray:
    """The identity alone, larger than in scenes and elsewhere, cut to its box on white [REF, REF, 3]."""
    image, masks = render([(cls, identity)], rng, size=48, side_range=(20, 30))
    ys, xs = np.nonzero(masks[0])
    crop = np.where(masks[0][..., None], image, 255)[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return np.asarray(Image.fromarray(crop).resize((REF, REF), Image.BICUBIC))


def caption(classes: list[str]) -> tuple[str, list[tuple[int, int]]]:
    text = " and ".join(f"a {c}" for c in classes)
    spans, at = [], 0
    for c in classes:
        start = text.index(c, at)
        spans.append((start, start + len(c)))
        at = start + len(c)
    return text, spans


# -- models --------------------------------------------------------------------------------------
class Judge(torch.nn.Module):
    """The separate identity-and-class classifier of generated objects (object crops on grey, 32 px). It sees
    the object's silhouette (the foreground test that finds objects) beside its pixels: from colour alone a
    CNN of this size tells the shapes apart in only ~70 % of fresh renders."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.identity = torch.nn.Linear(64, len(IDENTITIES))
        self.cls = torch.nn.Linear(64, len(CLASSES))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images)
        return self.identity(h), self.cls(h)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def foreground(image: np.ndarray) -> np.ndarray:
    """Pixels that differ from the background [..., H, W] (how objects are found in generated images)."""
    return np.abs(image.astype(np.int16) - np.array(BACKGROUND)).max(-1) > 40


def judge_input(images: np.ndarray) -> torch.Tensor:
    """The judge's input [B, 4, H, W]: pixels in [-1, 1] and the foreground silhouette in {-1, 1}."""
    silhouette = torch.from_numpy(foreground(images)).float()[:, None] * 2 - 1
    return torch.cat([to_tensor(images), silhouette], 1)


def single_objects(rng: np.random.Generator, n: int, identities: list[int]):
    labels = [(int(rng.integers(len(CLASSES))), int(rng.choice(identities))) for _ in range(n)]
    images = np.stack([render([(CLASSES[c], i)], rng)[0] for c, i in labels])
    return images, torch.tensor([i for _, i in labels]), torch.tensor([c for c, _ in labels])


def one_cycle(optimizer: torch.optim.Optimizer, steps: int, warmup: float = 0.05):
    """The optimizer's rate warmed up over the first ``warmup`` of ``steps``, then annealed (one cycle)."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, optimizer.param_groups[0]["lr"], total_steps=steps,
                                               pct_start=warmup)


def soften(images: np.ndarray, rng: np.random.Generator, max_sigma: float) -> np.ndarray:
    """Each image blurred at its own random sigma in [0, max_sigma] (the softness of a generated object)."""
    sigmas = rng.uniform(0, max_sigma, len(images))
    return np.stack([ndimage.gaussian_filter(im.astype(np.float32), (s, s, 0)) for im, s in zip(images, sigmas)]
                    ).round().astype(np.uint8)


def train_judge(sizes: Sizes, rng: np.random.Generator) -> tuple[Judge, dict[str, float]]:
    """The judge, trained on renders of all identities at random slight blur (generated objects are soft;
    a judge of sharp renders only calls many of them by the wrong class); scored on fresh sharp renders."""
    judge = Judge()
    optimizer = torch.optim.Adam(judge.parameters(), lr=2e-3)
    schedule = one_cycle(optimizer, sizes.judge_steps, warmup=0.1)
    every = list(range(len(IDENTITIES)))
    for _ in range(sizes.judge_steps):
        images, ids, classes = single_objects(rng, sizes.batch * 4, every)
        images = soften(images, rng, JUDGE_MAX_SIGMA)
        logits_id, logits_cls = judge(judge_input(images))
        loss = F.cross_entropy(logits_id, ids) + F.cross_entropy(logits_cls, classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    images, ids, classes = single_objects(np.random.default_rng(10_000), sizes.judge_eval, every)  # fresh renders
    with torch.no_grad():
        logits_id, logits_cls = judge(judge_input(images))
    accuracy = {"identity": float((logits_id.argmax(1) == ids).float().mean()),
                "class": float((logits_cls.argmax(1) == classes).float().mean())}
    return judge.eval(), accuracy


def fit_autoencoder(vae, images, steps: int, annealed: bool = False) -> float:
    """Fits ``vae`` as an autoencoder on batches from ``images()`` [B, 3, H, W] in [-1, 1] and freezes it;
    returns the scaling factor that gives its latents unit variance (as real bases ship it). ``annealed``
    warms the learning rate up and anneals it (reconstruction MSE about half the constant rate's)."""
    vae.requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3 if annealed else 1e-3)
    schedule = one_cycle(optimizer, steps) if annealed else None
    for _ in range(steps):
        pixels = images()
        posterior = vae.encode(pixels).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        return 1 / vae.encode(images()).latent_dist.mean.std().item()


def fit_vae(pipe, sizes: Sizes, rng: np.random.Generator, train_ids: list[int]) -> None:
    def images() -> torch.Tensor:
        return to_tensor(np.stack([scene(rng, train_ids)[0] for _ in range(2 * sizes.batch)]))

    pipe.vae.register_to_config(scaling_factor=fit_autoencoder(pipe.vae, images, sizes.vae_steps, annealed=True))


def autoencoder_ceiling(vae, judge: Judge, held_out: list[int], n: int) -> dict[str, float]:
    """What the judge reads from the VAE's reconstructions of fresh single-object renders of held-out
    identities: the most any generation through this base can score (its 8x8 latent cannot keep every
    2-pixel pattern, so identity is capped well below the judge's own accuracy)."""
    images, ids, classes = single_objects(np.random.default_rng(20_000), n, held_out)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    scores = {"identity": 0, "class": 0, "colour": 0}
    for image, identity, klass in zip(decoded, ids.tolist(), classes.tolist()):
        regions = objects_in(image)
        if regions:
            judged_id, judged_cls, colour = judge_region(judge, image, regions[0])
            scores["identity"] += judged_id == identity
            scores["class"] += judged_cls == klass
            scores["colour"] += colour == IDENTITIES[identity][0]
    return {k: v / n for k, v in scores.items()}


def scene(rng: np.random.Generator, identities: list[int]):
    """A training scene: one or two objects (any classes) of the given identities."""
    n = int(rng.integers(1, 3))
    objects = [(CLASSES[int(rng.integers(len(CLASSES)))], int(rng.choice(identities))) for _ in range(n)]
    image, masks = render(objects, rng)
    return image, masks, objects


def train_base(pipe, sizes: Sizes, rng: np.random.Generator, train_ids: list[int]) -> None:
    """The UNet and the text encoder from scratch on class-only captions (the identities appear, their names
    never do), then both frozen."""
    unet, tokenizer, text_encoder = pipe.unet.requires_grad_(True), pipe.tokenizer, pipe.text_encoder
    text_encoder.requires_grad_(True).train()
    scheduler = pipe.scheduler
    optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=1e-3)
    schedule = one_cycle(optimizer, sizes.base_steps)
    for _ in range(sizes.base_steps):
        scenes = [scene(rng, train_ids) for _ in range(sizes.batch)]
        ids = tokenizer([caption([c for c, _ in s[2]])[0] for s in scenes], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        drop = torch.rand(len(scenes)) < 0.1  # unconditional rows for classifier-free guidance
        ids[drop] = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids
        with torch.no_grad():
            latents = pipe.vae.encode(to_tensor(np.stack([s[0] for s in scenes]))).latent_dist.sample()
            latents = latents * pipe.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(scenes),))
        loss = F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    unet.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()


def train_encoder(vision, processor, sizes: Sizes, rng: np.random.Generator, train_ids: list[int]) -> None:
    """The CLIP tower pretrained to classify references of the training identities only."""
    vision.requires_grad_(True)
    head = torch.nn.Linear(vision.config.projection_dim, len(IDENTITIES))
    optimizer = torch.optim.Adam([*vision.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(sizes.encoder_steps):
        labels = [(CLASSES[int(rng.integers(len(CLASSES)))], int(rng.choice(train_ids))) for _ in range(16)]
        pixels = processor(images=[reference(c, i, rng) for c, i in labels], return_tensors="pt").pixel_values
        loss = F.cross_entropy(head(vision(pixel_values=pixels).image_embeds), torch.tensor([i for _, i in labels]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vision.requires_grad_(False).eval()


# -- adapter training through the real shards and loop -------------------------------------------
def write_shards(folder: Path, sizes: Sizes, rng: np.random.Generator, train_ids: list[int],
                 random_masks: bool) -> Path:
    from preprocess.sample import Entity, Sample

    (folder / "shards").mkdir(parents=True, exist_ok=True)
    per_shard = 500
    for start in range(0, sizes.train_scenes, per_shard):
        with tarfile.open(folder / "shards" / f"shard-{start // per_shard:06d}.tar", "w") as tar:
            for index in range(start, min(start + per_shard, sizes.train_scenes)):
                image, masks, objects = scene(rng, train_ids)
                text, spans = caption([c for c, _ in objects])
                if random_masks:  # the control: a box of each mask's size at a random place
                    masks = np.stack([random_box(m, rng) for m in masks])
                entities = []
                for m, (s0, s1), (cls, _) in zip(masks, spans, objects):
                    ys, xs = np.nonzero(m)
                    entities.append(Entity(cls, cls, s0, s1, s0, s1,
                                           (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)), 1.0))
                crops = np.stack([reference(cls, identity, rng) for cls, identity in objects])
                sample = Sample(f"{index:06d}", Image.fromarray(image), text, entities, masks, crops)
                members = sample.to_wds()
                key = members.pop("__key__")
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    (folder / "manifest.json").write_text(json.dumps({"written": sizes.train_scenes, "manifest_hash": folder.name}))
    return folder


def random_box(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A box of the mask's bounding-box size at a random place (the random-mask control's wrong mask)."""
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    y0, x0 = int(rng.integers(0, mask.shape[0] - h + 1)), int(rng.integers(0, mask.shape[1] - w + 1))
    box = np.zeros_like(mask)
    box[y0:y0 + h, x0:x0 + w] = True
    return box


@contextlib.contextmanager
def single_rank():
    """A one-process gloo group for the DeepSpeed engine (made here, so destroyed here, through DeepSpeed so
    that it forgets its cached groups too: a later engine in the same process, another run or test, would
    otherwise use the destroyed ones)."""
    import deepspeed
    import deepspeed.comm
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        yield
    finally:
        deepspeed.comm.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train_adapter(base_state: dict, condition: dict, shards: Path, sizes: Sizes, seed: int, work: Path):
    """MMDiffModel on the frozen base, trained by the real Trainer on the real shards."""
    from mmdiff import MMDiffConfig, MMDiffModel
    from mmdiff.configuration import load_config
    from train.config import TrainConfig
    from train.data import BatchBuilder, ShardStream
    from train.engine import Trainer, TrainerState
    from train.run import make_engine

    settings = load_config("configs/mmdiff/tiny_sd15.yaml", MMDiffConfig, {
        **{k: condition[k] for k in ("attention_loss_tokens", "attention_loss_weight")}, "start_step": 0})
    config = load_config("configs/train/tiny_test.yaml", TrainConfig, {
        "output_dir": str(work / "run"), "seed": seed, "data.shards": str(shards), "data.resolution": SIZE,
        "data.micro_batch_size": sizes.batch, "data.cached_latents": False, "data.text_dropout": 0.05,
        "data.subject_dropout": 0.05, "optim.lr": 1e-3, "optim.lr_warmup_steps": 0, "optim.lr_schedule": "constant",
        "deepspeed.zero_stage": 0, "deepspeed.precision": "fp32", "schedule.max_steps": sizes.adapter_steps})
    pipe, vision = build_base(base_state)
    torch.manual_seed(seed)
    model = MMDiffModel(pipe, vision, settings)
    trainer = Trainer(config, make_engine(config, model), TrainerState())
    stream = iter(ShardStream(shards, config.data, BatchBuilder(config.data, model.tokenizers, model.image_processor),
                              seed))
    losses = []
    while trainer.state.micro_batches < sizes.adapter_steps:
        metrics = trainer.micro_step(next(stream))
        if metrics:
            losses.append(metrics)
    return model.eval(), losses


def build_base(state: dict):
    from mmdiff import zoo
    from mmdiff.zoo.spec import ModelSpec

    pipe = zoo.build(ModelSpec(family="sd15", source="tiny", seed=0))
    vision = zoo.build(ModelSpec(family="clip_vision", source="tiny", seed=0))
    if state:
        pipe.vae.load_state_dict(state["vae"])
        pipe.vae.register_to_config(scaling_factor=state["scaling_factor"])
        pipe.unet.load_state_dict(state["unet"])
        pipe.text_encoder.load_state_dict(state["text_encoder"])
        vision.model.load_state_dict(state["vision"])
    return pipe, vision


# -- evaluation ----------------------------------------------------------------------------------
def objects_in(image: np.ndarray) -> list[np.ndarray]:
    """Connected regions that differ from the background, largest first, each at least 12 pixels."""
    labels, n = ndimage.label(foreground(image))
    regions = [labels == i for i in range(1, n + 1)]
    return sorted((r for r in regions if r.sum() >= 12), key=lambda r: -r.sum())


def judge_region(judge: Judge, image: np.ndarray, region: np.ndarray) -> tuple[int, int, str]:
    """(identity, class, dominant colour name) of one object, shown to the judge alone on grey."""
    alone = np.where(region[..., None], image, np.array(BACKGROUND, np.uint8))
    with torch.no_grad():
        logits_id, logits_cls = judge(judge_input(alone[None]))
    pixels = image[region].astype(np.float32)
    bright = pixels[pixels.sum(1) >= np.percentile(pixels.sum(1), 50)]  # the base colour, not the darker pattern
    names = list(COLOURS)
    colour = names[int(np.argmin([np.abs(bright.mean(0) - np.array(COLOURS[n])).sum() for n in names]))]
    return int(logits_id.argmax()), int(logits_cls.argmax()), colour


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A pipeline's float output in [0, 1] as the uint8 pixels the judge and the figure take."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def evaluate(pipe, judge: Judge, sizes: Sizes, held_out: list[int], seed: int, subject_scale: float | None = None,
             shuffled: bool = False) -> dict:
    """Single-subject fidelity and two-subject outcomes on held-out references (paired by ``seed``)."""
    from mmdiff import Subject

    rng = np.random.default_rng(1000 + seed)
    single, pairs = [], []
    kw = dict(num_inference_steps=sizes.gen_steps, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np",
              start_step=0)
    if subject_scale is not None:
        kw["subject_scale"] = subject_scale
    for r in range(sizes.references):
        cls = CLASSES[r % len(CLASSES)]
        a, b = [int(i) for i in rng.choice(held_out, 2, replace=False)]
        ref_a, ref_b = reference(cls, a, rng), reference(cls, b, rng)
        shown = ref_b if shuffled else ref_a
        image = pipe(f"a {cls}", [Subject(cls, shown)], seed=seed * 1000 + r, **kw).images[0]
        image = to_uint8(image)
        regions = objects_in(image)
        record = {"pair": r, "target": a, "found": bool(regions), "image": image}
        if regions:
            identity, klass, colour = judge_region(judge, image, regions[0])
            record.update(identity_ok=identity == a, class_ok=CLASSES[klass] == cls,
                          colour_ok=colour == IDENTITIES[a][0])
        single.append(record)
        for same in (True, False):
            other = cls if same else CLASSES[(CLASSES.index(cls) + 1) % len(CLASSES)]
            ref_other = reference(other, b, rng)
            prompt = f"a {cls} and a {other}"
            image = pipe(prompt, [Subject(cls, ref_a), Subject(other, ref_other)], seed=seed * 1000 + r, **kw).images[0]
            image = to_uint8(image)
            pairs.append({"pair": r, "same_class": same, **two_subject_outcome(judge, image, (a, b), (cls, other)),
                          "image": image})
    return {"single": single, "pairs": pairs}


def two_subject_outcome(judge: Judge, image: np.ndarray, identities: tuple[int, int], classes: tuple[str, str]) -> dict:
    regions = objects_in(image)[:2]
    judged = [judge_region(judge, image, r) for r in regions]
    colours = {IDENTITIES[i][0] for i in identities}
    merged = len(regions) == 1 and len(colours) == 2 and colours <= _colours_in(image, regions[0])
    found = [j[0] for j in judged]
    return {
        "missing": len(regions) < 2 and not merged,
        "merged": merged,
        "wrong_class": len(regions) == 2 and sorted(CLASSES[j[1]] for j in judged) != sorted(classes),
        "leak": any(i not in identities for i in found),
        "collapse": len(found) == 2 and found[0] == found[1] and found[0] in identities,
    }


def _colours_in(image: np.ndarray, region: np.ndarray) -> set[str]:
    pixels = image[region].astype(np.float32)
    near = [min(COLOURS, key=lambda n: np.abs(p - np.array(COLOURS[n])).sum()) for p in pixels]
    counts = {n: near.count(n) for n in set(near)}
    return {n for n, c in counts.items() if c >= 0.2 * len(near)}


def base_alone(pipe, judge: Judge, sizes: Sizes) -> list[dict]:
    """The quality gate's samples: the frozen base as a plain diffusers pipeline, no adapter weights at all
    (an adapter at subject scale 0 still carries its LoRA and fused word embeddings), prompted "a <class>"."""
    records = []
    for seed in range(sizes.seeds):
        for r in range(sizes.references):
            cls = CLASSES[r % len(CLASSES)]
            image = pipe(f"a {cls}", num_inference_steps=sizes.gen_steps, guidance_scale=5.0, height=SIZE, width=SIZE,
                         output_type="np", generator=torch.Generator().manual_seed(seed * 1000 + r)).images[0]
            image = to_uint8(image)
            regions = objects_in(image)
            record = {"pair": (seed, r), "image": image}
            if regions:
                record["class_ok"] = CLASSES[judge_region(judge, image, regions[0])[1]] == cls
            records.append(record)
    return records


def rate(records: list[dict], key: str, rng: np.random.Generator, draws: int) -> dict:
    """Mean of ``key`` (False when absent) with a 95 % bootstrap CI resampling reference pairs."""
    by_pair: dict[int, list[float]] = {}
    for rec in records:
        by_pair.setdefault(rec["pair"], []).append(float(rec.get(key, False)))
    clusters = list(by_pair.values())
    if not clusters:
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")], "n": 0}
    means = []
    for _ in range(draws):
        pick = rng.integers(0, len(clusters), len(clusters))
        values = [v for i in pick for v in clusters[i]]
        means.append(np.mean(values))
    values = [v for c in clusters for v in c]
    return {"mean": float(np.mean(values)), "ci": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "n": len(values)}


def summarise(result: dict, sizes: Sizes) -> dict:
    rng = np.random.default_rng(0)
    out = {k: rate(result["single"], k, rng, sizes.bootstrap) for k in ("identity_ok", "colour_ok", "class_ok")}
    for same in (True, False):
        pairs = [p for p in result["pairs"] if p["same_class"] == same]
        for k in ("missing", "merged", "wrong_class", "leak", "collapse"):
            out[f"{'same' if same else 'cross'}_class/{k}"] = rate(pairs, k, rng, sizes.bootstrap)
    return out


def pooled(results: list[dict]) -> dict:
    """Seeds pooled: pair ids made distinct per seed so the bootstrap still resamples reference pairs."""
    out = {"single": [], "pairs": []}
    for s, result in enumerate(results):
        for key in out:
            out[key] += [{**r, "pair": (s, r["pair"])} for r in result[key]]
    return out


def figure(path: Path, grids: dict[str, list[np.ndarray]], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(grids)
    fig, axes = plt.subplots(len(rows) + 1, 1, figsize=(12, 2 * len(rows) + 4))
    for ax, name in zip(axes, rows):
        ax.imshow(np.concatenate(grids[name][:12], axis=1) if grids[name] else np.zeros((SIZE, SIZE, 3)))
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    names = list(summary)
    metrics = ["identity_ok", "same_class/leak", "same_class/collapse", "cross_class/leak"]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        means = [summary[name][m]["mean"] for m in metrics]
        errors = np.array([[summary[name][m]["mean"] - summary[name][m]["ci"][0],
                            summary[name][m]["ci"][1] - summary[name][m]["mean"]] for m in metrics]).T
        axes[-1].bar(np.arange(len(metrics)) + i * width, means, width, yerr=errors, label=name)
    axes[-1].set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics, fontsize=8)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# the constrained conditions take the shipped weight (configs/mmdiff), or --constraint-weight
CONDITIONS = {
    "none": {"attention_loss_tokens": "both", "attention_loss_weight": 0.0, "random_masks": False},
    "text": {"attention_loss_tokens": "text", "random_masks": False},
    "both": {"attention_loss_tokens": "both", "random_masks": False},
    "random_masks": {"attention_loss_tokens": "both", "random_masks": True},
}


def shipped_weight() -> float:
    from mmdiff import MMDiffConfig
    from mmdiff.configuration import load_config

    return load_config("configs/mmdiff/tiny_sd15.yaml", MMDiffConfig).attention_loss_weight


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: every stage, two conditions")
    parser.add_argument("--smoke", action="store_true", help="one step of every stage, one condition (CI)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step and sample count")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--references", type=int, default=None, help="held-out reference pairs per evaluation")
    parser.add_argument("--gen-steps", type=int, default=None, help="denoising steps per generated image")
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=None,
                        help="the adapter conditions to run (default: all; --quick: none both; --smoke: both)")
    parser.add_argument("--constraint-weight", type=float, default=None,
                        help="the constrained conditions' attention_loss_weight (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else QUICK if args.quick else Sizes()
    # --quick: the constrained and unconstrained conditions (every code path, half the cost); --smoke: the
    # constrained one, whose baselines still run
    names = args.conditions or (["both"] if args.smoke else ["none", "both"] if args.quick else list(CONDITIONS))
    weight = shipped_weight() if args.constraint_weight is None else args.constraint_weight
    conditions = {name: {"attention_loss_weight": weight, **CONDITIONS[name]} for name in names}
    if args.scale != 1.0:
        # training sizes scale; the evaluation's (references, steps, bootstrap) and the judge's do not: the
        # judge is the measuring instrument, and a scaled-down one fails its 95 % gate (0.59 at 0.3x)
        fixed = ("batch", "seeds", "bootstrap", "references", "gen_steps", "judge_steps", "judge_eval")
        sizes = Sizes(**{k: v if k in fixed else max(1, int(v * args.scale)) for k, v in asdict(sizes).items()})
    chosen = {"seeds": args.seeds, "references": args.references, "gen_steps": args.gen_steps}
    sizes = Sizes(**{**asdict(sizes), **{k: v for k, v in chosen.items() if v}})
    out = args.out or RESULTS / ("reproduce_smoke" if args.smoke else "reproduce_quick" if args.quick else "reproduce")
    started, timings = time.perf_counter(), {}
    rng = np.random.default_rng(0)
    train_ids, held_out = split_identities()

    def stage(name: str) -> None:
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"[{timings[name]:7.1f} s] {name}", flush=True)

    torch.manual_seed(0)
    judge, judge_accuracy = train_judge(sizes, rng)
    stage(f"judge on fresh renders: identity {judge_accuracy['identity']:.3f}, class {judge_accuracy['class']:.3f}")
    pipe, vision = build_base({})
    fit_vae(pipe, sizes, rng, train_ids)
    ceiling = autoencoder_ceiling(pipe.vae, judge, held_out, sizes.judge_eval)
    stage("vae: the judge on its reconstructions: " + ", ".join(f"{k} {v:.3f}" for k, v in ceiling.items()))
    train_base(pipe, sizes, rng, train_ids)
    stage("base unet")
    train_encoder(vision.model, vision.processor, sizes, rng, train_ids)
    stage("image encoder")
    gate_samples = base_alone(pipe, judge, sizes)
    gate = rate(gate_samples, "class_ok", np.random.default_rng(0), sizes.bootstrap)
    stage(f"base alone draws the prompted class in {gate['mean']:.3f}")
    base_state = {"vae": pipe.vae.state_dict(), "scaling_factor": pipe.vae.config.scaling_factor,
                  "unet": pipe.unet.state_dict(),
                  "text_encoder": pipe.text_encoder.state_dict(), "vision": vision.model.state_dict()}
    from mmdiff import MMDiffPipeline

    summaries, results, grids, losses = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp, single_rank():
        work = Path(tmp)
        shards = {flag: write_shards(work / f"shards-{flag}", sizes, np.random.default_rng(1), train_ids, flag)
                  for flag in sorted({c["random_masks"] for c in conditions.values()})}
        stage("shards")
        for name, condition in conditions.items():
            per_seed, baselines = [], {"no_adapter": [], "shuffled": []}
            for seed in range(sizes.seeds):
                model, history = train_adapter(base_state, condition, shards[condition["random_masks"]], sizes, seed,
                                               work / f"{name}-{seed}")
                losses[f"{name}/{seed}"] = {k: float(v) for k, v in history[-1].items()} if history else {}
                pipe = MMDiffPipeline(model)
                per_seed.append(evaluate(pipe, judge, sizes, held_out, seed))
                # every adapter's own baselines, with the same model, references and noise
                baselines["no_adapter"].append(evaluate(pipe, judge, sizes, held_out, seed, subject_scale=0.0))
                baselines["shuffled"].append(evaluate(pipe, judge, sizes, held_out, seed, shuffled=True))
                stage(f"{name} seed {seed}")
            results[name] = pooled(per_seed)
            for baseline, runs in baselines.items():  # the shipped condition's keep their plain names
                results[baseline if name == "both" else f"{baseline}[{name}]"] = pooled(runs)
        for name, result in results.items():
            summaries[name] = summarise(result, sizes)
            grids[f"{name}: single"] = [r["image"] for r in result["single"]]
            grids[f"{name}: same-class pairs"] = [r["image"] for r in result["pairs"] if r["same_class"]]
    grids["base alone"] = [r["image"] for r in gate_samples]
    report = {
        "sizes": asdict(sizes), "quick": args.quick, "smoke": args.smoke, "seconds": timings,
        "identities": {"train": train_ids, "held_out": held_out},
        "judge_accuracy_fresh_renders": judge_accuracy, "judge_valid": min(judge_accuracy.values()) >= 0.95,
        "vae_reconstruction_ceiling": ceiling,
        "base_quality_gate": {"class_ok_base_alone": gate, "passed": gate["mean"] >= 0.6},
        "final_training_losses": losses, "conditions": conditions, "summary": summaries,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    figure(out.with_suffix(".png"), grids, summaries)
    stage(f"written {out.with_suffix('.json')} and .png")
    return report


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # the design's 2 cores
    main()
