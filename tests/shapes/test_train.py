"""Training: the multi-positive loss, determinism under a seed, and a loadable model folder."""

from __future__ import annotations

import dataclasses
import math
import re

import open_clip
import pytest
import torch
from open_clip.pos_embed import get_2d_sincos_pos_embed

from legrad_export.load import default_layer_spec, load_openclip
from legrad_runtime.metadata import sha256_file
from legrad_shapes import train as train_module
from legrad_shapes.scenes import COLORS, SHAPES
from legrad_shapes.train import (
    TrainConfig,
    background_evidence,
    caption_overlap,
    grid_of,
    image_and_patch_embeddings,
    model_config,
    multi_positive_loss,
    token_caption_loss,
    train,
)
from tiny_models import assert_matches_reference

pytestmark = pytest.mark.torch


def sin_cos_table(width: int, grid: int) -> torch.Tensor:
    """open_clip's fixed sine-cosine positions for a grid × grid model, class token first."""
    return torch.from_numpy(get_2d_sincos_pos_embed(width, grid, cls_token=True)).float()


TINY = dict(
    vision_width=64, vision_layers=2, head_width=64, text_width=64, text_layers=1, embed_dim=32,
    batch_size=8, steps=3, warmup=1, pool=32, threads=1, layers="all",
)  # fmt: skip


def test_multi_positive_loss_matches_a_loop_over_images_and_classes():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=gen)
    targets = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0.0]])

    def ce(row: list[float], positives: list[int]) -> float:
        log_z = math.log(sum(math.exp(v) for v in row))
        return -sum(row[k] - log_z for k in positives) / len(positives)

    rows = logits.tolist()
    i2t = sum(ce(rows[i], [k for k in range(4) if targets[i, k]]) for i in range(5)) / 5
    cols = [[rows[i][k] for i in range(5)] for k in range(4)]  # every class is present once at least
    t2i = sum(ce(cols[k], [i for i in range(5) if targets[i, k]]) for k in range(4)) / 4
    assert multi_positive_loss(logits, targets).item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_a_class_absent_from_the_batch_is_not_a_text_to_image_query():
    logits, targets = torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])
    # image → text: log 3 per image; text → image: only class 0 is asked, log 2 over two positives
    assert multi_positive_loss(logits, targets).item() == pytest.approx((math.log(3) + math.log(2)) / 2)


def test_caption_overlap_is_zero_for_orthogonal_captions_and_one_for_collapsed_ones():
    assert caption_overlap(torch.eye(3)).item() == 0
    assert caption_overlap(torch.ones(4, 2) / math.sqrt(2)).item() == pytest.approx(1)
    pair = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])  # cosine 0.5
    assert caption_overlap(pair).item() == pytest.approx(0.25)


def test_token_caption_loss_is_the_mean_cross_entropy_over_object_patches_only():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.nn.functional.normalize(torch.randn(2, 3, 4, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 4, generator=gen), dim=-1)
    patches = torch.tensor([[2, -1, 0], [-1, -1, 4]])
    terms = []
    for b, n in [(0, 0), (0, 2), (1, 2)]:
        logits = [10 * float(tokens[b, n] @ t) for t in text]
        terms.append(math.log(sum(math.exp(v) for v in logits)) - logits[int(patches[b, n])])
    loss = token_caption_loss(tokens, text, torch.tensor(10.0), patches)
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-5)


def test_background_evidence_averages_how_much_background_patches_prefer_present_classes():
    gen = torch.Generator().manual_seed(2)
    tokens = torch.nn.functional.normalize(torch.randn(2, 3, 4, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 4, generator=gen), dim=-1)
    targets = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 1]])
    patches = torch.tensor([[2, -1, -1], [-1, 4, 4]])

    def preference(b: int, n: int, c: int) -> float:
        cosines = [float(tokens[b, n] @ t) for t in text]
        return max(0.0, cosines[c] - sum(cosines) / len(cosines))

    terms = [
        preference(b, n, c)
        for b in range(2)
        for n in range(3)
        if patches[b, n] < 0
        for c in range(5)
        if targets[b, c]
    ]
    assert len(terms) == 5 and any(terms)  # image 0: 2 background patches × 2 classes; image 1: 1 × 1
    assert background_evidence(tokens, text, targets, patches).item() == pytest.approx(sum(terms) / 5)
    assert background_evidence(tokens, text, targets, torch.zeros(2, 3, dtype=torch.long)).item() == 0


