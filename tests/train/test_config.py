"""Training recipes: TOML and command-line values become one TrainConfig."""

from pathlib import Path

import pytest
import torch

from radio_distill.errors import RadioDistillError, UnknownStudentError
from radio_distill.train.config import TrainConfig, load_train_config


def test_recipe_and_command_line_merge(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('store = "s.zarr"\nout = "run"\nstudent = "eradio_base"\nsteps = 100\nlr = 0.002\n'
                      '[loss]\nkind = "phis"\nteacher_weights = { sam = 0.5 }\n[student_overrides]\nhead_blocks = 2\n'
                      '[upsample]\nsam = 2\n')
    cfg = load_train_config(recipe, lr=0.001, loss={"kind": None, "teacher_weights": None}, upsample=None)
    assert (cfg.student, cfg.steps, cfg.lr, str(cfg.store)) == ("eradio_base", 100, 0.001, "s.zarr")
    assert cfg.loss.kind == "phis" and cfg.loss.teacher_weights == {"sam": 0.5}
    assert cfg.student_overrides == {"head_blocks": 2} and cfg.upsample == {"sam": 2}
    assert load_train_config(recipe, upsample={"sam": 4}).upsample == {"sam": 4}  # the command line's, whole


@pytest.mark.parametrize("text, message", [
    ('store = "s"\nout = "o"\nstep = 3\n', "unknown keys \\['step'\\]"),
    ('store = "s"\nout = "o"\nsteps = 3\n[loss]\nkind = "l2"\n', "unknown loss 'l2'; choose from amradio, phis"),
    ('store = "s"\nout = "o"\n', "give --steps or --epochs"),
    ('out = "o"\nsteps = 3\n', "missing 'store'"),
    ('store = "s\n', "config '.*r.toml'"),
])
def test_bad_recipes_name_the_culprit(tmp_path, text, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    with pytest.raises(RadioDistillError, match=message):
        load_train_config(recipe)


@pytest.mark.parametrize("values, message", [
    (dict(steps=0), r"--steps 0: must be a whole number >= 1"),
    (dict(steps=2.5), r"--steps 2.5: must be a whole number"),
    (dict(epochs=-1.0), r"--epochs -1.0: must be a finite number > 0"),
    (dict(lr=float("nan")), r"--lr nan: must be a finite number > 0"),
    (dict(holdout=1.0), r"--holdout 1.0: must be a fraction in \[0, 1\)"),
    (dict(warmup_steps=-1), r"--warmup-steps -1: must be a whole number >= 0"),
    (dict(loss={"teacher_weights": {"sam": float("inf")}}), r"--teacher-weight sam=inf: must be a finite number >= 0"),
    (dict(loss={"spatial_weight": -1}), r"\[loss\] spatial_weight -1: must be"),
    (dict(batch_size="8"), r"--batch-size '8': must be a whole number >= 1"),  # a string from a TOML recipe
    (dict(resolution=[224, 0]), r"--resolution 0: must be a whole number >= 1"),
    (dict(resolution=[224, 384, 224]), r"--resolution 224,384,224: give one side or several different ones"),
    (dict(resolution=[]), r"--resolution : give one side or several"),
    (dict(resolution=[224, 384], resolution_policy="mixed"), r"--resolution-policy 'mixed': choose from random, partition"),
    (dict(resolution=[224, 384], resolution_policy="partition"),
     r"--batch-size 64 with --resolution 224,384: --resolution-policy partition needs one batch size per resolution"),
    (dict(resolution=[224, 384], batch_size=[64, 16]),
     r"--batch-size 64,16 with --resolution 224,384: several batch sizes need --resolution-policy partition"),
    (dict(resolution=[224, 384], batch_size=[64, 16, 8], resolution_policy="partition"), r"needs one batch size per"),
    (dict(resolution=[224, 384], batch_size=[64, -16], resolution_policy="partition"), r"--batch-size -16: must be"),
])
def test_bad_values_are_refused_naming_the_option(values, message):
    with pytest.raises(RadioDistillError, match=message):
        load_train_config(**{"store": "s.zarr", "out": "run", "steps": 3, **values})


def test_resolution_sets_from_a_recipe_and_one_side_as_today(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('store = "s"\nout = "o"\nsteps = 3\nresolution = [224, 512]\nbatch_size = [64, 16]\n'
                      'resolution_policy = "partition"\n')
    cfg = load_train_config(recipe)
    assert (cfg.resolution, cfg.batch_size, cfg.sides, cfg.batch_sizes) == ((224, 512), (64, 16), (224, 512), (64, 16))
    one = load_train_config(store="s", out="o", steps=3, resolution=[224], batch_size=[32], resolution_policy="partition")
    assert (one.resolution, one.batch_size, one.sides) == (224, 32, (224,))  # a list of one is that value


def test_good_edge_values_pass():
    cfg = load_train_config(store="s.zarr", out="run", epochs=0.5, holdout=0.0, workers=0, warmup_steps=0,
                            images="moved/images", loss={"teacher_weights": {"sam": 0.0}})
    assert cfg.holdout == 0.0 and cfg.images == Path("moved/images") and cfg.loss.teacher_weights == {"sam": 0.0}


@pytest.mark.parametrize("device, message", [
    ("tpu", r"--device 'tpu': not a device here; use cpu, cuda or cuda:N"),
    ("cuda", r"--device cuda: no CUDA GPU is visible here; use --device cpu"),
    ("cuda:7", r"--device cuda:7: no CUDA GPU"),
])
def test_devices_this_machine_lacks_are_refused(monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RadioDistillError, match=message):
        load_train_config(store="s.zarr", out="run", steps=3, device=device)


def test_a_gpu_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RadioDistillError, match=r"--device cuda:7: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        load_train_config(store="s.zarr", out="run", steps=3, device="cuda:7")
    assert load_train_config(store="s.zarr", out="run", steps=3, device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize("text, culprit", [
    ('resume = "no"', "'resume' must be true or false, got \"no\""),  # a string is truthy: it resumed
    ('allow_partial = "no"', "'allow_partial' must be true or false, got \"no\""),
    ('loss = "phis"', "'loss' must be a table, got \"phis\""),
    ('[loss]\nkind = 2', "'loss.kind' must be a string, got 2"),
    ('[loss]\nteacher_weights = { sam = "half" }', "'loss.teacher_weights' must be a table of numbers"),
    ("student_overrides = 4", "'student_overrides' must be a table, got 4"),
    ("upsample = { sam = 1.5 }", "'upsample' must be a table of whole numbers"),
    ("device = 0", "'device' must be a string, got 0"),
    ("steps = 2.5", "'steps' must be a whole number, got 2.5"),
    ('lr = "1e-3"', "'lr' must be a number, got \"1e-3\""),
    ('resolution = [224, "384"]', "'resolution' must be a whole number or an array of whole numbers"),
    ("store = 5", "'store' must be a string, got 5"),
])
def test_recipe_values_of_the_wrong_type_name_the_key_and_the_file(tmp_path, text, culprit):
    recipe = tmp_path / "r.toml"
    recipe.write_text("\n".join([*(f'{key} = "{key[0]}"' for key in ("store", "out") if not text.startswith(key)),
                                 *(["steps = 3"] if "steps" not in text else []), text]))
    with pytest.raises(RadioDistillError) as e:
        load_train_config(recipe)
    assert str(e.value).startswith(f"config '{recipe}': {culprit}")


def test_recipe_values_become_what_the_config_holds(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('store = "s"\nout = "o"\nepochs = 2\nlr = 1\nresume = true\nimages = "i"\n')
    cfg = load_train_config(recipe)
    assert (cfg.epochs, cfg.lr, cfg.resume, cfg.out, cfg.images) == (2.0, 1.0, True, Path("o"), Path("i"))
    assert isinstance(cfg.lr, float)  # as --lr gives it: a resume compares the two


def test_steps_and_epochs_together_are_refused_and_the_command_line_replaces_the_recipe(tmp_path):
    with pytest.raises(RadioDistillError, match="--steps 3 and --epochs 1.0: give one of them, not both"):
        load_train_config(store="s", out="o", steps=3, epochs=1.0)
    recipe = tmp_path / "r.toml"
    recipe.write_text('store = "s"\nout = "o"\nsteps = 3\nepochs = 1.0\n')
    with pytest.raises(RadioDistillError, match="--steps 3 and --epochs 1.0: give one"):
        load_train_config(recipe)
    recipe.write_text('store = "s"\nout = "o"\nsteps = 3\n')
    cfg = load_train_config(recipe, epochs=2.0)
    assert (cfg.steps, cfg.epochs) == (None, 2.0)


def test_a_min_lr_above_lr_is_refused(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('store = "s"\nout = "o"\nsteps = 3\nmin_lr = 0.5\n')
    with pytest.raises(RadioDistillError, match=r"min_lr 0.5 is above --lr 0.001: the rate would climb"):
        load_train_config(recipe)
    assert load_train_config(recipe, lr=0.5).min_lr == 0.5  # a constant rate after warmup


def test_an_out_under_a_file_is_refused(tmp_path):
    (tmp_path / "f.txt").write_text("keep me")
    for out in (tmp_path / "f.txt", tmp_path / "f.txt" / "run"):
        with pytest.raises(RadioDistillError, match=f"--out '{out}'.* is a file, not a folder; give another --out"):
            load_train_config(store="s", out=out, steps=3)
    assert (tmp_path / "f.txt").read_text() == "keep me"


def test_a_misspelt_student_is_named_before_any_number(tmp_path):
    """It was reported as a batch-size problem first."""
    with pytest.raises(UnknownStudentError, match="unknown student 'vit_smal_patch16_224'; did you mean "):
        TrainConfig(store=tmp_path, out=tmp_path / "r", student="vit_smal_patch16_224", steps=1, batch_size=0)
