"""Training recipes: TOML and command-line values become one TrainConfig."""

import pytest

from radio_distill.errors import RadioDistillError
from radio_distill.train.config import load_train_config


def test_recipe_and_command_line_merge(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('store = "s.zarr"\nout = "run"\nstudent = "eradio_base"\nsteps = 100\nlr = 0.002\n'
                      '[loss]\nkind = "phis"\nteacher_weights = { sam = 0.5 }\n[student_overrides]\nhead_blocks = 2\n')
    cfg = load_train_config(recipe, lr=0.001, loss={"kind": None, "teacher_weights": None})
    assert (cfg.student, cfg.steps, cfg.lr, str(cfg.store)) == ("eradio_base", 100, 0.001, "s.zarr")
    assert cfg.loss.kind == "phis" and cfg.loss.teacher_weights == {"sam": 0.5}
    assert cfg.student_overrides == {"head_blocks": 2}


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
