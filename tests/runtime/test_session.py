"""The runtime end to end without torch: loading, batching, bad input, threads, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from legrad_runtime import (
    ImageInputError,
    ModelFolderError,
    PromptError,
    SchemaVersionError,
    load,
)
from legrad_runtime.cli import _summary
from legrad_runtime.cli import main as cli_main
from legrad_runtime.metadata import (
    METADATA_FILE,
    CorrectionCfg,
    ModelMetadata,
    PreprocessCfg,
    TokenizerCfg,
    TowerCfg,
)
from legrad_runtime.session import Explanation, LeGradModel

PROMPTS = ["a photo of a cat", "a remote control", "a red square"]


@pytest.fixture(scope="module")
def model(model_folder):
    return load(model_folder, device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Image files of different sizes, aspect ratios and formats."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (w, h, fmt) in enumerate([(64, 64, "png"), (120, 80, "jpeg"), (50, 90, "png"), (33, 47, "bmp")]):
        array = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        path = folder / f"photo{i}.{'jpg' if fmt == 'jpeg' else fmt}"
        Image.fromarray(array).save(path, format=fmt.upper())
        paths.append(path)
    return paths


def test_explain_gives_every_output_with_the_documented_shapes(model, photos):
    m = model.metadata
    result = model.explain(photos, PROMPTS)
    (h, w), (gh, gw) = m.image_size, m.grid_size
    assert result.heatmaps.shape == (4, 3, h, w) and result.heatmaps.dtype == np.float32
    assert result.layer_maps.shape == (4, 3, len(m.layers), gh, gw)
    assert result.heatmaps.min() >= 0 and result.heatmaps.max() <= 1 and np.isfinite(result.heatmaps).all()
    assert result.similarities.shape == (4, 3) and np.allclose(result.probabilities.sum(1), 1)
    assert np.allclose(np.linalg.norm(result.image_embeds, axis=1), 1, atol=1e-5)
    for b, path in enumerate(photos):
        with Image.open(path) as im:
            size = im.size
        assert result.overlay(b, 1).size == size  # over the ORIGINAL image, at its own size
        assert result.heatmap_on_original(b, 0).shape == size[::-1]
    assert result.layer_figure(0, 0).width > w and result.grid().height > 0


def test_results_do_not_depend_on_batching(model, photos):
    whole = model.explain(photos, PROMPTS)
    for batch_size, budget in [(1, 2**31), (3, 2**31), (None, 1)]:  # budget 1 byte: one pair per call
        split = model.explain(photos, PROMPTS, batch_size=batch_size, memory_budget=budget)
        assert np.abs(split.heatmaps - whole.heatmaps).max() <= 1e-5
        assert np.abs(split.image_embeds - whole.image_embeds).max() <= 1e-5
    assert model.chunk_sizes(100, None, 1) == (1, 1)


def test_many_images_and_prompts_stream_in_bounded_batches(model, photos):
    pulled = []

    def stream():  # 40 images from a generator: never all in memory at once
        for i in range(40):
            pulled.append(i)
            yield photos[i % len(photos)]

    prompts = [f"a photo of thing number {i}" for i in range(100)]
    per_call, per_prompt_call = model.chunk_sizes(len(prompts), 8, memory_budget=8 * 2**20)
    assert per_call == 8 and per_prompt_call < len(prompts)
    batches = model.explain_batches(stream(), prompts, batch_size=8, memory_budget=8 * 2**20)
    first = next(batches)
    assert first.heatmaps.shape[:2] == (8, 100) and len(pulled) == 8  # lazily: one batch at a time
    rest = list(batches)
    assert len(rest) == 4 and len(pulled) == 40
    alone = model.explain([photos[1]], prompts[:5])
    assert np.abs(first.heatmaps[1, :5] - alone.heatmaps[0]).max() <= 1e-5


def test_precomputed_embeddings_are_checked_and_normalised(model, photos):
    text = model.embed_text(PROMPTS)
    scaled = model.explain(photos[:2], text_embeds=text * 3.0)
    direct = model.explain(photos[:2], PROMPTS)
    assert np.abs(scaled.heatmaps - direct.heatmaps).max() <= 1e-5
    with pytest.raises(PromptError, match=rf"\(P, {model.metadata.embed_dim}\)"):
        model.explain(photos[:1], text_embeds=np.ones((2, model.metadata.embed_dim + 1)))
    with pytest.raises(PromptError, match="all zero"):
        model.explain(photos[:1], text_embeds=np.zeros((1, model.metadata.embed_dim)))


def test_inputs_of_every_kind_are_accepted(model, photos):
    pil = Image.open(photos[1]).convert("RGB")
    array = np.asarray(pil)
    result = model.explain([str(photos[1]), photos[1], pil, array], ["a cat"])
    assert np.abs(result.heatmaps - result.heatmaps[:1]).max() <= 1e-6


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing.jpg", "missing.jpg"),
        (lambda d: _write(d / "notes.jpg", b"just some text, not a JPEG"), "notes.jpg"),
        (lambda d: _truncated(d / "cut.jpg"), "cut.jpg"),
        (lambda d: np.zeros((0, 10, 3), np.uint8), "image #1"),
    ],
    ids=["missing", "text-named-jpg", "truncated", "zero-size"],
)
def test_a_bad_image_is_named_and_the_rest_of_the_batch_still_runs(model, photos, tmp_path, make, match):
    bad = make(tmp_path)
    inputs = [photos[0], bad, photos[2]]
    with pytest.raises(ImageInputError, match=match):
        model.explain(inputs, PROMPTS)
    result = model.explain(inputs, PROMPTS, on_error="skip")
    assert [f.index for f in result.failures] == [1] and match in str(result.failures[0].source)
    alone = model.explain([photos[0], photos[2]], PROMPTS)
    assert np.abs(result.heatmaps - alone.heatmaps).max() <= 1e-6


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _truncated(path):
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(path, "JPEG")
    data = path.read_bytes()
    return _write(path, data[: len(data) // 2])


@pytest.mark.parametrize("prompts", [[], [""], ["a cat", "   "]], ids=["empty-list", "empty", "blank"])
def test_empty_prompts_are_refused(model, photos, prompts):
    with pytest.raises(PromptError, match="empty"):
        model.explain(photos[:1], prompts)


def test_model_folder_with_a_missing_or_altered_file_is_refused(model_folder, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(model_folder, broken)
    (broken / "tokenizer" / "merges.txt").unlink()
    with open(broken / "text.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelFolderError, match=r"merges.txt .* missing.*|text.onnx .* altered"):
        load(broken)


def test_metadata_from_a_newer_schema_is_refused(model_folder, tmp_path):
    newer = tmp_path / "m"
    shutil.copytree(model_folder, newer)
    data = json.loads((newer / METADATA_FILE).read_text())
    data["schema_version"] += 1
    (newer / METADATA_FILE).write_text(json.dumps(data))
    with pytest.raises(SchemaVersionError, match="upgrade legrad-onnx"):
        load(newer)


def test_many_threads_share_one_model(model, photos):
    expected = [model.explain([p], PROMPTS).heatmaps for p in photos]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: model.explain([p], PROMPTS).heatmaps, photos * 3))
    for i, got in enumerate(results):
        assert np.array_equal(got, expected[i % len(photos)])


def test_cuda_request_without_cuda_falls_back_loudly(model_folder):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.warns(UserWarning, match="device='cuda'.*running on CPU"):
        m = load(model_folder, device="cuda")
    assert m.device == "cpu"
    assert load(model_folder, device="auto").device == "cpu"


def test_cli_writes_overlays_scores_and_figures(model_folder, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(
        ["explain", str(model_folder), str(photos[0].parent), "-p", "a cat", "-p", "a dog",
         "--out", str(out), "--layers-figure", "--save-npy", "--batch-size", "2"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    for path in photos:
        folder = out / path.stem
        assert {p.name for p in folder.iterdir()} == {
            "a-cat.png",
            "a-dog.png",
            "a-cat__layers.png",
            "a-dog__layers.png",
            "heatmaps.npy",
        }
        with Image.open(path) as im, Image.open(folder / "a-cat.png") as overlay:
            assert overlay.size == im.size
        assert np.load(folder / "heatmaps.npy").shape == (2, im.size[1], im.size[0])
    assert len((out / "scores.csv").read_text().splitlines()) == 1 + 2 * len(photos)


def test_cli_bad_arguments_exit_2_with_one_line(model_folder, photos, tmp_path, capsys):
    cases = [
        ["explain", str(model_folder), str(photos[0])],  # no prompt
        ["explain", str(model_folder), str(tmp_path / "*.png"), "-p", "x"],  # glob matches nothing
        ["explain", str(tmp_path), str(photos[0]), "-p", "x"],  # not a model folder
        ["explain", str(model_folder), str(photos[0]), "-p", "x", "--batch-size", "0"],
    ]
    for argv in cases:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("legrad: error:"), err


def test_cli_skips_unreadable_images_and_exits_1(model_folder, photos, tmp_path, capsys):
    code = cli_main(["explain", str(model_folder), str(photos[0]), str(tmp_path / "nope.jpg"), "-p", "x",
                     "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "skipped" in err and "nope.jpg" in err
    assert (tmp_path / "out" / photos[0].stem / "x.png").is_file()


def test_cli_info_prints_the_metadata(model_folder, capsys):
    assert cli_main(["info", str(model_folder), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert cli_main(["info", str(model_folder)]) == 0
    text = capsys.readouterr().out
    height, width = meta["image_size"]  # [height, width] in schema v4
    assert f"{width}×{height} px" in text and "legrad_image.onnx" in text


def test_the_runtime_never_imports_torch(model_folder, photos):
    code = (
        "import sys; from legrad_runtime import load; "
        f"r = load({str(model_folder)!r}).explain([{str(photos[0])!r}], ['a cat']); "
        "r.overlay(0, 0); r.grid(); r.layer_figure(0, 0); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'legrad_export')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- SigLIP-like models, without a folder


def _clip_b16() -> ModelMetadata:
    """ViT-B-16 at 224 px, every block explained, a graph without the prompt loop."""
    return ModelMetadata(
        model_name="ViT-B-16",
        pretrained="none",
        checkpoint_sha256=None,
        open_clip_version="3.3.0",
        exporter_version="0.1.0",
        torch_version="2.14.1",
        opset=20,
        image_size=224,
        patch_size=16,
        grid_size=14,
        num_layers=12,
        layers=tuple(range(12)),
        width=768,
        heads=12,
        embed_dim=512,
        logit_scale=100.0,
        activation="gelu",
        preprocess=PreprocessCfg(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        tokenizer=TokenizerCfg("clip-bpe", 77, ("tokenizer/vocab.json",)),
    )


def _siglip_b16(correction: bool = True) -> ModelMetadata:
    return dataclasses.replace(
        _clip_b16(),
        activation="gelu_tanh",
        tower=TowerCfg("timm_vit", "map", 0, (14, 14)),
        correction=CorrectionCfg(True, "a photo of a", 0.8) if correction else None,
        logit_bias=-10.0,
    )


def _without_a_folder(meta: ModelMetadata) -> LeGradModel:
    model = object.__new__(LeGradModel)  # chunk_sizes reads the metadata alone
    model.metadata = meta
    return model


def test_a_map_head_tower_fits_far_more_prompts_per_call():
    """Its per-prompt intermediates are heads × N per layer, not the blocks' heads × N²."""
    budget = 2 * 1024**3
    _, clip_prompts = _without_a_folder(_clip_b16()).chunk_sizes(100_000, 1, budget)
    _, map_prompts = _without_a_folder(_siglip_b16()).chunk_sizes(100_000, 1, budget)
    assert clip_prompts >= 1 and map_prompts > 10 * clip_prompts


