"""One tiny labelled store with masks and CLIP text embeddings, a short training run, and one
evaluation of it run in a fresh process (so the test can see which modules evaluation imports)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import tiny_teachers
from radio_distill.cache.text import write_text_embeddings
from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train

HOLDOUT = 0.25
FAST = dict(workers=0, device="cpu", probe_steps=40, throughput_seconds=0.05, batch_size=16)  # EvalConfig overrides


def write_instances(data: Path) -> None:
    """instances/ beside masks/: each one-shape sample's object is instance 1 (its class mask's shape)."""
    for mask in sorted((data / "masks").rglob("*.png")):
        out = data / "instances" / mask.relative_to(data / "masks")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(mask) as m:
            Image.fromarray((np.asarray(m) > 0).astype(np.uint8)).save(out)


@pytest.fixture(scope="session")
def eval_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    images = make_sample_dataset(root / "data", images=40, size=64, bad=True)
    write_instances(root / "data")
    cfg = CacheConfig(data=images, out=root / "cache.zarr", teachers=tuple(tiny_teachers()), views=2,
                      shard_size=8, workers=2)
    build_cache(cfg, progress=False)
    write_text_embeddings(cfg.out, device="cpu")
    train(TrainConfig(store=cfg.out, out=root / "run", student="test_vit", steps=10, batch_size=8, resolution=32,
                      lr=3e-3, workers=0, device="cpu", holdout=HOLDOUT, log_every=1), progress=False)
    return SimpleNamespace(root=root, images=images, store=cfg.out, run=root / "run")


def evaluate_in_subprocess(setup, out, **overrides) -> SimpleNamespace:
    """`evaluate` in a fresh interpreter; records the rows each feature pass ran on and the modules loaded."""
    code = f"""
        import json, sys
        import radio_distill.evaluate.report as R
        from radio_distill.evaluate import EvalConfig, evaluate
        calls, collect = [], R.collect
        def spy(reader, model, indices, **kw):
            calls.append([kw["what"], [int(i) for i in indices]])
            return collect(reader, model, indices, **kw)
        R.collect = spy
        evaluate(EvalConfig(store={str(setup.store)!r}, run={str(setup.run)!r}, out={str(out)!r},
                            **{ {**FAST, **overrides}!r}), progress=False)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("open_clip", "segment_anything")
                        or m.startswith("radio_distill.cache.teachers"))
        print("RESULT", json.dumps({{"calls": calls, "loaded": loaded}}))
        """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    return SimpleNamespace(out=out, report=json.loads((out / "report.json").read_text()), **result)


@pytest.fixture(scope="session")
def evaluated(eval_setup):
    """Every metric of the tiny run, evaluated in a fresh interpreter."""
    return evaluate_in_subprocess(eval_setup, eval_setup.root / "eval")
