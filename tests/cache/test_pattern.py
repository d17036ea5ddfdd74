"""`radio-cache pattern`: each teacher's fixed pattern, against known answers: numpy over the stored targets, and
a known pattern P added to every stored target, which the pass must find on top of the store's own."""

import shutil

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from radio_distill.cache.build import build_cache
from radio_distill.cache.pattern import estimate_patterns
from radio_distill.cli import cache_app
from radio_distill.errors import CacheIntegrityError
from radio_distill.store import layout as L
from radio_distill.store.inspect import store_info, verify_store
from radio_distill.store.pattern import pattern_strength
from radio_distill.store.reader import CacheReader, decode_targets

runner = CliRunner()
TEACHERS = ("clip", "dinov2", "sam")


@pytest.fixture(scope="module")
def fp16_store(ray_session, small_config, tmp_path_factory):
    """`small_store`'s build with fp16 spatial targets (8 samples x 2 views), whose values a test can shift exactly;
    SAM's pooled x2, so its pattern lives on the pooled grid its targets are stored and decoded on."""
    out = tmp_path_factory.mktemp("fp16_store") / "cache.zarr"
    assert build_cache(small_config(out, spatial_codec="fp16", pools={"sam": 2}), progress=False)["complete"]
    return out


def _copy(store, tmp_path, name="copy.zarr"):
    return shutil.copytree(store, tmp_path / name)


def _expected(store, teacher, rows=None):
    """(offset, var) by numpy over the decoded spatial targets of every view of `rows` (default: the samples OK)."""
    root = zarr.open_group(store, mode="r")
    if rows is None:
        rows = np.flatnonzero(root[L.STATUS][:] == L.OK)
    x = root[L.target_array(teacher, "spatial")].oindex[rows].astype(np.float64)  # (n, V, h, w, C)
    if L.scale_array(teacher, "spatial") in root:
        x *= root[L.scale_array(teacher, "spatial")].oindex[rows].astype(np.float64)[..., None]
    x = x.reshape(-1, *x.shape[2:])
    mean = x.mean(0)
    return mean - mean.mean((0, 1)), x.var(0)


def _stored(store, teacher):
    root = zarr.open_group(store, mode="r")
    return tuple(root[L.pattern_array(teacher, s)][...] for s in L.PATTERN)


def test_the_pattern_is_the_mean_per_position_less_the_mean_over_positions(tiny_store, tmp_path):
    store = _copy(tiny_store, tmp_path)  # int8 targets; 3 unreadable samples, whose fill values must not count
    result = estimate_patterns(store)
    root = zarr.open_group(store, mode="r")
    ok = int((root[L.STATUS][:] == L.OK).sum())
    assert result["samples"] == ok == 55 and result["views"] == 2
    for name in TEACHERS:
        offset, var = _stored(store, name)
        want_offset, want_var = _expected(store, name)
        attrs = root[L.teacher_group(name)].attrs
        assert offset.dtype == var.dtype == np.float32 and offset.shape == (*attrs["grid"], attrs["spatial_dim"])
        np.testing.assert_allclose(offset, want_offset, rtol=1e-4, atol=1e-5 * np.abs(want_offset).max())
        np.testing.assert_allclose(var, want_var, rtol=1e-4, atol=1e-5 * want_var.max())
        assert dict(root[L.pattern_group(name)].attrs) | {"created_by": None} == {
            "samples": ok, "maps": 2 * ok, "grid": list(offset.shape[:2]), "created_by": None,
            "resolution": attrs["resolution"]}
        assert result["teachers"][name] == {"grid": list(offset.shape[:2]), **pattern_strength(offset, var, ok)}


def test_samples_reads_that_many_spread_over_the_usable_ones(tiny_store, tmp_path):
    store = _copy(tiny_store, tmp_path)
    assert estimate_patterns(store, samples=5)["samples"] == 5
    usable = np.flatnonzero(zarr.open_group(store, mode="r")[L.STATUS][:] == L.OK)
    rows = usable[[0, 14, 27, 40, 54]]  # np.linspace(0, 54, 5) rounded
    offset, var = _stored(store, "dinov2")
    want_offset, want_var = _expected(store, "dinov2", rows)
    np.testing.assert_allclose(offset, want_offset, rtol=1e-4, atol=1e-5 * np.abs(want_offset).max())
    np.testing.assert_allclose(var, want_var, rtol=1e-4, atol=1e-5 * want_var.max())
    assert estimate_patterns(store, samples=1000)["samples"] == 55  # more than there are: all of them


def test_a_known_pattern_added_to_the_targets_is_found_on_top_of_the_stores_own(fp16_store, tmp_path, record_again):
    clean, shifted = _copy(fp16_store, tmp_path, "clean.zarr"), _copy(fp16_store, tmp_path, "shifted.zarr")
    estimate_patterns(clean)
    root = zarr.open_group(shifted, mode="r+")
    known = {}
    for k, name in enumerate(("dinov2", "sam")):
        array = root[L.target_array(name, "spatial")]
        values = array[...].astype(np.float32)  # (N, V, h, w, C)
        p = np.random.default_rng(k).standard_normal(values.shape[2:])
        p -= p.mean((0, 1))  # zero mean over positions: the targets' global mean stays
        known[name] = (p * values.std() / p.std()).astype(np.float32)  # as strong as the tokens
        array[...] = (values + known[name]).astype(np.float16)
        record_again(shifted, array.path)
    estimate_patterns(shifted)
    for name in TEACHERS:
        (offset, var), (own, own_var) = _stored(shifted, name), _stored(clean, name)
        p = known.get(name, 0.0)
        scale = np.abs(zarr.open_group(shifted, mode="r")[L.target_array(name, "spatial")][...]).max()
        np.testing.assert_allclose(offset, own + p, rtol=0, atol=1e-3 * scale)  # fp16 rounding of the shifted values
        # a shift per position keeps the variance there
        np.testing.assert_allclose(var, own_var, rtol=1e-2, atol=1e-3 * scale * np.sqrt(own_var.max()))
        if name in known:
            assert np.sqrt((known[name] ** 2).mean()) > 100 * 1e-3 * scale  # P itself is far above that tolerance
    assert verify_store(shifted)["arrays"] == verify_store(fp16_store)["arrays"] + 2 * len(TEACHERS)


