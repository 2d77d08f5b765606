"""The trainer's command line: its defaults are the shipped model's recipe, `--recipe` reaches every
run of the training log and of the GPU sweeps, and nothing else of the research is a flag."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from legrad_shapes.sweep import train_arguments
from legrad_shapes.train import RECIPES, TrainConfig, parse_args, parse_recipe

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = ROOT / "docs" / "sweeps"

# run 4's config as its training.json recorded it (the shipped model until run 15), with the fields
# added later at the values that left it unchanged: runs 4-14 and the first GPU sweep started here
RUN4 = {
    "image_size": 64, "patch_size": 8, "vision_width": 128, "vision_layers": 4, "head_width": 64,
    "mlp_ratio": 4.0, "text_width": 128, "text_layers": 3, "embed_dim": 128, "context_length": 16,
    "batch_size": 64, "steps": 3600, "pool": 60000, "lr": 0.002, "warmup": 100, "weight_decay": 0.05,
    "seed": 0, "threads": 2, "layers": "-3", "logit_scale": 1 / 0.07, "partial_captions": True,
    "text_separation": 1.0, "pos_embed": "learnable", "fused_adamw": False, "token_loss": 0.0,
    "background_caption": "background", "background_loss": 0.0, "warm_size": 0, "warm_steps": 0,
    "patch_dropout": 0.0, "patch_dropout_steps": 0, "device": "cpu",
}  # fmt: skip

# each run's command as the training log states it, in the flags of the time, over run 4's defaults
RUN5 = "--pos-embed sin_cos_2d --fused-adamw true --steps 5000"
HEADS16 = "--vision-layers 6 --vision-width 96 --head-width 16"
LOGGED = {
    "run4": "",
    "run5": RUN5,
    "run7": RUN5 + " --token-loss 3 --background-caption '' --steps 4500",
    "run8": "--image-size 48 --pos-embed sin_cos_2d --fused-adamw true --steps 7000",
    "run10": RUN5 + " --warm-size 48 --steps 6000 --warm-steps 4000",
    "run11": RUN5 + " --warm-size 48 --steps 6200 --warm-steps 5200",
    "run12": "--seed 1",
    "run13": "--pos-embed sin_cos_2d --fused-adamw true --weight-decay 0.2 --steps 4800",
    "run14": "--head-width 32",
    "run15": "--vision-layers 6 --vision-width 96 --head-width 32 --layers all",
    "shipped": HEADS16 + " --layers=-5",  # run 16
    "run17": HEADS16 + " --seed 1 --layers=-4",
}


def old_flags(command: str) -> dict:
    """The fields an old-style command line sets (`--field-name VALUE`, one flag per field)."""
    kinds = {f.name: type(f.default) for f in fields(TrainConfig)}
    words = [part for word in shlex.split(command) for part in word.split("=", 1)]
    out = {}
    for flag, text in zip(words[::2], words[1::2]):
        name = flag.removeprefix("--").replace("-", "_")
        out[name] = text == "true" if kinds[name] is bool else kinds[name](text)
    return out


def config(*argv: str) -> dict:
    return asdict(parse_args(["--out", "unused", *argv])[0])


def test_the_defaults_are_what_the_shipped_model_recorded_at_training_time():
    recorded = json.loads((ROOT / "assets" / "shapes-clip" / "training.json").read_text())["config"]
    assert set(recorded) <= {f.name for f in fields(TrainConfig)}
    for defaults in (asdict(TrainConfig()), config(), config("--recipe", "shipped")):
        assert {name: defaults[name] for name in recorded} == recorded


@pytest.mark.parametrize("name", LOGGED)
def test_each_named_recipe_is_the_logged_command_of_its_run(name):
    assert config("--recipe", name) == RUN4 | old_flags(LOGGED[name])


def test_every_run_of_the_training_log_with_a_command_has_a_recipe():
    assert set(RECIPES) == set(LOGGED)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--recipe", "weight_decay=0.2"], {"weight_decay": 0.2}),  # over the shipped recipe
        (["--recipe", "run5,weight_decay=0.2"], old_flags(RUN5) | {"weight_decay": 0.2}),
        (["--recipe", "run13,background_loss=1", "--steps", "1500", "--pool", "20000", "--threads", "1"],
         old_flags(LOGGED["run13"]) | {"background_loss": 1.0, "steps": 1500, "pool": 20000, "threads": 1}),
        (["--recipe", "run5,steps=10", "--steps", "20"], old_flags(RUN5) | {"steps": 20}),  # the flag wins
        (["--recipe", "run4,fused-adamw=1,patch_dropout=0.5"], {"fused_adamw": True, "patch_dropout": 0.5}),
        (["--recipe", "run4", "--layers", "0,2,3"], {"layers": "0,2,3"}),
    ],
)  # fmt: skip
def test_a_recipe_takes_fields_over_it_and_the_flags_over_both(argv, expected):
    base = RUN4 if argv[1].startswith("run") else asdict(TrainConfig())
    assert config(*argv) == base | expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "run99"], "unknown recipe 'run99'; choose from shipped, run4, run5, run7"),
        (["--recipe", "run5,colour=red"], "unknown TrainConfig field 'colour'; fields: image_size, patch"),
        (["--recipe", "run5,steps=1.5"], "steps='1.5': expected int"),
        (["--recipe", "fused_adamw=yes"], "fused_adamw='yes': expected true or false"),
        (["--recipe", "layers=1,2"], "'2' in recipe 'layers=1,2': expected FIELD=VALUE (layer lists"),
        (["--recipe", "patch_dropout=1.5"], "patch_dropout 1.5 must lie in [0, 1)"),
        (["--pos-embed", "sin_cos_2d"], "unrecognized arguments: --pos-embed sin_cos_2d"),
    ],
)  # fmt: skip
def test_a_bad_recipe_is_a_usage_error_with_the_choices(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--out", "unused", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m legrad_shapes.train") and message in err


def test_the_help_is_one_screen_and_names_every_recipe(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 30
    assert all(name in text for name in RECIPES)


@pytest.mark.parametrize("runs", ["2026-11-22-h100-runs.json", "2026-11-22-h100-heads-runs.json"])
def test_the_gpu_sweeps_runs_still_train_what_they_trained(runs):
    """Each run's arguments, as the sweep passes them, give run 4's defaults (those of the time) with
    the fields its results file recorded over them."""
    recorded = json.loads((SWEEPS / runs.replace("-runs", "-results")).read_text())
    for name, fields_ in json.loads((SWEEPS / runs).read_text()).items():
        assert config(*train_arguments(fields_)) == RUN4 | recorded[name]["config"], name


def test_parse_recipe_reads_an_empty_recipe_as_the_shipped_one():
    assert parse_recipe("") == parse_recipe("shipped") == {}
