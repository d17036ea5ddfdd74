"""The benchmarks at their tiniest scale on the CPU: each script's `main` runs, and its JSON holds the
keys BENCHMARKS.md reads, with positive numbers. One Ray session (tests/conftest.py) serves the builds;
bench/build.py's last store is the one bench/train.py and bench/online.py then reuse."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
META = ("benchmark", "device", "precision", "torch", "date", "command", "versions")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """`bench(name, *args)` -> the JSON `bench/<name>.py --quick ... --json` wrote (and checked against `main`'s return)."""
    sys.path.insert(0, str(BENCH))  # the scripts import their sibling `common`
    work, out = tmp_path_factory.mktemp("bench_work"), tmp_path_factory.mktemp("bench_out")

    def run(name: str, *args: str) -> dict:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # as when run as a script: spawned processes find its functions by name
        try:
            spec.loader.exec_module(module)
            path = out / f"{name}.json"
            returned = module.main(["--quick", "--device", "cpu", "--work", str(work), "--json", str(path), *args])
        finally:
            del sys.modules[name]
        written = json.loads(path.read_text())
        assert written["results"] and len(written["results"]) == len(returned["results"])
        for key in META:
            assert written[key], key
        assert written["command"].startswith(f"python bench/{name}.py --quick")
        return written

    yield run
    sys.path.remove(str(BENCH))


def positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert row[key] is not None and row[key] > 0, (key, row[key])


def test_teachers_sam_sdpa_matches_stock(bench):
    rows = {r["family"]: r for r in bench("teachers", "--steps", "1", "--repeats", "1", "--images", "2",
                                          "--batch-size", "2", "--sam-batch-size", "2")["results"]}
    assert set(rows) == {"clip", "dinov2", "sam"}
    for r in rows.values():
        positive(r, "stock_img_s", "ours_img_s", "speedup")
    assert rows["sam"]["spatial_cos_min"] >= 0.9999 and rows["sam"]["fp32_spatial_cos_min"] >= 0.9999
    assert rows["clip"]["summary_cos_min"] >= 0.9999 and rows["dinov2"]["fp32_spatial_cos_min"] >= 0.9999


@pytest.mark.slow
def test_storage(bench):
    result = bench("storage", "--images", "4", "--teachers", "tiny-sam,tiny-clip", "--tokens", "2048")
    rows = {(r["teacher"].split()[1], r["codec"]): r for r in result["results"]}
    assert {c for t, c in rows if t == "sam"} == {"fp16", "int8", "int8+pool2", "rot-int8", "pca16-int8", "pca8-int8", "pca4-int8"}
    for r in rows.values():
        positive(r, "bytes_per_view", "x_vs_raw_fp16", "x_vs_fp16_zstd", "cos_mean")
    assert rows["sam", "fp16"]["cos_min"] > 0.9999 and rows["sam", "int8"]["cos_mean"] > 0.999
    assert rows["sam", "int8"]["bytes_per_view"] < rows["sam", "fp16"]["bytes_per_view"]
    assert rows["sam", "int8+pool2"]["bytes_per_view"] < rows["sam", "int8"]["bytes_per_view"]
    assert set(result["targets"]) == {r["teacher"] for r in result["results"]}
    known = {(e["case"], e["codec"]): e for e in result["known_structure"]}
    assert {c for c, _ in known} == {"outlier_100x", "outlier_10x", "low_rank"}
    assert all(set(e) >= {"case", "codec", "ratio_vs_fp16", "cos_mean", "cos_min", "chosen"} for e in known.values())
    assert [c for (case, c), e in known.items() if case == "low_rank" and e["chosen"]] == ["pca64-int8"]
    assert known["outlier_100x", "rot-int8"]["chosen"] and known["outlier_100x", "int8"]["cos_mean"] < 0.999
    assert result["known_structure_targets"] == {"outlier_100x_rot_int8": True, "low_rank_budget_8x": True}
    whole = next(r for r in result["radio25_bytes_per_view"] if r["teacher"] == "whole set")
    assert whole["fp16"] == pytest.approx(6.44, abs=0.01)  # the 6.4 MB per view: shapes of the real models


@pytest.mark.slow
def test_build(bench, ray_session):
    rows = bench("build", "--runs", "tiny:8,16", "--shard-size", "8", "--raw-steps", "1", "--stage-images", "8")["results"]
    assert [r["images"] for r in rows] == [8, 16]
    for r in rows:
        positive(r, "seconds", "images_per_s", "ideal_images_per_s", "s_per_1k", "linearity")
        assert set(r["teachers"]) == {"clip", "dinov2", "sam"}
        for t in r["teachers"].values():
            positive(t, "build_views_per_s", "raw_img_per_s", "of_raw", "bytes_per_view")
        positive(r["stage_cpu_s_per_1k"], "decode", "resize", "forward", "quantise", "write")
    assert isinstance(rows[-1]["marginal_s_per_1k"], float)  # may be <= 0 at 8 vs 16 images: first-call costs


@pytest.mark.slow
def test_sources(bench, ray_session):
    rows = bench("sources", "--images", "16", "--per-tar", "8", "--row-group", "4", "--shard-size", "8")["results"]
    assert [r["format"] for r in rows] == ["files", "tar", "parquet"] and all(r["images"] == 16 for r in rows)
    for r in rows:
        positive(r, "scan_s", "read_decode_images_per_s", "build_images_per_s", "build_vs_files")


def test_plan(bench):
    row, unlisted = bench("plan", "--shapes", "30x10", "--unlisted", "20x5")["results"]
    assert (row["tars"], row["samples"], row["tars_opened"]) == (30, 270, 0) and row["met"] is None
    positive(row, "scan_s", "tars_per_s", "us_per_sample", "read_mb", "sidecar_mb", "stats_mb")
    assert (unlisted["mode"], unlisted["tars"], unlisted["samples"]) == ("unlisted", 20, 100)
    assert unlisted["read_mb"] < 0.05 * unlisted["tar_mb"]  # a header block a tar (the process's own reads beside)


@pytest.mark.slow
def test_s3(bench, ray_session):  # its own moto server; AWS_* are restored after
    rows = bench("s3", "--images", "16", "--shard-size", "8", "--shards", "64")["results"]
    rows, scale = rows[:-2], rows[-2:]
    assert [(r["place"], r["phase"]) for r in rows] == [(p, f) for p in ("local", "s3")
                                                        for f in ("build 8", "build 16", "rerun", "verify", "open")]
    assert [r["phase"] for r in scale] == ["rerun, complete, 64 shards", "resume, half done, 64 shards: first shard "
                                                                          "written"]
    for r in scale:
        positive(r, "seconds", "requests", "requests_per_100_shards", "objects")
    for r in rows:
        positive(r, "seconds")
        assert (r["requests"] is None) == (r["place"] == "local"), r
    s3 = {r["phase"]: r for r in rows if r["place"] == "s3"}
    assert s3["build 16"]["requests_per_shard"] == s3["build 16"]["requests"] - s3["build 8"]["requests"] > 0


@pytest.mark.slow
def test_train(bench, ray_session):  # reuses the tiny-16 store of test_build when it ran first
    [row] = bench("train", "--images", "16", "--shard-size", "8", "--batch-size", "4", "--steps", "2",
                  "--warmup", "1", "--workers", "0")["results"]
    positive(row, "compute_img_s", "data_img_s", "train_img_s", "compute_s", "radio_train_img_s")
    assert 0 <= row["wait_fraction"] < 1 and row["bottleneck"] in ("data", "compute")


@pytest.mark.slow
def test_online(bench, ray_session):
    [row] = bench("online", "--images", "16", "--shard-size", "8", "--batch-size", "2", "--steps", "1",
                  "--warmup", "1", "--cache-steps", "2", "--cache-warmup", "1", "--workers", "0")["results"]
    positive(row, "online_img_s", "cached_img_s", "speedup", "online_epoch_h", "cached_epoch_h")
    assert 0 < row["online_teacher_share"] < 1


@pytest.mark.slow
def test_fidelity(bench, ray_session, tmp_path):
    result = bench("fidelity", "--plot", str(tmp_path / "fidelity.png"))
    rows = result["results"]
    assert {(r["views"], r["trained"]) for r in rows} == {(1, "32"), (2, "32"), (2, "32,48"), ("online", "32")}
    assert {(r["side"], r["held"]) for r in rows} == {(s, h) for s in (32, 48) for h in ("view 0", "crops")}
    for r in rows:
        assert all(-1 <= r[k] <= 1 for k in r if "/" in k) and len([k for k in r if "/" in k]) == 5
        positive(r, "train_s", "run_s", *(("teacher_s",) if r["views"] == "online" else ("build_s",)))
    assert (tmp_path / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sam_grid(bench):
    """The toy SAM through its own 16 x 16 grid scores as itself; through 8 x 8 and a bilinear resize, far less."""
    own, _, coarse, _ = bench("sam_grid")["results"]
    assert (own["grid"], own["resize"], own["of_own"]) == ("16x16", "none", 1.0) and own["iou"] > 0.6
    assert (coarse["grid"], coarse["resize"]) == ("8x8", "bilinear") and coarse["of_own"] < 0.8
    assert coarse["objects"] == own["objects"] > 0


def test_student_speed(bench):
    rows = bench("student_speed", "--models", "test_vit", "--steps", "1")["results"]
    positive(rows[0], "infer_img_s", "train_img_s")


def test_student_speed_puts_a_vitdet_next_to_its_plain_vit(bench):
    vit, vitdet = bench("student_speed", "--models", "vit_tiny_patch16_224", "vitdet_tiny", "--steps", "1",
                        "--infer-only", "--backbone-only")["results"]
    assert vit["train_img_s"] is None and "infer_x_vit" not in vit and "train_x_vit" not in vitdet
    assert vitdet["infer_x_vit"] == round(vitdet["infer_img_s"] / vit["infer_img_s"], 2)


@pytest.mark.slow
def test_scale(bench):
    [row] = bench("scale", "--samples", "3000", "--read", "16", "--workers", "1")["results"]
    assert row["samples"] == 3000 and row["train_samples"] > 2500
    positive(row, "open_s", "reader_s", "rss_main_mb", "rss_idle_worker_mb", "worker_peak_mb", "info_s", "listing_s")
    assert row["rss_worker_mb"] == row["worker_peak_mb"] - row["rss_idle_worker_mb"] and row["met"] is None


def test_run_all_parses():
    subprocess.run(["bash", "-n", str(BENCH / "run_all.sh")], check=True)


@pytest.mark.slow
def test_resume(bench):
    [row] = bench("resume", "--images", "24", "--workers", "1")["results"]
    assert row["shards"] == 24 and row["same_values"] and row["same_bytes"]
    positive(row, "build_s", "resume_s")


@pytest.mark.slow
def test_tasks(bench, ray_session):
    rows = bench("tasks")["results"]
    codecs = {r["codec"]: r for r in rows if r["table"] == "codecs"}
    views = {r["run"]: r for r in rows if r["table"] == "views"}
    assert set(codecs) == {"fp16", "int8"} and set(views) == {"teachers (cached targets)", "cached V=1", "cached V=2", "online"}
    tasks = ("kNN shape", "zero-shot shape", "dense mIoU DINOv2", "dense mIoU SAM", "SAM point IoU")
    for r in rows:
        assert all(0 <= r[t] <= 1 for t in tasks), r
    # the V=1 store is built as the int8 codec's store: its cached targets score exactly the same
    assert [views["teachers (cached targets)"][t] for t in tasks] == [codecs["int8"][t] for t in tasks]
    assert codecs["fp16"]["bytes_per_view"] > 1.5 * codecs["int8"]["bytes_per_view"]
    assert codecs["int8"]["picked"]["dinov2/spatial"] == "int8" and codecs["fp16"]["picked"]["dinov2/spatial"] == "fp16"
    assert views["teachers (cached targets)"]["SAM point IoU"] > 0.3  # the toy SAM knows masks; a 2-step student does not
    assert views["online"]["teacher_s_epoch"] > 0 and views["cached V=2"]["build_s"] > 0


@pytest.mark.slow
def test_pattern(bench, ray_session):
    result = bench("pattern")
    assert result["found"]["share"] == pytest.approx(1.0, abs=1e-3) and result["found"]["error"] < 1e-2
    rows = result["results"]
    assert [r["denoise"] for r in rows] == ["none", "mean", "shift"]
    for r in rows:
        assert -1 <= r["carried_cos"] <= 1 and 0 <= r["fidelity_spatial"] <= 1 and r["knn"] is not None
        positive(r, "train_s", "eval_s")


@pytest.mark.slow
def test_tiling(bench, ray_session):
    rows = bench("tiling")["results"]
    assert [(r["trained on"], r["grid"]) for r in rows] == [("dinov2", "8x8"), ("dinov2_x2", "15x15")]
    assert rows[1]["bytes_per_view"] > 3 * rows[0]["bytes_per_view"]  # the tiled entry: 15² tokens beside 8²
    assert all(0 <= r[k] <= 1 for r in rows for k in ("teacher_miou", "student_head_miou", "student_tokens_miou"))


def test_toy_learning(bench):
    rows = bench("toy_learning")["results"]
    assert [r["model"] for r in rows] == ["cnn", "vit-cls", "vit-max", "stem-cls"]
    for r in rows:
        assert set(r) == {"model", "acc@2", "acc@4", "ms_per_step"} and all(0 <= r[k] <= 1 for k in ("acc@2", "acc@4"))
        positive(r, "ms_per_step")