def test_patch_embeddings_are_the_last_tokens_through_the_pooled_embeddings_head():
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_config(TrainConfig(**TINY))).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    hook = model.visual.transformer.register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        expected_image = model.encode_image(x, normalize=True)
        image, patches = image_and_patch_embeddings(model, x)
    hook.remove()
    last = seen["out"][:, 1:]  # the transformer's output without the class token
    expected = torch.nn.functional.normalize(model.visual.ln_post(last) @ model.visual.proj, dim=-1)
    assert patches.shape == (2, 64, 32)
    torch.testing.assert_close(image, expected_image)
    torch.testing.assert_close(patches, expected)


@pytest.mark.parametrize(
    "options",
    [{}, {"token_loss": 1.0}, {"token_loss": 1.0, "background_caption": ""}, {"background_loss": 1.0}],
)
def test_training_is_deterministic_and_writes_a_model_folder_the_exporter_reads(tmp_path, options):
    cfg = TrainConfig(**TINY, **options)
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    weights = "open_clip_model.safetensors"
    assert sha256_file(tmp_path / "a" / weights) == sha256_file(tmp_path / "b" / weights)

    loaded = load_openclip(str(tmp_path / "a"))
    assert loaded.vit.num_layers == 2 and loaded.preprocess["size"] == 64
    assert default_layer_spec(loaded) == "all"
    vocabulary = loaded.defaults.vocabulary
    assert set(vocabulary.slots["color"]) == set(COLORS) and set(vocabulary.slots["shape"]) == set(SHAPES)
    assert "an orange cross" in vocabulary.prompts()
    if options:  # the extra term reaches the weights
        train(TrainConfig(**TINY), tmp_path / "plain")
        assert sha256_file(tmp_path / "plain" / weights) != sha256_file(tmp_path / "a" / weights)


@pytest.mark.parametrize("size", [64, 96])
def test_fixed_sine_cosine_positions_stay_fixed_and_export_exactly(tmp_path, size):
    """The sin_cos_2d option (fused AdamW on): the positions are open_clip's table, untouched by
    training, and the analytic maps equal the autograd reference, at the native and a resampled size."""
    train(TrainConfig(**TINY, pos_embed="sin_cos_2d", fused_adamw=True), tmp_path)
    loaded = load_openclip(str(tmp_path))
    table = sin_cos_table(width=64, grid=64 // 8)
    assert torch.allclose(loaded.model.visual.positional_embedding, table, atol=1e-3)  # fp16 storage

    assert_matches_reference(loaded, size, "all")


def test_a_grid_swap_runs_the_tower_as_open_clip_built_at_that_size_and_restores_it():
    """`grid_of(model, 48)` on 48 px input gives what open_clip's own model built for 48 px gives
    with the same weights; afterwards (even after an error) the configured 64 px table is back."""
    cfg = TrainConfig(**TINY, pos_embed="sin_cos_2d")
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_config(cfg)).eval()
    small = open_clip.CLIP(**model_config(dataclasses.replace(cfg, image_size=48))).eval()
    small.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k != "visual.positional_embedding"}, strict=False
    )
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad(), grid_of(model, 48):
        swapped = model.encode_image(x)
    with torch.no_grad():
        expected = small.encode_image(x)
    torch.testing.assert_close(swapped, expected)

    with pytest.raises(RuntimeError), grid_of(model, 48):
        model.encode_image(torch.randn(1, 3, 64, 64))  # 64 tokens against the 36-cell table
    full = sin_cos_table(width=64, grid=8)
    torch.testing.assert_close(model.visual.positional_embedding.data, full)


def test_progressive_training_is_deterministic_and_ends_on_the_full_grid(tmp_path):
    cfg = TrainConfig(
        **TINY | {"steps": 4}, pos_embed="sin_cos_2d", fused_adamw=True, warm_size=48, warm_steps=2
    )
    runs = [train(cfg, tmp_path / name, log_every=1) for name in "ab"]
    weights = "open_clip_model.safetensors"
    assert sha256_file(tmp_path / "a" / weights) == sha256_file(tmp_path / "b" / weights)
    assert [entry["size"] for entry in runs[0]["log"]] == [48, 48, 64, 64]

    loaded = load_openclip(str(tmp_path / "a"))
    full = sin_cos_table(width=64, grid=8)
    assert torch.allclose(loaded.model.visual.positional_embedding, full, atol=1e-3)  # fp16 storage
    assert loaded.preprocess["size"] == 64


