"""A supervised classifier's folder through the runtime: classes by name or id, 'top-K', the CLI.

The folder is the session fixture's "classifier": a tiny torchvision ViT (64 px, patch 16, 3 blocks,
width 64) with ImageNet-1k's 1,000 class names, resize 'shortest' with crop_pct 0.875, bilinear.
Torch-free: numbers are checked against the graph run directly and against numpy.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from legrad_runtime import load
from legrad_runtime.classes import imagenet1k_classes
from legrad_runtime.cli import main as cli_main
from legrad_runtime.errors import ModelFolderError, PromptError
from legrad_runtime.metadata import METADATA_FILE, read_metadata
from legrad_runtime.preprocess import load_image, preprocess_batch

NUM_CLASSES = 1000


@pytest.fixture(scope="module")
def classifier_folder(model_folders):
    return model_folders["classifier"]


@pytest.fixture(scope="module")
def model(classifier_folder):
    return load(classifier_folder, device="cpu")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    shapes = [(80, 100), (120, 64), (64, 64)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.fixture(scope="module")
def logits(model, images):
    """The logits of a logits-only call: one class, any class (they do not depend on it)."""
    return model.explain(images, classes=[0]).logits


def test_the_folder_has_the_image_graph_only(classifier_folder, model):
    meta = read_metadata(classifier_folder)
    assert meta.is_classifier and meta.tokenizer is None and meta.classes == imagenet1k_classes()
    assert meta.embed_dim == NUM_CLASSES and meta.logit_scale == 1.0 and meta.logit_bias is None
    assert meta.preprocess.crop_pct == 0.875 and meta.preprocess.resize_mode == "shortest"
    names = {p.name for p in classifier_folder.iterdir()}
    assert "text.onnx" not in names and "tokenizer" not in names and "legrad_image.onnx" in names
    assert model.is_classifier and model.tokenizer is None and model.classes == imagenet1k_classes()
    assert "1,000 classes" in repr(model)


def test_maps_and_logits_have_the_classifiers_shapes(model, images):
    result = model.explain(images[:2], classes=["tabby cat", 281, "goldfish"])
    layers = len(model.metadata.layers)
    assert result.heatmaps.shape == (2, 3, 64, 64) and result.heatmaps.dtype == np.float32
    assert result.layer_maps.shape == (2, 3, layers, 4, 4)
    assert result.logits.shape == (2, NUM_CLASSES) and result.logits.dtype == np.float32
    assert result.class_ids.dtype == np.int64 and result.class_ids.tolist() == [[281, 281, 1]] * 2
    assert result.prompts == ["tabby, tabby cat", "tabby, tabby cat", "goldfish, Carassius auratus"]
    assert result.image_embeds is None and result.text_embeds is None
    assert 0 <= result.heatmaps.min() and result.heatmaps.max() <= 1


def test_the_logits_are_the_graphs_own(classifier_folder, model, images):
    result = model.explain(images, classes=[3, 999])
    pixels, _ = preprocess_batch([load_image(im) for im in images], model.metadata.preprocess)
    session = ort.InferenceSession(
        str(classifier_folder / "legrad_image.onnx"), providers=["CPUExecutionProvider"]
    )
    heat, layer_maps, logits = session.run(None, {"pixel_values": pixels, "class_ids": np.array([3, 999])})
    np.testing.assert_allclose(result.logits, logits, atol=1e-5)
    np.testing.assert_allclose(result.heatmaps, heat, atol=1e-5)
    np.testing.assert_allclose(result.layer_maps, layer_maps, atol=1e-5)


def test_names_synonyms_and_ids_give_the_same_maps(model, images):
    by_id = model.explain(images, classes=[281])
    for name in ("tabby cat", "tabby", "Tabby, Tabby Cat"):
        by_name = model.explain(images, classes=[name])
        np.testing.assert_array_equal(by_name.heatmaps, by_id.heatmaps)
        np.testing.assert_array_equal(by_name.class_ids, by_id.class_ids)
        assert by_name.prompts == by_id.prompts == ["tabby, tabby cat"]


def test_every_image_and_class_equals_its_own_call(model, images):
    classes = [281, "golden retriever", 0]
    together = model.explain(images, classes=classes)
    for b, image in enumerate(images):
        for p, c in enumerate(classes):
            alone = model.explain(image, classes=c)
            np.testing.assert_allclose(together.heatmaps[b, p], alone.heatmaps[0, 0], atol=1e-5)
            np.testing.assert_allclose(together.layer_maps[b, p], alone.layer_maps[0, 0], atol=1e-5)
            np.testing.assert_allclose(together.logits[b], alone.logits[0], atol=1e-4)


def test_probabilities_are_a_softmax_over_all_classes(model, images):
    result = model.explain(images, classes=[281, 1, 999])
    z = result.logits.astype(np.float64)
    softmax = np.exp(z - z.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.probabilities, softmax[:, [281, 1, 999]], rtol=1e-5)
    np.testing.assert_array_equal(result.similarities, result.logits[:, [281, 1, 999]])


def test_top_k_explains_each_images_most_likely_classes(model, images, logits):
    top = model.explain(images, classes="top-3")
    assert top.prompts == ["top-1", "top-2", "top-3"] and top.class_ids.shape == (len(images), 3)
    np.testing.assert_allclose(top.logits, logits, atol=1e-5)
    for b, image in enumerate(images):
        expected = [int(i) for i in np.argsort(-logits[b].astype(np.float64), kind="stable")[:3]]
        assert top.class_ids[b].tolist() == expected
        named = model.explain(image, classes=expected)
        np.testing.assert_allclose(top.heatmaps[b], named.heatmaps[0], atol=1e-5)
        np.testing.assert_allclose(top.layer_maps[b], named.layer_maps[0], atol=1e-5)
        np.testing.assert_allclose(top.probabilities[b], named.probabilities[0], rtol=1e-5)
        assert [top.label(b, p) for p in range(3)] == [imagenet1k_classes()[i] for i in expected]
    assert np.all(np.diff(top.probabilities, axis=1) <= 0)  # descending


@pytest.mark.parametrize("kwargs", [{"batch_size": 1}, {"memory_budget": 1}, {"batch_size": 2}])
def test_top_k_and_named_classes_do_not_depend_on_how_the_work_is_split(model, images, kwargs):
    for classes in ("top-4", [5, 281, 7, 281]):
        whole = model.explain(images, classes=classes)
        split = model.explain(images, classes=classes, **kwargs)
        np.testing.assert_array_equal(split.class_ids, whole.class_ids)
        np.testing.assert_allclose(split.heatmaps, whole.heatmaps, atol=1e-5)
        batches = list(model.explain_batches(images, classes=classes, **kwargs))
        np.testing.assert_array_equal(np.concatenate([x.class_ids for x in batches]), whole.class_ids)


def test_a_classifiers_memory_plan_is_a_token_mean_towers(model):
    images, prompts = model.chunk_sizes(1000, None, 64 * 1024**2)
    assert images >= 1 and 1 <= prompts <= 1000
    assert model.chunk_sizes(5, 3, 1) == (3, 1)


@pytest.mark.parametrize(
    "classes, words",
    [
        ([1000], "out of range"),
        ([-1], "out of range"),
        (["tabbycat"], "did you mean 'tabby cat' (281)"),
        (["crane"], "134 or 517"),
        ([], "class list is empty"),
        ("top-0", "K must be 1 to 1,000"),
        ("top-x", "K must be a whole number"),
        ("top-1001", "K must be 1 to 1,000"),
        (["top-3"], "pass it alone"),
    ],
)
def test_bad_classes_are_refused_with_the_fix(model, images, classes, words):
    with pytest.raises(PromptError) as info:
        model.explain(images[:1], classes=classes)
    assert words in str(info.value)


def test_prompts_and_embeddings_are_refused_by_a_classifier(model, images):
    for kwargs in ({"prompts": ["a photo of a cat"]}, {"text_embeds": np.ones((1, NUM_CLASSES))}, {}):
        with pytest.raises(PromptError, match="classes="):
            model.explain(images[:1], **kwargs)
    with pytest.raises(PromptError, match="classifier"):
        model.embed_text(["a cat"])


def test_classes_are_refused_by_a_clip_model(model_folder, images):
    with pytest.raises(PromptError, match="prompts"):
        load(model_folder, device="cpu").explain(images[:1], classes=[281])


def test_unreadable_images_are_skipped_in_top_k(model, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    result = model.explain([images[0], broken, images[1]], classes="top-2", on_error="skip")
    assert [f.index for f in result.failures] == [1] and result.class_ids.shape == (2, 2)
    none = model.explain([broken], classes="top-2", on_error="skip")
    assert none.heatmaps.shape == (0, 2, 64, 64) and none.logits.shape == (0, NUM_CLASSES)
    assert none.class_ids.shape == none.probabilities.shape == (0, 2)


def test_pictures_are_drawn_for_top_k(model, images):
    top = model.explain(images[:2], classes="top-2")
    assert top.grid(cell=64).mode == "RGB" and top.layer_figure(1, 1).mode == "RGB"
    assert top.overlay(0, 1).size == (100, 80)
    back = top.heatmap_on_original(0, 0)  # 'shortest' with crop_pct: the border is cropped away
    assert back.shape == (80, 100) and back[:, 0].max() == 0 and back[:, -1].max() == 0


def _copy_with(folder, tmp_path, change) -> object:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    data = json.loads((copy / METADATA_FILE).read_text())
    change(data)
    (copy / METADATA_FILE).write_text(json.dumps(data))
    return copy


def test_a_stray_tokenizer_in_a_classifiers_metadata_is_refused(classifier_folder, model_folder, tmp_path):
    clip_tokenizer = json.loads((model_folder / METADATA_FILE).read_text())["tokenizer"]
    copy = _copy_with(classifier_folder, tmp_path, lambda d: d.update(tokenizer=clip_tokenizer))
    with pytest.raises(ModelFolderError, match="tokenizer"):
        load(copy, device="cpu")


def test_class_names_that_disagree_with_the_graph_are_refused(classifier_folder, tmp_path):
    copy = _copy_with(
        classifier_folder, tmp_path, lambda d: d.update(embed_dim=999, classes=d["classes"][:999])
    )
    with pytest.raises(ModelFolderError, match="embed_dim"):
        load(copy, device="cpu")


def test_a_classifier_graph_is_not_taken_for_a_clip_one(classifier_folder, model_folder, tmp_path):
    clip_tokenizer = json.loads((model_folder / METADATA_FILE).read_text())["tokenizer"]
    copy = _copy_with(classifier_folder, tmp_path, lambda d: d.update(classes=None, tokenizer=clip_tokenizer))
    with pytest.raises(ModelFolderError):
        load(copy, device="cpu", verify=False)


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def photos(tmp_path_factory, images):
    folder = tmp_path_factory.mktemp("classifier_photos")
    paths = [folder / name for name in ("cat.png", "dog.jpg")]
    for path, pixels in zip(paths, images):
        Image.fromarray(pixels).save(path)
    return paths


def _scores(out) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_cli_writes_an_overlay_per_class_and_the_probabilities(
    classifier_folder, model, photos, tmp_path, capsys
):
    out = tmp_path / "out"
    args = [
        "explain",
        str(classifier_folder),
        *map(str, photos),
        "-c",
        "tabby cat",
        "-c",
        "207",
        "--out",
        str(out),
    ]
    assert cli_main(args) == 0, capsys.readouterr().err
    assert {p.name for p in (out / "cat").iterdir()} == {"tabby.png", "golden-retriever.png"}
    rows = _scores(out)
    expected = model.explain(photos, classes=[281, 207])
    assert [(r["folder"], r["file"], int(r["class_id"]), r["class"]) for r in rows] == [
        (folder, file, class_id, imagenet1k_classes()[class_id])
        for folder in ("cat", "dog")
        for file, class_id in (("tabby.png", 281), ("golden-retriever.png", 207))
    ]
    np.testing.assert_allclose(
        [float(r["probability"]) for r in rows], expected.probabilities.ravel(), rtol=1e-5
    )
    with Image.open(out / "dog" / "tabby.png") as written:
        assert np.array_equal(np.asarray(written), np.asarray(expected.overlay(1, 0)))


def test_cli_top_k_writes_each_images_own_classes(classifier_folder, model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "explain",
        str(classifier_folder),
        *map(str, photos),
        "--top-k",
        "2",
        "--out",
        str(out),
        "--save-npy",
    ]
    assert cli_main(args) == 0, capsys.readouterr().err
    expected = model.explain(photos, classes="top-2")
    rows = _scores(out)
    assert [int(r["class_id"]) for r in rows] == expected.class_ids.ravel().tolist()
    for r in rows:
        assert (out / r["folder"] / r["file"]).is_file()
    maps = np.load(out / "dog" / "heatmaps.npy")
    np.testing.assert_allclose(maps[1], expected.heatmap_on_original(1, 1), atol=1e-6)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["-p", "a cat", "-c", "1"], "-p/--vocabulary are for CLIP models, -c/--top-k for classifiers"),
        (["--top-k", "2", "-c", "1"], "not both"),
        (["-c", "crane"], "134 or 517"),
        (["-c", "1000"], "out of range"),
        (["--top-k", "0"], "--top-k must be a positive integer"),
        (["--top-k", "1001"], "more than this model's 1,000 classes"),
        ([], "-c NAME|ID or --top-k K"),
    ],
)
def test_cli_refuses_bad_requests_in_one_line(classifier_folder, photos, tmp_path, capsys, extra, words):
    code = cli_main(["explain", str(classifier_folder), str(photos[0]), *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("legrad: error: ") and words in err[0], err


def test_cli_refuses_prompts_for_a_classifier_and_classes_for_clip(
    classifier_folder, model_folder, photos, tmp_path, capsys
):
    for folder, flags, words in [
        (
            classifier_folder,
            ["-p", "a cat"],
            "is a classifier: it is explained for classes, not text prompts",
        ),
        (classifier_folder, ["--vocabulary"], "pass -c NAME|ID"),
        (model_folder, ["-c", "tabby"], "is a CLIP model"),
        (model_folder, ["--top-k", "3"], "pass -p PROMPT"),
    ]:
        code = cli_main(["explain", str(folder), str(photos[0]), *flags, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], (flags, err)


def test_info_shows_a_classifier_and_its_classes(classifier_folder, capsys):
    assert cli_main(["info", str(classifier_folder)]) == 0
    out = capsys.readouterr().out
    assert "classifier   1,000 classes: tench, goldfish" in out and "crop_pct 0.875" in out
    assert "tokenizer" not in out
    assert cli_main(["info", str(classifier_folder), "--classes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == NUM_CLASSES and lines[281] == "281\ttabby, tabby cat"
