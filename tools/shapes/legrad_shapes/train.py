"""Train a small OpenCLIP model on generated scenes, contrastively, every present object's caption a
positive. Deterministic under a seed (fixed thread count, fixed number of steps).

    # the shipped model (run 16 of the training log): 2 cores, about 26 minutes
    python -m legrad_shapes.train --out assets/shapes-clip
    # another run of the log, or a variation: a named recipe and/or TrainConfig fields over it
    python -m legrad_shapes.train --out RUN --recipe run5,weight_decay=0.2 --steps 4800

The output folder is an open_clip `local-dir:` model (open_clip_config.json + fp16 safetensors) plus
`legrad_defaults.json`: the layer set the exporter should use for it and its vocabulary (colours, shapes,
templates), so tools can form prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors.torch import save_file

from .scenes import COLORS, SHAPES, TEMPLATES, class_captions, make_scene, partial_captions

__all__ = [
    "FLAGS",
    "RECIPES",
    "TrainConfig",
    "background_evidence",
    "caption_overlap",
    "grid_of",
    "image_and_patch_embeddings",
    "make_config",
    "model_config",
    "multi_positive_loss",
    "parse_args",
    "parse_recipe",
    "token_caption_loss",
    "train",
    "zero_shot_accuracy",
]

# open_clip's default normalisation, so the exported model needs no overrides
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
VAL_SINGLE_SEED = 20_001  # held-out streams for choices made during development; tests use others


@dataclass(frozen=True)
class TrainConfig:
    """A training run. The defaults are the shipped model's recipe (run 16 of the training log); the
    options that are off by default are the log's research, reached through `RECIPES` / `--recipe`."""

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 6
    head_width: int = 16  # the vision tower's heads: vision_width / head_width
    mlp_ratio: float = 4.0  # the vision tower's MLP width over its width
    text_width: int = 128
    text_layers: int = 3
    embed_dim: int = 128
    context_length: int = 16
    batch_size: int = 64
    steps: int = 3600
    pool: int = 60_000  # scenes generated once up front and sampled from (0: a fresh scene every time)
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    threads: int = 2
    layers: str = "-5"  # written to legrad_defaults.json; choose it on validation scenes (seed 20_002)
    logit_scale: float = 1 / 0.07  # the learnable inverse temperature's start (CLIP's default)
    partial_captions: bool = True  # also 'a circle', 'a red object' as captions
    text_separation: float = 1.0  # weight of `caption_overlap`: keeps class captions' embeddings apart
    pos_embed: str = "learnable"  # or "sin_cos_2d": fixed 2-D sine-cosine positions (open_clip option)
    fused_adamw: bool = False  # steps about 23% faster here, but not bit for bit the shipped run
    # weight of `token_caption_loss` (each patch names what covers it); 0: off. It lifts zero-shot
    # accuracy but LeGrad's maps then stop localising (the training log: run 7)
    token_loss: float = 0.0
    background_caption: str = "background"  # what background patches name in it ("": left free)
    # weight of `background_evidence`: background patches must not prefer the objects present; 0: off.
    # Only in steps that see every patch at image_size (after warm_steps and patch_dropout_steps)
    background_loss: float = 0.0
    # progressive resizing: the first `warm_steps` steps see the pool downsampled to `warm_size` px
    # (fewer tokens, cheaper steps) with the sine-cosine table of that grid; then `image_size` to the end
    warm_size: int = 0  # 0: off
    warm_steps: int = 0
    # FLIP-style: the share of patch tokens dropped at random from each training image (open_clip's
    # PatchDropout; off in eval, so the saved model sees every patch). Cheaper steps at full resolution
    patch_dropout: float = 0.0
    patch_dropout_steps: int = 0  # drop in the first this many steps only, then see every patch (0: always)
    device: str = "cpu"  # "cuda" for recipe sweeps; the shipped model is trained on the CPU

    def __post_init__(self) -> None:
        if not 0 <= self.patch_dropout < 1:
            raise ValueError(f"patch_dropout {self.patch_dropout} must lie in [0, 1)")
        if self.patch_dropout_steps and not (self.patch_dropout and self.patch_dropout_steps < self.steps):
            raise ValueError(
                f"patch_dropout_steps {self.patch_dropout_steps} needs patch_dropout > 0 and fewer than "
                f"steps ({self.steps})"
            )
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            raise ValueError(f"device {self.device!r} is not a torch device; use 'cpu' or 'cuda'") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: torch sees no CUDA GPU here; train with device='cpu'")
        if self.vision_width % self.head_width:
            raise ValueError(f"head_width {self.head_width} must divide vision_width {self.vision_width}")
        if self.patch_dropout and self.token_loss:
            raise ValueError("token_loss labels every patch; it cannot run with patch_dropout")
        if self.patch_dropout and self.background_loss and not self.patch_dropout_steps:
            raise ValueError(
                "background_loss labels every patch: with patch_dropout it needs patch_dropout_steps, "
                "the tail that sees every patch"
            )
        if self.warm_size:
            if self.pos_embed != "sin_cos_2d":
                raise ValueError("warm_size needs pos_embed='sin_cos_2d': learned positions fit one grid")
            if self.warm_size % self.patch_size or not 0 < self.warm_size < self.image_size:
                raise ValueError(
                    f"warm_size {self.warm_size} must be a multiple of patch_size {self.patch_size} "
                    f"below image_size {self.image_size}"
                )
            if not 0 < self.warm_steps < self.steps:
                raise ValueError(f"warm_steps {self.warm_steps} must lie in 1..{self.steps - 1}")
            if self.token_loss:
                raise ValueError("token_loss labels patches at image_size; it cannot run with warm_size")