def _explanation(image_embeds, text_embeds, logit_scale: float, logit_bias: float | None) -> Explanation:
    b, p = len(image_embeds), len(text_embeds)
    return Explanation(
        heatmaps=np.zeros((b, p, 2, 2), np.float32),
        layer_maps=np.zeros((b, p, 1, 1, 1), np.float32),
        image_embeds=np.asarray(image_embeds, np.float64),
        text_embeds=np.asarray(text_embeds, np.float64),
        images=[],
        placements=[],
        sources=[f"image #{i}" for i in range(b)],
        prompts=[f"embedding #{i}" for i in range(p)],
        layers=(0,),
        logit_scale=logit_scale,
        failures=[],
        preprocess=PreprocessCfg(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        logit_bias=logit_bias,
    )


def _unit_rows(rng, rows: int, dim: int) -> list[list[float]]:
    out = []
    for _ in range(rows):
        v = [rng.standard_normal() for _ in range(dim)]
        norm = math.sqrt(sum(x * x for x in v))
        out.append([x / norm for x in v])
    return out


def test_probabilities_are_a_softmax_over_prompts_without_a_bias_and_sigmoids_with_one():
    rng = np.random.default_rng(3)
    images, texts = _unit_rows(rng, 3, 8), _unit_rows(rng, 4, 8)
    cos = [[sum(a * b for a, b in zip(im, t)) for t in texts] for im in images]
    scale, bias = 12.5, -1.5

    softmax = []
    for row in cos:
        e = [math.exp(scale * c) for c in row]
        softmax.append([x / sum(e) for x in e])
    got = _explanation(images, texts, scale, None).probabilities
    assert got.shape == (3, 4) and np.allclose(got, softmax, rtol=1e-9, atol=0)

    sigmoid = [[1 / (1 + math.exp(-(scale * c + bias))) for c in row] for row in cos]
    got = _explanation(images, texts, scale, bias).probabilities
    assert got.shape == (3, 4) and np.allclose(got, sigmoid, rtol=1e-9, atol=0)
    assert not np.allclose(got.sum(1), 1)  # per pair: rows do not sum to 1


def test_sigmoid_probabilities_of_extreme_logits_raise_no_warnings():
    e = [[1.0, 0.0], [0.0, 1.0]]
    texts = [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]  # cos +1, -1 and 0 with the first image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale, bias in [(1e6, 0.0), (1e6, -1e6 + 5.0), (1.0, 1e308), (1.0, -1e308)]:
            got = _explanation(e, texts, scale, bias).probabilities
            assert np.isfinite(got).all() and (got >= 0).all() and (got <= 1).all()
        p = _explanation(e, texts, 1e6, 0.0).probabilities[0]
        assert p[0] == 1.0 and p[1] == 0.0 and p[2] == 0.5  # +1e6, -1e6 and 0 as logits
        p = _explanation(e, texts, 1e6, -1e6 + 5.0).probabilities[0]
        assert math.isclose(p[0], 1 / (1 + math.exp(-5.0)), rel_tol=1e-9)  # the bias cancels the scale
        assert _explanation(e, texts, 1.0, -1e308).probabilities.max() == 0.0
        assert _explanation(e, texts, 1.0, 1e308).probabilities.min() == 1.0
        softmax = _explanation(e, texts, 1e6, None).probabilities
        assert np.array_equal(softmax[0], [1.0, 0.0, 0.0])


def test_info_shows_the_tower_the_correction_and_the_bias():
    text = _summary(_siglip_b16())
    assert "timm_vit" in text and "tower        timm_vit, head map," in text and "no class token" in text
    assert "  correction on: empty prompt" in text and "'a photo of a'" in text and "threshold 0.8" in text
    assert "logit bias -10.00" in text and "gelu_tanh" in text
    plain = _summary(_clip_b16())
    assert "openclip_vit" in plain and "head token_mean" in plain and "a class token" in plain
    assert "correction" not in plain and "logit bias" not in plain
    off = _summary(dataclasses.replace(_siglip_b16(), correction=CorrectionCfg(False)))
    assert "  correction off:" in off
