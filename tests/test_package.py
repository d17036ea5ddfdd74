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
