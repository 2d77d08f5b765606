"""`legrad-evaluate` end to end on generated cases with a tiny model, and its bad-input exits."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from legrad_export.cli import main as export_main
from legrad_export.evaluate import METHODS
from legrad_export.evaluate_cli import main
from legrad_export.load import load_openclip
from legrad_export.reference import legrad_reference
from legrad_runtime import load
from legrad_runtime.evaluation import load_mask
from legrad_runtime.metadata import PreprocessCfg, read_metadata
from legrad_runtime.preprocess import load_image, preprocess, to_original
from legrad_shapes.cases import SHARED, UNIQUE
from legrad_shapes.cases import main as cases_main
from legrad_shapes.scenes import make_scene

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    """Four generated scenes (2–3 objects) plus one non-square image, so 'shortest' crops."""
    root = tmp_path_factory.mktemp("cases")
    assert cases_main([str(root), "--seed", "11", "--count", "4", "--objects", "2,3"]) == 0
    scene = make_scene(12, 0, size=96, n_objects=1)
    (root / "extra").mkdir()
    Image.fromarray(scene.image[8:72]).save(root / "extra/wide.png")  # 96 wide, 64 high
    Image.fromarray(scene.objects[0].mask[8:72].astype(np.uint8) * 255).save(root / "extra/wide_mask.png")
    with (root / "cases.csv").open("a", newline="") as f:
        csv.writer(f).writerow(("extra/wide.png", scene.objects[0].caption(), "extra/wide_mask.png", UNIQUE))
    return root


def _rows(cases_dir):
    with (cases_dir / "cases.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_scene_cases_have_one_row_per_object_grouped_by_shared_colour(cases_dir):
    rows = _rows(cases_dir)[:-1]  # the generated part
    assert sorted({r["image"] for r in rows}) == [f"images/{i:05d}.png" for i in range(4)]
    assert [sum(r["image"] == f"images/{i:05d}.png" for r in rows) for i in range(4)] == [2, 3, 2, 3]
    for r in rows:
        colour = r["prompt"].split()[1]  # "a red circle", "an orange cross"
        others = [o for o in rows if o["image"] == r["image"] and o is not r]
        assert r["group"] == (SHARED if any(o["prompt"].split()[1] == colour for o in others) else UNIQUE)
        k = int(r["mask"].split("_")[-1].split(".")[0])
        scene = make_scene(11, int(r["image"][7:12]), n_objects=2 + int(r["image"][7:12]) % 2)
        np.testing.assert_array_equal(load_mask(cases_dir / r["mask"]), scene.objects[k].mask)
        assert scene.objects[k].caption() == r["prompt"]


@pytest.fixture(scope="module", params=["squash", "shortest"])
def run(request, cases_dir, tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"eval-{request.param}")
    argv = [str(cases_dir), "--model", str(tiny_dirs["b16_like"]), "--resize-mode", request.param]
    argv += ["--batch-size", "3", "--json", str(out / "scores.json"), "--save-heatmaps", str(out / "maps")]
    return request.param, argv, out


def test_evaluate_prints_every_method_and_group_and_writes_json(run, capsys):
    _, argv, out = run
    assert main(argv) == 0
    table = capsys.readouterr().out
    for name in (*METHODS, "all", SHARED, UNIQUE, "pointing %", "mIoU@0.5"):
        assert name in table
    report = json.loads((out / "scores.json").read_text())
    n = len(report["cases"])
    assert n == 2 + 3 + 2 + 3 + 1 and report["layers"] == [1, 2]  # default -2 of a 3-block model
    assert {(r["method"], r["group"]) for r in report["rows"]} == {
        (m, g) for m in METHODS for g in ("all", SHARED, UNIQUE)
    }
    assert all(len(report["per_case"][m]) == n for m in METHODS)
    for row in report["rows"]:
        assert 0 <= row["pointing"] <= 1 and 0 <= row["miou"] <= 1 and 0 <= row["mass_inside"] <= 1
    assert sorted(p.name for p in (out / "maps" / "legrad").iterdir()) == sorted(f"{i}.npy" for i in range(n))


def test_legrad_maps_equal_the_autograd_reference_on_the_original_image(run, cases_dir, tiny_dirs):
    mode, argv, out = run
    if not (out / "maps").is_dir():
        assert main(argv) == 0
    loaded = load_openclip(str(tiny_dirs["b16_like"]))
    cfg = PreprocessCfg(64, loaded.preprocess["mean"], loaded.preprocess["std"], "bicubic", mode)
    rows = _rows(cases_dir)
    for i in (0, 3, 6, len(rows) - 1):  # scenes with 2 and 3 prompts, and the non-square image
        image = load_image(cases_dir / rows[i]["image"])
        pixels, placement = preprocess(image, cfg)
        with torch.no_grad():
            text = loaded.model.encode_text(loaded.tokenizer([rows[i]["prompt"]]), normalize=True)
        ref = legrad_reference(loaded.model, torch.from_numpy(pixels)[None], text, layers=-2)
        expected = to_original(ref.heatmaps[0, 0].detach().numpy(), placement)
        got = np.load(out / "maps" / "legrad" / f"{i}.npy")
        assert got.shape == (image.height, image.width)
        np.testing.assert_allclose(got, expected, atol=2e-4)


def test_saved_heatmaps_are_scored_as_an_extra_method_identically(run, capsys):
    _, argv, out = run
    if not (out / "maps").is_dir():
        assert main(argv) == 0
    again = out / "again.json"
    assert main([*argv[:-4], "--heatmaps", str(out / "maps" / "legrad"), "--json", str(again)]) == 0
    assert "saved:legrad" in capsys.readouterr().out
    rows = {(r["method"], r["group"]): r for r in json.loads(again.read_text())["rows"]}
    for group in ("all", SHARED, UNIQUE):
        mine, saved = rows["legrad", group], rows["saved:legrad", group]
        assert [saved[k] for k in ("pointing", "miou", "mass_inside", "n")] == pytest.approx(
            [mine[k] for k in ("pointing", "miou", "mass_inside", "n")], abs=1e-6
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "5"], "out of range for a 3-block model"),
        (["--threshold", "2"], r"--threshold 2.0 is outside \[0, 1\]"),
        (["--image-size", "72"], "not a positive multiple"),
        (["--json", "/nonexistent-dir/x.json"], "does not exist"),
        (["--heatmaps", "EMPTY"], "lacks 11 of 11 files"),
        (["--model", "ViT-B-61"], "unknown model 'ViT-B-61'"),
        ([], "cases folder .*NOWHERE does not exist"),  # run on a missing cases folder
    ],
)
def test_bad_input_ends_in_one_line_and_exit_code_2(cases_dir, tiny_dirs, tmp_path, capsys, extra, message):
    (tmp_path / "EMPTY").mkdir()
    folder = cases_dir if extra else tmp_path / "NOWHERE"
    extra = [str(tmp_path / e) if e == "EMPTY" else e for e in extra]
    assert main([str(folder), "--model", str(tiny_dirs["b16_like"]), *extra]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("legrad-evaluate: error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err and captured.out == ""
    assert re.search(message, lines[0]), lines[0]


def test_default_layers_follow_the_model_folders_recommendation(cases_dir, tiny_dirs, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dirs["b16_like"], folder)
    (folder / "legrad_defaults.json").write_text(json.dumps({"layers": "0,2"}))
    assert main([str(cases_dir), "--model", str(folder), "--json", str(tmp_path / "s.json")]) == 0
    assert "layers 0,2" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["layers"] == [0, 2]


@pytest.fixture(scope="module")
def exported(tiny_dirs, tmp_path_factory):
    """The tiny model exported as users export it ('shortest', so the non-square case is cropped)."""
    out = tmp_path_factory.mktemp("exported")
    assert (
        export_main(["--model", str(tiny_dirs["b16_like"]), "--resize-mode", "shortest", "--out", str(out)])
        == 0
    )
    (folder,) = out.iterdir()
    return folder


def _report(path):
    report = json.loads(path.read_text())
    return report, {(r["method"], r["group"]): r for r in report["rows"]}


def test_an_exported_folder_scores_as_its_torch_model_with_the_same_layers(
    cases_dir, tiny_dirs, exported, tmp_path, capsys
):
    meta = read_metadata(exported)
    graph = ["--json", str(tmp_path / "graph.json"), "--save-heatmaps", str(tmp_path / "graph")]
    assert main([str(cases_dir), "--model", str(exported), *graph]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"{exported.name}: the exported ONNX graph (onnxruntime, cpu) of ")
    layers = ",".join(map(str, meta.layers))
    torch_side = ["--layers", layers, "--resize-mode", "shortest", "--json", str(tmp_path / "torch.json")]
    torch_side += ["--save-heatmaps", str(tmp_path / "torch")]
    assert main([str(cases_dir), "--model", str(tiny_dirs["b16_like"]), *torch_side]) == 0

    (graph_report, graph_rows), (torch_report, torch_rows) = (
        _report(tmp_path / "graph.json"),
        _report(tmp_path / "torch.json"),
    )
    assert graph_report["scored"] == "exported graph" and torch_report["scored"] == "torch model"
    assert graph_report["layers"] == torch_report["layers"] == list(meta.layers)
    assert graph_report["resize_mode"] == torch_report["resize_mode"] == "shortest"
    assert {m for m, _ in graph_rows} == {"legrad", "centre-prior"}
    for key, row in graph_rows.items():
        expected = torch_rows[key]
        for metric in ("pointing", "other", "miou", "mass_inside", "n"):
            assert row[metric] == pytest.approx(expected[metric], abs=1e-4), (key, metric)
    for i in range(len(graph_report["cases"])):
        np.testing.assert_allclose(
            np.load(tmp_path / "graph" / "legrad" / f"{i}.npy"),
            np.load(tmp_path / "torch" / "legrad" / f"{i}.npy"),
            atol=1e-4,
        )


def test_an_exported_folder_is_scored_without_importing_torch(cases_dir, exported, tmp_path):
    code = (
        "import sys; from legrad_export.evaluate_cli import main; "
        f"code = main([{str(cases_dir)!r}, '--model', {str(exported)!r}]); "
        "print(code, [m for m in ('torch', 'open_clip', 'timm') if m in sys.modules])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.splitlines()[-1] == "0 []", run.stderr
    assert "legrad" in run.stdout and "centre-prior" in run.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "-2"], "--layers does not apply to an exported folder"),
        (["--image-size", "64", "--resize-mode", "squash"], "--image-size, --resize-mode do not apply"),
        (["--pretrained", "none"], "--pretrained does not apply"),
    ],
)
def test_torch_only_options_are_refused_for_an_exported_folder(cases_dir, exported, capsys, extra, message):
    assert main([str(cases_dir), "--model", str(exported), *extra]) == 2
    captured = capsys.readouterr()
    (line,) = [ln for ln in captured.err.splitlines() if ln.startswith("legrad-evaluate: error:")]
    assert message in line and "scored as exported" in line and captured.out == ""


def test_a_classifier_folder_scores_its_class_names(cases_dir, model_folders, tmp_path, capsys):
    folder = model_folders["classifier"]
    rows = _rows(cases_dir)[:3]
    names = ["goldfish", "tabby cat", "goldfish"]
    with (tmp_path / "cases.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("image", "prompt", "mask"))
        for row, name in zip(rows, names):
            writer.writerow((cases_dir / row["image"], name, cases_dir / row["mask"]))
    assert main([str(tmp_path), "--model", str(folder), "--save-heatmaps", str(tmp_path / "maps")]) == 0
    warning = f"legrad-evaluate: warning: {folder} was exported with random weights (pretrained none)"
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(warning)]
    model = load(folder)
    for i, (row, name) in enumerate(zip(rows, names)):
        expected = model.explain(cases_dir / row["image"], classes=[name]).heatmap_on_original(0, 0)
        np.testing.assert_allclose(np.load(tmp_path / "maps" / "legrad" / f"{i}.npy"), expected, atol=1e-6)
