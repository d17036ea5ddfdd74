"""A store built with fidelity budgets: the calibration pass picks, records and stores its codecs, the
targets decode (on the training device, one matmul) to the teachers' outputs, a rerun reuses the
calibration, verify checks it, and the store trains and evaluates unchanged; layout v1 stores still open.

Letters: N samples, V views, h, w grid, C channels, k stored channels.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from radio_distill.store import codecs
from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import load_cache_config
from radio_distill.store.dataset import load_rgb
from radio_distill.store.inspect import store_info, verify_store
from radio_distill.store.provenance import WHOLE, values_digest
from radio_distill.store.group import open_store
from radio_distill.store.views import crop_resize
from radio_distill.errors import CacheIntegrityError, CacheLayoutError, RadioDistillError
from radio_distill.ops import normalise
from radio_distill.store.reader import CacheReader, decode_targets

BUDGETS = {None: 0.95, "sam": 0.999}  # random tiny teachers: 0.95 is met by a PCA, 0.999 by plain int8


@pytest.fixture(scope="module")
def budget_store(ray_session, small_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "cache.zarr"
    report = build_cache(small_config(out, fidelity=BUDGETS), progress=False)
    assert report["complete"] and report["ok"] == 8, report
    return out


@pytest.mark.slow
def test_budget_picks_records_and_stores_the_codecs(budget_store):
    info = store_info(budget_store)
    assert info["layout_version"] == L.LAYOUT_VERSION
    assert info["calibration"]["samples"] == 8 and info["calibration"]["held"] == 4 and info["calibration"]["seconds"] > 0
    assert open_store(budget_store)[L.CALIBRATION][:].tolist() == list(range(8))  # spread: all 8 of a tiny set
    for name, t in info["teachers"].items():
        budget = BUDGETS.get(name, BUDGETS[None])
        assert t["storage"]["fidelity"] == budget
        for target, chosen in t["calibration"].items():
            assert t["storage"][target] == chosen["codec"] and chosen["budget"] == budget
            assert chosen["met"] and chosen["cos_mean"] >= budget
            assert chosen["tried"][-1]["codec"] == chosen["codec"]
            assert all(c["cos_mean"] < budget for c in chosen["tried"][:-1])  # every smaller one missed it
            assert t["fidelity"][target]["mean_cos"] > budget - 0.03  # measured over the whole build
    assert info["teachers"]["clip"]["storage"]["spatial"].startswith("pca")
    assert info["teachers"]["sam"]["storage"]["spatial"] == "int8"
    assert "sam/calib/spatial_basis" not in str(list(zarr.open_group(budget_store).members(max_depth=None)))
    for name in ("clip", "dinov2"):  # fewer channels stored than the teacher has
        t = info["teachers"][name]
        assert codecs.stored_channels(t["storage"]["spatial"], t["spatial_dim"]) < t["spatial_dim"]


def test_targets_decode_to_the_teachers_output(budget_store, small_dataset, teachers):
    """A fresh forward of the stored box vs what decode_targets gives back (one matmul with the stored basis)."""
    reader = CacheReader(budget_store)
    root = open_store(budget_store)
    rows = np.arange(8)
    batch = {}
    for t in reader.teachers:
        for path in t.arrays:
            batch[path] = torch.from_numpy(root[path][rows, 0])
    decoded = decode_targets(batch, reader.teachers, torch.device("cpu"))
    for name, teacher in teachers.items():
        attrs = root[L.teacher_group(name)].attrs
        pixels = []
        for i in rows:
            image, span, _ = load_rgb(small_dataset / reader.ids[i], min_side=64)
            pixels.append(crop_resize(image, root[L.BOXES][i, 0], teacher.resolution, span=span))
        x = normalise(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2), teacher.mean, teacher.std)
        with torch.inference_mode():
            outputs = dict(zip(("summary", "spatial"), teacher(x)))
        for target, value in outputs.items():
            if value is None:
                continue
            stored = root[L.target_array(name, target)]
            codec = attrs["storage"][target]
            assert stored.shape[-1] == codecs.stored_channels(codec, value.shape[-1])
            cos = codecs.token_cosine(value, decoded[name][target])
            assert cos.mean() > attrs["calibration"][target]["budget"] - 0.03, (name, target, codec)
            assert decoded[name][target].shape == value.shape


@pytest.mark.slow
def test_rerun_reuses_the_calibration_and_redoes_shards_to_the_same_bytes(budget_store, small_config, tmp_path,
                                                                           assert_same_store):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(budget_store, copy)
    root = zarr.open_group(copy, mode="r+")
    for name in ("clip", "dinov2", "sam"):
        root[L.done_array(name)][1] = 0
    report = build_cache(small_config(copy, fidelity=BUDGETS), progress=False)
    assert report["complete"] and report["shards_run"] == 1
    assert report["calibration"] == {**store_info(budget_store)["calibration"], "ran": False}  # same seconds
    assert_same_store(copy, budget_store)


def test_verify_checks_the_calibration_arrays(budget_store, tmp_path):
    assert verify_store(budget_store)["ok"]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(budget_store, copy)
    basis = zarr.open_group(copy, mode="r+")[L.calib_array("clip", "spatial", "basis")]
    basis[...] = 2 * basis[...]
    with pytest.raises(CacheIntegrityError, match="teachers/clip/calib/spatial_basis holds other values than were"):
        verify_store(copy)
    basis.attrs[WHOLE] = values_digest(basis[...])  # as if the build had written it so
    with pytest.raises(CacheIntegrityError, match="teachers/clip/calib/spatial_basis: not .* orthonormal columns"):
        verify_store(copy)
    shutil.rmtree(copy / L.calib_array("clip", "spatial", "mean"))
    with pytest.raises(CacheLayoutError, match="teachers/clip/calib/spatial_mean is missing"):
        open_store(copy)


@pytest.mark.slow
def test_layout_v1_stores_open_and_newer_ones_are_refused(small_store, tmp_path):
    old = tmp_path / "v1.zarr"
    shutil.copytree(small_store, old)
    zarr.open_group(old, mode="r+").attrs["layout_version"] = 1  # a v1 store: plain codecs, no calibration
    reader = CacheReader(old)
    assert all(not t.transforms for t in reader.teachers) and store_info(old)["layout_version"] == 1
    zarr.open_group(old, mode="r+").attrs["layout_version"] = 6
    with pytest.raises(CacheLayoutError, match=r"^store '.*' is layout v6, this version reads v1, v2, v3, v4, v5; rebuild"):
        open_store(old)


@pytest.mark.parametrize("kwargs, message", [
    (dict(fidelity={None: 0.99}, spatial_codec="fp16"), "teacher 'clip': spatial codec fp16 and fidelity 0.99 both given"),
    (dict(fidelity={"dino": 0.99}), r"--fidelity names unknown teacher\(s\) \['dino'\]"),
    (dict(fidelity={"sam": "high"}), "teacher 'sam': fidelity must be a number like 0.99, got 'high'"),
])
def test_bad_budgets_are_refused_in_one_line(small_config, tmp_path, kwargs, message):
    with pytest.raises(RadioDistillError, match=message):
        small_config(tmp_path / "x.zarr", **kwargs)


@pytest.mark.parametrize("budget", [0.0, 1.0, 1.5])
def test_budget_out_of_range_is_refused_before_anything_is_created(small_config, tmp_path, budget):
    out = tmp_path / "x.zarr"
    with pytest.raises(RadioDistillError, match=rf"teacher 'clip': --fidelity must be a mean cosine in \(0, 1\)"):
        build_cache(small_config(out, fidelity={None: budget}), progress=False)
    assert not out.exists()


def test_toml_budget_per_teacher_and_for_all(small_dataset, tmp_path):
    path = tmp_path / "cache.toml"
    path.write_text(f'data = "{small_dataset}"\nout = "o.zarr"\nfidelity = 0.98\n'
                    '[[teachers]]\nspec = "clip:ViT-B-16"\n[[teachers]]\nspec = "sam:vit_b"\nfidelity = 0.995\n'
                    '[[teachers]]\nspec = "dinov2:vit_small_patch14_dinov2.lvd142m"\nspatial = "fp16"\n')
    with pytest.raises(RadioDistillError, match="teacher 'dinov2': spatial codec fp16 and fidelity 0.98"):
        load_cache_config(path)
    cfg = load_cache_config(path, teachers=["clip:ViT-B-16", "sam:vit_b"], fidelity={"sam": 0.9})
    assert {n: (s.fidelity, s.spatial) for n, s in cfg.storage.items()} == {"clip": (0.98, "auto"), "sam": (0.9, "auto")}


def test_budget_store_trains_with_radio_train_and_evaluates_with_radio_eval(budget_store, tmp_path):
    """The targets of calibrated codecs reach the losses and the evaluation decoded, like any store's."""
    from typer.testing import CliRunner

    from radio_distill.cli import eval_app, train_app

    run = tmp_path / "run"
    for loss in ("amradio", "phis"):
        result = CliRunner().invoke(train_app, [str(budget_store), "--student", "test_vit", "--out", str(run / loss),
                                                "--steps", "2", "--batch-size", "4", "--resolution", "32",
                                                "--holdout", "0.4", "--workers", "0", "--device", "cpu",
                                                "--loss", loss, "--log-every", "1"])
        assert result.exit_code == 0, result.output
    metrics = (run / "phis" / "metrics.csv").read_text().splitlines()
    assert len(metrics) >= 3 and "nan" not in metrics[-1]
    result = CliRunner().invoke(eval_app, [str(budget_store), str(run / "amradio"), "--out", str(tmp_path / "eval"),
                                           "--workers", "0", "--device", "cpu", "--no-throughput", "--probe-steps", "3",
                                           "--pictures", "1"])
    assert result.exit_code == 0, result.output
    fidelity = json.loads((tmp_path / "eval" / "report.json").read_text())["fidelity"]["teachers"]
    assert set(fidelity) == {"clip", "dinov2", "sam"}
    assert all(-1 <= v["spatial"] <= 1 for v in fidelity.values())  # finite cosines to the decoded targets


def test_cli_info_shows_the_choice_and_build_takes_budgets(budget_store, small_dataset, tmp_path):
    from typer.testing import CliRunner

    from radio_distill.cli import cache_app

    result = CliRunner().invoke(cache_app, ["info", str(budget_store)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "picked by --fidelity 0.95; held-back cos summary" in text and "picked by --fidelity 0.999" in text
    assert "calibration: view 0 of 8 samples spread over the dataset (4 held back)" in text
    assert f"layout v{L.LAYOUT_VERSION}" in text and "bytes/view" in text
    base = ["build", str(small_dataset), "--out", str(tmp_path / "x.zarr"), "--teachers", "tiny"]
    for args, message in ((["--fidelity", "0.9", "--fidelity", "sam=1.5"], "teacher 'sam': --fidelity must be a mean cosine"),
                          (["--fidelity", "sam=high"], "--fidelity 'sam=high': expected a mean cosine like 0.99"),
                          (["--fidelity", "dino=0.9"], r"--fidelity names unknown teacher(s) ['dino']")):
        result = CliRunner().invoke(cache_app, base + args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "x.zarr").exists()
