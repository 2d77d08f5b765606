"""The runtime end to end without torch: loading, batching, bad input, threads, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
from legrad_runtime.cli import main as cli_main
from legrad_runtime.metadata import METADATA_FILE

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
    s, g = m.image_size, m.grid_size
    assert result.heatmaps.shape == (4, 3, s, s) and result.heatmaps.dtype == np.float32
    assert result.layer_maps.shape == (4, 3, len(m.layers), g, g)
    assert result.heatmaps.min() >= 0 and result.heatmaps.max() <= 1 and np.isfinite(result.heatmaps).all()
    assert result.similarities.shape == (4, 3) and np.allclose(result.probabilities.sum(1), 1)
    assert np.allclose(np.linalg.norm(result.image_embeds, axis=1), 1, atol=1e-5)
    for b, path in enumerate(photos):
        with Image.open(path) as im:
            size = im.size
        assert result.overlay(b, 1).size == size  # over the ORIGINAL image, at its own size
        assert result.heatmap_on_original(b, 0).shape == size[::-1]
    assert result.layer_figure(0, 0).width > s and result.grid().height > 0


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
    assert f"{meta['image_size']}×{meta['image_size']} px" in text and "legrad_image.onnx" in text


def test_the_runtime_never_imports_torch(model_folder, photos):
    code = (
        "import sys; from legrad_runtime import load; "
        f"r = load({str(model_folder)!r}).explain([{str(photos[0])!r}], ['a cat']); "
        "r.overlay(0, 0); r.grid(); r.layer_figure(0, 0); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'legrad_export')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
