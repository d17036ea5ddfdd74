"""`radio-train ... | cat`: without a terminal, progress comes as whole lines with every teacher's losses."""

from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train


def test_progress_lines_without_a_terminal(train_store, tmp_path, capsys):
    train(TrainConfig(store=train_store, out=tmp_path / "run", student="test_vit", steps=3, batch_size=4,
                      resolution=32, workers=0, device="cpu", log_every=1), progress=True)
    lines = [s for s in capsys.readouterr().err.splitlines() if s.startswith("training: ")]
    assert lines and lines[-1].startswith("training: 3/3 steps (100%), ")
    losses = lines[-1].split(" | ", 1)[1].split("  ")
    assert [s.split()[0] for s in losses] == ["clip/summary", "clip/spatial", "dinov2/summary", "dinov2/spatial",
                                              "sam/spatial"]
    assert all(float(s.split()[1]) > 0 for s in losses)