def test_denoise_mean_decodes_the_targets_less_the_pattern_exactly(fp16_store, tmp_path):
    store = _copy(fp16_store, tmp_path)
    estimate_patterns(store)
    plain, denoised = CacheReader(store), CacheReader(store, denoise="mean")
    batch = next(iter(plain.loader(plain.indices(holdout=0.0), resolution=32, batch_size=8, seed=0, start_step=0,
                                   steps=1, workers=0)))
    cpu = torch.device("cpu")
    a, b = decode_targets(batch, plain.teachers, cpu), decode_targets(batch, denoised.teachers, cpu)
    root = zarr.open_group(store, mode="r")
    for name in TEACHERS:
        attrs = root[L.teacher_group(name)].attrs
        p = torch.from_numpy(root[L.pattern_array(name, "offset")][...])
        assert p.shape == (*attrs["grid"], attrs["spatial_dim"]) and p.abs().max() > 0
        assert torch.equal(b[name]["spatial"], a[name]["spatial"] - p)
        assert (a[name]["summary"] is None and b[name]["summary"] is None) or torch.equal(a[name]["summary"],
                                                                                          b[name]["summary"])
    sam = root[L.teacher_group("sam")].attrs
    assert sam["grid"] == [g // 2 for g in sam["source_grid"]]  # its pattern is on the pooled grid


def test_info_shows_the_patterns_and_draws_them(tiny_store, tmp_path):
    store = _copy(tiny_store, tmp_path)
    before = runner.invoke(cache_app, ["info", str(store)])
    assert before.exit_code == 0 and before.stdout.count("fixed pattern: not estimated") == 3
    assert [t["pattern"] for t in store_info(store)["teachers"].values()] == [None] * 3
    result = runner.invoke(cache_app, ["pattern", str(store), "--samples", "20"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert f"wrote the fixed patterns of 3 teachers to {store} from 20 samples x 2 views" in out
    info = store_info(store)
    for name in TEACHERS:
        p = info["teachers"][name]["pattern"]
        assert p == {"samples": 20, "maps": 40, **pattern_strength(*_stored(store, name), 20)}
        assert 0 < p["ratio"] < 1 and 0 < p["noise"] < 1
        assert f"{name}: grid {'x'.join(map(str, info['teachers'][name]['grid']))}, pattern RMS {p['ratio']:.4f}" in out
    picture = tmp_path / "pattern.png"
    shown = runner.invoke(cache_app, ["info", str(store), "--picture", str(picture)])
    assert shown.exit_code == 0 and " ".join(shown.stdout.split()).count("fixed pattern: RMS ") == 3
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def test_bad_input_is_one_line_before_anything_is_written(tiny_store, tmp_path):
    store = _copy(tiny_store, tmp_path)
    for args, message in ((["--samples", "0"], "--samples 0: must be a whole number >= 1"),
                          (["--samples", "-3"], "--samples -3: must be a whole number >= 1")):
        assert _one_error_line(runner.invoke(cache_app, ["pattern", str(store), *args])) == message
    assert "no zarr.json" in _one_error_line(runner.invoke(cache_app, ["pattern", str(tmp_path)]))
    assert "holds no fixed pattern to draw; run `radio-cache pattern" in _one_error_line(
        runner.invoke(cache_app, ["info", str(store), "--picture", str(tmp_path / "p.png")]))
    assert "not a file in an existing folder" in _one_error_line(
        runner.invoke(cache_app, ["info", str(store), "--picture", str(tmp_path / "nowhere" / "p.png")]))
    zarr.open_group(store, mode="r+")[L.done_array("sam")][3] = 0  # a shard not done: the store is incomplete
    assert "is incomplete: 14 of 15 shards done" in _one_error_line(runner.invoke(cache_app, ["pattern", str(store)]))
    root = zarr.open_group(store, mode="r")
    assert not any(L.pattern_group(name) in root for name in TEACHERS)
    assert not (tmp_path / "p.png").exists()


def test_verify_finds_an_altered_pattern(tiny_store, tmp_path):
    store = _copy(tiny_store, tmp_path)
    estimate_patterns(store, samples=10)
    verify_store(store)
    array = zarr.open_group(store, mode="r+")[L.pattern_array("dinov2", "offset")]
    array[0, 0, 0] += 1.0  # its file replaced: the digest in its attrs no longer matches
    with pytest.raises(CacheIntegrityError, match=f"{L.pattern_array('dinov2', 'offset')} holds other values"):
        verify_store(store)
    info = store_info(store)["teachers"]
    assert "holds other values" in info["dinov2"]["pattern"]["error"] and "error" not in info["clip"]["pattern"]
