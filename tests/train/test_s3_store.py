"""A store on S3-compatible object storage (the session's local moto server) takes class text embeddings,
trains a student (its loader workers reading S3 in spawned processes) and evaluates it, by the commands."""

import json

from typer.testing import CliRunner

from radio_distill.cache.build import CacheConfig, build_cache
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import tiny_teachers
from radio_distill.cli import cache_app, eval_app, train_app


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_a_store_on_s3_trains_and_evaluates(ray_session, s3_url, tmp_path):
    images = make_sample_dataset(tmp_path / "data", images=16, size=64, bad=False)
    report = build_cache(CacheConfig(data=images, out=s3_url, teachers=tuple(tiny_teachers()), views=2, shard_size=4,
                                     workers=2), progress=False)
    assert report["complete"] and report["ok"] == 16 and report["store"] == s3_url

    runner = CliRunner()
    _ok(runner.invoke(cache_app, ["text", s3_url, "--device", "cpu"]))
    run = tmp_path / "run"
    _ok(runner.invoke(train_app, [s3_url, "--student", "test_vit", "--out", str(run), "--steps", "2", "--batch-size",
                                  "4", "--resolution", "32", "--workers", "1", "--device", "cpu", "--holdout", "0.25"]))
    assert json.loads((run / "run.json").read_text())["store"] == s3_url

    out = tmp_path / "eval"
    _ok(runner.invoke(eval_app, [s3_url, str(run), "--out", str(out), "--workers", "0", "--device", "cpu",
                                 "--no-throughput", "--probe-steps", "5", "--pictures", "1", "--sam-images", "4"]))
    result = json.loads((out / "report.json").read_text())
    assert result["store"] == s3_url
    assert set(result["fidelity"]["teachers"]) == {"clip", "dinov2", "sam"}, result["fidelity"]
    assert "skipped" not in result["zero_shot"], result["zero_shot"]  # the text embeddings were read from S3