# The training log's runs that a command reproduces, as TrainConfig fields over the defaults (the
# shipped run 16). Runs 4-14 were trained when run 4's tower was the default; runs 1-3 (CLS pooling)
# and 9 (a throwaway script) have no command here.
_RUN4 = {"vision_layers": 4, "vision_width": 128, "head_width": 64, "layers": "-3"}
_RUN5 = _RUN4 | {"pos_embed": "sin_cos_2d", "fused_adamw": True, "steps": 5000}
RECIPES: dict[str, dict] = {
    "shipped": {},  # run 16
    "run4": _RUN4,  # shipped first
    "run5": _RUN5,
    "run7": _RUN5 | {"token_loss": 3.0, "background_caption": "", "steps": 4500},
    "run8": _RUN5 | {"image_size": 48, "steps": 7000},
    "run10": _RUN5 | {"warm_size": 48, "warm_steps": 4000, "steps": 6000},
    "run11": _RUN5 | {"warm_size": 48, "warm_steps": 5200, "steps": 6200},
    "run12": _RUN4 | {"seed": 1},
    "run13": _RUN5 | {"weight_decay": 0.2, "steps": 4800},
    "run14": _RUN4 | {"head_width": 32},
    "run15": _RUN4 | {"vision_layers": 6, "vision_width": 96, "head_width": 32, "layers": "all"},
    "run17": {"seed": 1, "layers": "-4"},
}
_FIELDS = {f.name: type(f.default) for f in fields(TrainConfig)}


def _field_value(key: str, text: str) -> object:
    kind = _FIELDS[key]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key}={text!r}: expected true or false")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected {kind.__name__}") from None


def parse_recipe(spec: str) -> dict:
    """`NAME`, `NAME,FIELD=VALUE,...` or `FIELD=VALUE,...` as TrainConfig fields: the named recipe of
    `RECIPES` (default "shipped") with the given fields over it, e.g. "run5,weight_decay=0.2,seed=1"."""
    items = [item.strip() for item in spec.split(",")] if spec.strip() else []
    name = items.pop(0) if items and "=" not in items[0] else "shipped"
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    out = dict(RECIPES[name])
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"{item!r} in recipe {spec!r}: expected FIELD=VALUE (layer lists: --layers)")
        if key not in _FIELDS:
            raise ValueError(f"unknown TrainConfig field {key!r}; fields: {', '.join(_FIELDS)}")
        out[key] = _field_value(key, text.strip())
    return out


