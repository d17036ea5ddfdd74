"""The package's public surface."""

import subprocess
import sys


def test_public_names_resolve_lazily():
    code = ("import sys, radio_distill as r\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('open_clip', 'segment_anything', 'ray')]\n"
            "print(sorted(n for n in r.__all__ if callable(getattr(r, n))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(sorted(["CacheConfig", "EvalConfig", "TrainConfig", "build_cache", "create_student",
                                              "load_student"]))


def test_dependencies_are_ranges_and_tests_use_the_constraints():
    """Installing beside a newer compatible timm (or zarr, Ray...) must not downgrade it: no `==` pins in
    the package metadata; the exact versions the suite ran with live in scripts/constraints.txt."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    deps = [Requirement(d) for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert not [str(d) for d in deps if any(s.operator in ("==", "===", "~=") for s in d.specifier)]
    pinned = {Requirement(line).name for line in (root / "scripts" / "constraints.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    assert {"timm", "open_clip_torch", "zarr", "tensorstore", "ray"} <= pinned
    assert "-c scripts/constraints.txt" in (root / "scripts" / "setup.sh").read_text()


def test_the_rooms_depend_one_way():
    """store/ imports no other room; training reads stores without the build or any teacher library."""
    code = ("import sys, radio_distill.store.reader, radio_distill.store.inspect, radio_distill.train.loop\n"
            "print(sorted({m for m in sys.modules if m.startswith(('radio_distill.cache', 'radio_distill.evaluate',"
            " 'open_clip', 'segment_anything', 'ray'))}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
    from pathlib import Path

    store = Path(__file__).resolve().parents[1] / "store"
    for module in store.glob("*.py"):
        text = module.read_text()
        assert not [room for room in ("cache", "train", "evaluate", "student") if f"from ..{room}" in text], module
