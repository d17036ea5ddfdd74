"""Training never loads a teacher, and its result loads without the training code."""

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_training_imports_no_teacher_library(train_store, tmp_path):
    proc = run_python(f"""
        import sys
        from radio_distill.train.loop import train
        from radio_distill.train.config import TrainConfig
        train(TrainConfig(store={str(train_store)!r}, out={str(tmp_path / 'run')!r}, student="test_vit", steps=2,
                          batch_size=4, resolution=32, workers=0, device="cpu"), progress=False)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("open_clip", "segment_anything"))
        teachers = sorted(m for m in sys.modules if m.startswith("radio_distill.cache.teachers"))
        print("LOADED", loaded, teachers)
        """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED [] []" in proc.stdout


def test_exported_student_loads_without_training_code(train_store, tmp_path):
    from radio_distill.train.loop import train
    from .conftest import config
    train(config(train_store, tmp_path / "run", steps=2), progress=False)
    proc = run_python(f"""
        import sys, torch
        from radio_distill.student import load_student
        model = load_student({str(tmp_path / 'run' / 'student')!r})
        out = model(torch.randn(1, 3, 32, 32))
        print("OUT", sorted(out.teachers), tuple(out.teachers["dinov2"].spatial.shape))
        print("MODULES", sorted(m for m in sys.modules if m.startswith(("radio_distill.train", "radio_distill.cache", "ray"))))
        """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OUT ['clip', 'dinov2', 'sam'] (1, 48, 2, 2)" in proc.stdout
    assert "MODULES []" in proc.stdout