def test_patch_dropout_drops_tokens_in_training_only_and_the_tail_sees_every_patch(tmp_path):
    """FLIP-style training: half of the 64 patches are dropped (the class token kept) for the first
    `patch_dropout_steps` steps, none after; the run is deterministic, and the saved model, which
    open_clip builds with the same PatchDropout, sees every patch at inference."""
    cfg = TrainConfig(**TINY | {"steps": 4}, patch_dropout=0.5, patch_dropout_steps=2)
    tokens_seen: list[int] = []

    def count(module, args, output):
        if isinstance(module, open_clip.transformer.Transformer) and module.training:
            tokens_seen.append(args[0].shape[1])

    with torch.nn.modules.module.register_module_forward_hook(count):
        runs = [train(cfg, tmp_path / name, log_every=100) for name in "ab"]
    vision = [n for n in tokens_seen if n != 16]  # the text tower's context length is 16
    assert vision == [1 + 32, 1 + 32, 1 + 64, 1 + 64] * 2
    weights = "open_clip_model.safetensors"
    assert sha256_file(tmp_path / "a" / weights) == sha256_file(tmp_path / "b" / weights)
    assert runs[0]["log"] == runs[1]["log"]

    plain = tmp_path / "plain"
    train(TrainConfig(**TINY | {"steps": 4}), plain)
    assert sha256_file(plain / weights) != sha256_file(tmp_path / "a" / weights)

    loaded = load_openclip(str(tmp_path / "a"))
    assert loaded.model.visual.patch_dropout.prob == 0.5 and not loaded.model.training
    assert_matches_reference(loaded, 64, "all")


def test_head_width_sets_the_vision_heads_and_the_export_follows(tmp_path):
    train(TrainConfig(**TINY | {"head_width": 16}), tmp_path)
    loaded = load_openclip(str(tmp_path))
    assert loaded.model.visual.transformer.resblocks[0].attn.num_heads == 64 // 16
    assert_matches_reference(loaded, 64, "all")
    with pytest.raises(ValueError, match="head_width 48 must divide vision_width 64"):
        TrainConfig(**TINY | {"head_width": 48})


@pytest.mark.parametrize(
    "options, expected_steps",
    [
        ({}, 4),
        ({"patch_dropout": 0.5, "patch_dropout_steps": 2}, 2),
        ({"pos_embed": "sin_cos_2d", "warm_size": 48, "warm_steps": 3}, 1),
    ],
)
def test_the_background_term_only_runs_in_steps_that_see_every_patch_at_full_size(
    tmp_path, monkeypatch, options, expected_steps
):
    grids = []
    original = train_module.background_evidence

    def counting(tokens, text, targets, patches):
        grids.append((tokens.shape[1], patches.shape[1]))
        return original(tokens, text, targets, patches)

    monkeypatch.setattr(train_module, "background_evidence", counting)
    train(TrainConfig(**TINY | {"steps": 4}, background_loss=1.0, **options), tmp_path)
    assert grids == [(64, 64)] * expected_steps  # every one of the 8×8 patches, each labelled


@pytest.mark.parametrize(
    "options, message",
    [
        ({"patch_dropout": 1.0}, "must lie in [0, 1)"),
        ({"patch_dropout_steps": 2}, "needs patch_dropout > 0"),
        ({"patch_dropout": 0.5, "patch_dropout_steps": 3}, "fewer than steps (3)"),
        ({"patch_dropout": 0.5, "token_loss": 1.0}, "cannot run with patch_dropout"),
        ({"patch_dropout": 0.5, "background_loss": 1.0}, "it needs patch_dropout_steps"),
    ],
)
def test_patch_dropout_options_that_cannot_work_are_refused_up_front(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**TINY, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="no CUDA GPU.*device='cpu'"):
        TrainConfig(**TINY, device="cuda")


def test_a_device_torch_does_not_know_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'gpu' is not a torch device; use 'cpu' or 'cuda'"):
        TrainConfig(**TINY, device="gpu")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"warm_size": 48, "warm_steps": 2}, "pos_embed='sin_cos_2d'"),
        ({"pos_embed": "sin_cos_2d", "warm_size": 44, "warm_steps": 2}, "multiple of patch_size"),
        ({"pos_embed": "sin_cos_2d", "warm_size": 64, "warm_steps": 2}, "below image_size"),
        ({"pos_embed": "sin_cos_2d", "warm_size": 48, "warm_steps": 3}, "warm_steps 3 must lie in 1..2"),
        ({"pos_embed": "sin_cos_2d", "warm_size": 48, "warm_steps": 2, "token_loss": 1.0}, "token_loss"),
    ],
)
def test_progressive_options_that_cannot_work_are_refused_up_front(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**TINY, **options)