def model_config(cfg: TrainConfig) -> dict:
    """The open_clip model config: a small ViT and a small text tower using the standard CLIP BPE."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "width": cfg.vision_width,
            "layers": cfg.vision_layers,
            "head_width": cfg.head_width,
            "mlp_ratio": cfg.mlp_ratio,
            # the embedding is LN_post(mean of the tokens) @ proj: the very score LeGrad differentiates
            # at every layer, so its maps follow what the model uses (CLS pooling scattered them)
            "pool_type": "avg",
            "final_ln_after_pool": True,
        }
        | ({} if cfg.pos_embed == "learnable" else {"pos_embed_type": cfg.pos_embed})
        | ({"patch_dropout": cfg.patch_dropout} if cfg.patch_dropout else {}),
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": max(1, cfg.text_width // 64),
            "layers": cfg.text_layers,
        },
    }


def render(
    seed: int, start: int, count: int, size: int, patch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scenes start..start+count-1 of stream `seed`: uint8 pixels (count, S, S, 3), multi-hot class
    targets (count, classes) and patch classes (count, S/patch, S/patch; see `Scene.patch_labels`)."""
    pixels = np.empty((count, size, size, 3), np.uint8)
    targets = np.zeros((count, len(COLORS) * len(SHAPES)), np.float32)
    patches = np.empty((count, size // patch, size // patch), np.int8)
    for i in range(count):
        scene = make_scene(seed, start + i, size)
        pixels[i], patches[i] = scene.image, scene.patch_labels(patch)
        for obj in scene.objects:
            targets[i, obj.label] = 1
    return pixels, targets, patches


@contextmanager
def grid_of(model: open_clip.CLIP, image_size: int) -> Iterator[None]:
    """Run the vision tower at `image_size` inside the block: its fixed sine-cosine table (open_clip's
    own) is swapped for that grid's, and the original is put back after. The table is not trained and
    the patch embedding and blocks do not depend on the grid, so nothing else changes."""
    positions = model.visual.positional_embedding
    grid = image_size // model.visual.patch_size[0]
    original = positions.data
    table = open_clip.pos_embed.get_2d_sincos_pos_embed(positions.shape[1], grid, cls_token=True)
    positions.data = torch.from_numpy(table).float().to(original.device)
    try:
        yield
    finally:
        positions.data = original


def to_pixel_values(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) → normalised float (B, 3, S, S), as open_clip's preprocessing at native size."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def as_inputs(
    pixels: np.ndarray, targets: np.ndarray, patches: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`render`'s arrays as training inputs: pixel values, targets, patch classes (B, N) as long."""
    return to_pixel_values(pixels), torch.from_numpy(targets), torch.from_numpy(patches).flatten(1).long()


def multi_positive_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss over (images × class captions) where every present object's caption
    is a positive: each direction is a cross-entropy against the uniform distribution over positives
    (image → its present classes; class → the images in the batch that contain it)."""
    i2t = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    present = targets.sum(0) > 0
    t_logits, t_targets = logits.T[present], targets.T[present]  # (C', B)
    t2i = -(t_targets / t_targets.sum(1, keepdim=True) * F.log_softmax(t_logits, 1)).sum(1).mean()
    return (i2t + t2i) / 2


def image_and_patch_embeddings(model: open_clip.CLIP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: the normalised image embedding, as `encode_image(x, normalize=True)`, and each
    patch's last-layer token through the same LayerNorm and projection, normalised: (B, D), (B, N, D)."""
    visual = model.visual
    out = visual.forward_intermediates(x, indices=1, output_fmt="NLC")
    patches = visual.ln_post(out["image_intermediates"][0]) @ visual.proj
    return F.normalize(out["image_features"], dim=-1), F.normalize(patches, dim=-1)


def token_caption_loss(
    tokens: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, patches: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of each patch's embedding (B, N, D) against the caption embeddings (C, D): a patch
    labelled k in `patches` (B, N) should score caption k highest. Patches labelled -1 are left out.

    In training, object patches name their object's class caption and background patches a
    background caption (`TrainConfig.background_caption`). The masks are the generator's own, so this
    dense signal costs nothing to label. It teaches shape far faster than the pooled loss alone, but
    a model trained with it no longer routes class evidence through its last blocks' attention, so
    LeGrad's maps stop pointing at the queried object (the training log: run 7)."""
    logits = scale * tokens @ text.T  # (B, N, C)
    return F.cross_entropy(logits.flatten(0, 1), patches.flatten(), ignore_index=-1)


def background_evidence(
    tokens: torch.Tensor, text: torch.Tensor, targets: torch.Tensor, patches: torch.Tensor
) -> torch.Tensor:
    """How much background patches prefer the objects present: the mean over (image, background patch,
    present class) of the positive part of the patch embedding's (B, N, D) cosine with that class
    caption (C, D) minus its mean cosine over all class captions. Patches labelled -1 in `patches`
    (B, N) are background. Against the mean, not zero: the contrastive loss only sees differences
    between captions, so a bare cosine is met by shifting every embedding away from every caption.

    A patch only partly covered by an object counts as background here, so the patch centred on the
    object, not its neighbour, should carry the object's evidence at the end."""
    cos = tokens @ text.T  # (B, N, C)
    preference = (cos - cos.mean(2, keepdim=True)).relu()
    weight = (patches < 0).unsqueeze(2) * targets.unsqueeze(1)  # background patch × present class
    return (preference * weight).sum() / weight.sum().clamp(min=1)


def caption_overlap(text: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between the embeddings of different class captions.

    Early on the image tower sees colour but not yet shape, and the contrastive loss alone then
    teaches the text tower to ignore shape words too: captions that differ only in shape collapse
    onto one embedding, and the image tower gets no signal to learn shape. This term keeps them apart.
    """
    sim = text @ text.T  # (C, C)
    off = ~torch.eye(len(text), dtype=torch.bool)
    return sim[off].pow(2).mean()


@torch.no_grad()
def zero_shot_accuracy(
    model: open_clip.CLIP, tokenizer, seed: int, count: int, size: int
) -> dict[str, float]:
    """On single-object scenes: how often the own caption scores highest among all class captions
    ("accuracy"), and how often the best caption at least names the right colour / shape."""
    model.eval()
    device = model.logit_scale.device
    text = F.normalize(model.encode_text(tokenizer(class_captions()).to(device)), dim=-1)
    pred, true = [], []
    for start in range(0, count, 120):
        batch = [make_scene(seed, i, size, n_objects=1) for i in range(start, min(count, start + 120))]
        x = to_pixel_values(np.stack([scene.image for scene in batch])).to(device)
        pred.append((F.normalize(model.encode_image(x), dim=-1) @ text.T).argmax(1))
        true += [scene.objects[0].label for scene in batch]
    p, t, k = torch.cat(pred).cpu(), torch.tensor(true), len(SHAPES)
    return {
        "accuracy": (p == t).float().mean().item(),
        "colour": (p // k == t // k).float().mean().item(),
        "shape": (p % k == t % k).float().mean().item(),
    }


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: TrainConfig, out: Path, log_every: int = 100) -> dict:
    """Train, write the model folder to `out`, and return a summary (loss curve, accuracy, time)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = open_clip.CLIP(**model_config(cfg), init_logit_scale=math.log(cfg.logit_scale)).to(cfg.device)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    # every class under every template, tokenised once: (templates, classes, context)
    tokens = torch.stack([tokenizer(class_captions(t)) for t in range(len(TEMPLATES))])
    partial_tokens = tokenizer(partial_captions())  # shapes first, then colours
    background_tokens = tokenizer(
        [cfg.background_caption] if cfg.token_loss and cfg.background_caption else []
    ).to(cfg.device)
    opt = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=cfg.fused_adamw or None,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / cfg.warmup
            if s < cfg.warmup
            else 0.5 * (1 + math.cos(math.pi * (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
        ),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    n_classes = tokens.shape[1]
    if cfg.pool:
        print(f"rendering {cfg.pool} training scenes", flush=True)
        pool_pixels, pool_targets, pool_patches = render(
            cfg.seed, 0, cfg.pool, cfg.image_size, cfg.patch_size
        )
    log: list[dict] = []
    start_time = time.perf_counter()
    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[size]} px  loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=cfg.steps, loss=float("nan"), size=cfg.image_size)
        for step in range(cfg.steps):
            model.train()
            warm = step < cfg.warm_steps  # warm_steps is 0 unless warm_size is set
            dropping = cfg.patch_dropout and not (cfg.patch_dropout_steps and step >= cfg.patch_dropout_steps)
            background = cfg.background_loss and not (warm or dropping)  # every patch at image_size
            if cfg.patch_dropout_steps and step == cfg.patch_dropout_steps:
                model.visual.patch_dropout.prob = 0.0  # the unmasked tail: every patch, as in eval
            if cfg.pool:
                idx = torch.randint(cfg.pool, (cfg.batch_size,), generator=gen).numpy()
                x, targets, patches = as_inputs(pool_pixels[idx], pool_targets[idx], pool_patches[idx])
            else:
                start = step * cfg.batch_size
                x, targets, patches = as_inputs(
                    *render(cfg.seed, start, cfg.batch_size, cfg.image_size, cfg.patch_size)
                )
            x, targets, patches = x.to(cfg.device), targets.to(cfg.device), patches.to(cfg.device)
            if warm:
                x = F.interpolate(x, size=cfg.warm_size, mode="bilinear", antialias=True)
            template = torch.randint(len(TEMPLATES), (n_classes,), generator=gen)
            captions = tokens[template, torch.arange(n_classes)]
            if cfg.partial_captions:
                captions = torch.cat([captions, partial_tokens])
            captions = torch.cat([captions.to(cfg.device), background_tokens])  # last, when there is one
            with grid_of(model, cfg.warm_size) if warm else nullcontext():
                if cfg.token_loss or background:
                    image, patch_emb = image_and_patch_embeddings(model, x)
                else:
                    image = model.encode_image(x, normalize=True)
            text = model.encode_text(captions, normalize=True)
            logits = model.logit_scale.exp() * image @ text.T
            loss = multi_positive_loss(logits[:, :n_classes], targets)
            if cfg.text_separation:  # among class captions, and among shape-only captions
                overlap = caption_overlap(text[:n_classes])
                if cfg.partial_captions:
                    overlap = overlap + caption_overlap(text[n_classes : n_classes + len(SHAPES)])
                loss = loss + cfg.text_separation * overlap
            if cfg.partial_captions:  # the shape-only and colour-only captions, each its own softmax
                by_kind = targets.view(-1, len(COLORS), len(SHAPES))  # (B, colours, shapes)
                partial = logits[:, n_classes : n_classes + len(SHAPES) + len(COLORS)]
                shape_logits, color_logits = partial.split([len(SHAPES), len(COLORS)], 1)
                loss = (
                    loss
                    + multi_positive_loss(shape_logits, by_kind.amax(1))
                    + multi_positive_loss(color_logits, by_kind.amax(2))
                ) / 3
            if cfg.token_loss:
                token_text = text[:n_classes]
                if len(background_tokens):
                    token_text = torch.cat([token_text, text[-1:]])
                    patches = patches.masked_fill(patches < 0, n_classes)
                loss = loss + cfg.token_loss * token_caption_loss(
                    patch_emb, token_text, model.logit_scale.exp(), patches
                )
            if background:
                loss = loss + cfg.background_loss * background_evidence(
                    patch_emb, text[:n_classes], targets, patches
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            size = cfg.warm_size if warm else cfg.image_size
            progress.update(task, advance=1, loss=loss.item(), size=size)
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                log.append({"step": step + 1, "size": size, "loss": round(loss.item(), 4)})
                if not progress.console.is_terminal:  # a log file gets a line instead of a bar
                    elapsed = time.perf_counter() - start_time
                    zs = zero_shot_accuracy(model, tokenizer, VAL_SINGLE_SEED, 120, cfg.image_size)
                    print(
                        f"step {step + 1}/{cfg.steps}  {size} px  loss {loss.item():.3f}  "
                        f"{elapsed:.0f} s  val {zs}",
                        flush=True,
                    )
    seconds = time.perf_counter() - start_time
    model.eval()
    accuracy = zero_shot_accuracy(model, tokenizer, VAL_SINGLE_SEED, 480, cfg.image_size)
    summary = {
        "config": asdict(cfg),
        "train_seconds": round(seconds, 1),
        "val_zero_shot": accuracy,
        "log": log,
    }
    save_model_folder(model, cfg, out, summary)
    return summary


def save_model_folder(model: open_clip.CLIP, cfg: TrainConfig, out: Path, summary: dict) -> None:
    """open_clip local-dir files (config + fp16 safetensors), legrad.json and the training summary."""
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_config(cfg),
        "preprocess_cfg": {
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "squash",
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    defaults = {
        "layers": cfg.layers,
        "vocabulary": {"slots": {"color": list(COLORS), "shape": list(SHAPES)}, "templates": list(TEMPLATES)},
    }
    (out / "legrad_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


# the command line's plain operational settings, each over the recipe's: (TrainConfig field, type, help)
FLAGS = (
    ("seed", int, "seed of the scenes, the initialisation and the batches"),
    ("steps", int, "optimiser steps"),
    ("pool", int, "scenes rendered up front and sampled from; 0: a fresh scene every step"),
    ("threads", int, "torch CPU threads"),
    ("device", str, "cpu or cuda"),
    ("layers", str, "the layer set written to legrad_defaults.json, chosen on validation"),
)


def make_config(recipe: str = "shipped", **flags: object) -> TrainConfig:
    """`--recipe`'s config with the operational flags that are not None over it."""
    return TrainConfig(**parse_recipe(recipe) | {k: v for k, v in flags.items() if v is not None})


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path]:
    """The command line as (config, output folder); a bad recipe or config exits with the reason."""
    parser = argparse.ArgumentParser(
        prog="python -m legrad_shapes.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument(
        "--recipe",
        default="shipped",
        metavar="NAME,FIELD=VALUE",
        help=f"a run of the training log ({', '.join(RECIPES)}; default: shipped, run 16) with "
        "TrainConfig fields over it, e.g. run5,weight_decay=0.2",
    )
    for name, kind, text in FLAGS:
        shipped = getattr(TrainConfig, name)
        parser.add_argument(f"--{name}", type=kind, help=f"{text} (default: the recipe's, shipped {shipped})")
    args = parser.parse_args(argv)
    try:
        return make_config(args.recipe, **{name: getattr(args, name) for name, _, _ in FLAGS}), args.out
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    cfg, out = parse_args(argv)
    summary = train(cfg, out)
    print(f"trained in {summary['train_seconds']:.0f} s; zero-shot {summary['val_zero_shot']}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
