"""A store on S3-compatible object storage (the session's local moto server), built from WebDataset tar
shards, takes class text embeddings, trains a student (its loader workers reading S3 in spawned processes,
the images from the tars by their stored offsets) and evaluates it, by the commands."""

import csv
import io
import json
import tarfile

import numpy as np
import pytest

from typer.testing import CliRunner

from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig
from radio_distill.store.dataset import scan_dataset
from radio_distill.cache.sample_data import CLASSES, make_sample_dataset
from radio_distill.cache.teachers import tiny_teachers
from radio_distill.store.group import open_store
from radio_distill.cli import cache_app, eval_app, train_app


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _tars(folder, out, per_tar=5):
    """The folder's images as webdataset shards of `per_tar` samples: `<key>.<ext>` and `<key>.cls`."""
    manifest = scan_dataset(folder)
    out.mkdir()
    for t, start in enumerate(range(0, len(manifest), per_tar)):
        with tarfile.open(out / f"{t:06d}.tar", "w") as tar:
            for k in range(start, min(start + per_tar, len(manifest))):
                key, ext = manifest.ids[k].rsplit(".", 1)
                for name, data in ((f"{key}.{ext}", (folder / manifest.ids[k]).read_bytes()),
                                   (f"{key}.cls", str(manifest.labels[k]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out / "{000000..000003}.tar")


@pytest.mark.slow
def test_a_store_on_s3_from_tar_shards_trains_and_evaluates(ray_session, s3_url, tmp_path):
    images = make_sample_dataset(tmp_path / "data", images=16, size=64, bad=False)
    shards = _tars(images, tmp_path / "shards")
    report = build_cache(CacheConfig(data=shards, out=s3_url, teachers=tuple(tiny_teachers()), views=2, shard_size=4,
                                     workers=2), progress=False)
    assert report["complete"] and report["ok"] == 16 and report["store"] == s3_url
    root = open_store(s3_url)
    assert root.attrs["dataset"]["kind"] == "tar"
    assert np.bincount(root[L.LOCATIONS][:, 0]).tolist() == [5, 5, 5, 1]  # (tar, offset, size) per sample

    runner = CliRunner()
    names = tmp_path / "classes.txt"  # tar cls labels are numbers: prompts need the words
    names.write_text("\n".join(CLASSES) + "\n")
    _ok(runner.invoke(cache_app, ["text", s3_url, "--device", "cpu", "--classes", str(names)]))
    run = tmp_path / "run"
    _ok(runner.invoke(train_app, [s3_url, "--student", "test_vit", "--out", str(run), "--steps", "2", "--batch-size",
                                  "4", "--resolution", "32", "--workers", "1", "--device", "cpu", "--holdout", "0.25"]))
    assert json.loads((run / "run.json").read_text())["store"] == s3_url
    # a Ray Train worker (its process may predate the S3 settings) gets them from the driver: the same losses
    on_ray = tmp_path / "ray"
    _ok(runner.invoke(train_app, [s3_url, "--student", "test_vit", "--out", str(on_ray), "--steps", "2", "--batch-size",
                                  "4", "--resolution", "32", "--workers", "1", "--device", "cpu", "--holdout", "0.25",
                                  "--ray-workers", "1"]))
    losses = [[row for row in csv.DictReader((r / "metrics.csv").open())] for r in (run, on_ray)]
    assert len(losses[0]) == len(losses[1]) >= 1
    for a, b in zip(*losses):
        assert float(a["clip/spatial"]) == pytest.approx(float(b["clip/spatial"]), rel=1e-4)

    out = tmp_path / "eval"
    _ok(runner.invoke(eval_app, [s3_url, str(run), "--out", str(out), "--workers", "0", "--device", "cpu",
                                 "--no-throughput", "--probe-steps", "5", "--pictures", "1", "--sam-images", "4"]))
    result = json.loads((out / "report.json").read_text())
    assert result["store"] == s3_url
    assert set(result["fidelity"]["teachers"]) == {"clip", "dinov2", "sam"}, result["fidelity"]
    assert "skipped" not in result["zero_shot"], result["zero_shot"]  # the text embeddings were read from S3
