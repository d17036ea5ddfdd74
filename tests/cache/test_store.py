"""The store contract, read from a real tiny store on disk: layout, shapes, codecs, sharding, attrs, targets.

Letters: N samples, V views, S samples per shard, h, w teacher grid, C spatial channels, D summary dims.
"""

import json

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from radio_distill.store import codecs
from radio_distill.store import layout as L
from radio_distill.store.dataset import load_rgb, scan_dataset
from radio_distill.store.inspect import store_info
from radio_distill.cache.worker import retryable
from radio_distill.cache.sample_data import BAD_FILES, CLASSES
from radio_distill.store.group import open_store
from radio_distill.store.views import crop_resize, view_boxes
from radio_distill.errors import CacheLayoutError

N, V, S = 58, 2, 4  # tests/conftest.py: 48 scenes + 10 odd files, 2 views, shards of 4
TEACHER_NAMES = ["clip", "dinov2", "sam"]


def _meta(store, path) -> dict:
    return json.loads((store / path / "zarr.json").read_text())


def _dequantised(root, name, target, rows=slice(None)) -> np.ndarray:
    values = root[L.target_array(name, target)][rows]
    scale_path = L.scale_array(name, target)
    scale = root[scale_path][rows] if scale_path in root else None
    return codecs.decode(torch.from_numpy(values), None if scale is None else torch.from_numpy(scale)).numpy()


@pytest.fixture(scope="module")
def root(tiny_store):
    return open_store(tiny_store)


def test_sample_arrays(root, sample_dataset):
    manifest = scan_dataset(sample_dataset)
    assert root.attrs["num_samples"] == N and root.attrs["views"] == V and root.attrs["shard_size"] == S
    expected = {L.IDS: ((N,), "str"), L.LABELS: ((N,), "int32"), L.BOXES: ((N, V, 4), "float32"),
                L.STATUS: ((N,), "uint8"), L.ERRORS: ((N,), "str")}
    for path, (shape, dtype) in expected.items():
        kind = root[path].dtype.kind
        assert root[path].shape == shape, path
        assert kind in "TU" if dtype == "str" else root[path].dtype == np.dtype(dtype), path
    assert tuple(root[L.IDS][:]) == manifest.ids
    assert tuple(root[L.LABELS][:]) == manifest.labels
    assert root.attrs["dataset"] == {"root": str(sample_dataset.resolve()), "kind": "folder", "classes": list(CLASSES),
                                     "fingerprint": manifest.fingerprint()}
    ids, labels = root[L.IDS][:], root[L.LABELS][:]
    for i, label in zip(ids, labels):  # labels come from the class subfolders
        assert label == (CLASSES.index(i.split("/")[0]) if "/" in i else -1)


@pytest.mark.parametrize("name", TEACHER_NAMES)
def test_teacher_arrays_match_the_teacher(root, teachers, name):
    info = teachers[name].info()  # built here, independently of the store
    attrs = root[L.teacher_group(name)].attrs
    assert tuple(attrs["grid"]) == tuple(attrs["source_grid"]) == info.grid
    assert attrs["summary_dim"] == info.summary_dim and attrs["spatial_dim"] == info.spatial_dim
    assert attrs["resolution"] == info.resolution
    assert tuple(attrs["mean"]) == pytest.approx(info.mean) and tuple(attrs["std"]) == pytest.approx(info.std)
    assert attrs["storage"] == {"spatial": "int8", "summary": "fp16", "pool": 1}
    assert attrs["identity"] == root.attrs["settings"]["teachers"][name]
    assert attrs["identity"]["preset"] == "tiny" and attrs["identity"]["random_init"] is True
    assert attrs["identity"]["family"] == name

    h, w = info.grid
    spatial, scale = root[L.target_array(name, "spatial")], root[L.scale_array(name, "spatial")]
    assert spatial.shape == (N, V, h, w, info.spatial_dim) and spatial.dtype == np.int8
    assert scale.shape == (N, V, h, w) and scale.dtype == np.float16
    if info.summary_dim is None:
        assert L.target_array(name, "summary") not in root and L.scale_array(name, "summary") not in root
    else:
        summary = root[L.target_array(name, "summary")]
        assert summary.shape == (N, V, info.summary_dim) and summary.dtype == np.float16
        assert L.scale_array(name, "summary") not in root  # fp16 needs no scale
    done = root[L.done_array(name)]
    assert done.shape == (L.shard_count(N, S),) and (done[:] == 1).all()


def test_every_array_is_checksummed_and_compressed(tiny_store):
    metas = sorted(tiny_store.rglob("zarr.json"))
    arrays = 0
    for path in metas:
        meta = json.loads(path.read_text())
        if meta["node_type"] != "array":
            continue
        arrays += 1
        codec_list = meta["codecs"]
        if codec_list[0]["name"] == "sharding_indexed":
            inner = codec_list[0]["configuration"]
            names = [c["name"] for c in inner["codecs"]]
            assert "crc32c" in [c["name"] for c in inner["index_codecs"]], path
        else:
            names = [c["name"] for c in codec_list]
        assert "zstd" in names and names[-1] == "crc32c", path
    assert arrays >= 5 + 3 * 2  # sample arrays plus targets, scales, done, moments, norm


@pytest.mark.parametrize("name", TEACHER_NAMES)
def test_chunk_is_one_sample_view_and_shard_is_shard_size_samples(tiny_store, root, name):
    targets = [t for t in L.TARGETS if L.target_array(name, t) in root]
    for path in [L.target_array(name, t) for t in targets] + [L.scale_array(name, t) for t in targets
                                                              if L.scale_array(name, t) in root]:
        meta = _meta(tiny_store, path)
        shape = meta["shape"]
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [S, *shape[1:]], path
        inner = meta["codecs"][0]
        assert inner["name"] == "sharding_indexed", path
        assert inner["configuration"]["chunk_shape"] == [1, 1, *shape[2:]], path
    # one file per shard on disk
    files = sorted((tiny_store / L.target_array(name, "spatial") / "c").rglob("*"))
    assert len([f for f in files if f.is_file()]) == L.shard_count(N, S)
    for path in (L.IDS, L.BOXES):  # sample arrays: one chunk per shard, one writer
        assert _meta(tiny_store, path)["chunk_grid"]["configuration"]["chunk_shape"][0] == S
    for path, rows in ((L.STATUS, N), (L.SPLIT, N), (L.done_array(name), L.shard_count(N, S))):  # the driver's
        assert _meta(tiny_store, path)["chunk_grid"]["configuration"]["chunk_shape"][0] == rows  # one file


def test_boxes_view0_centred_square_and_views_inside_the_image(root, sample_dataset):
    ids, boxes, status = root[L.IDS][:], root[L.BOXES][:], root[L.STATUS][:]
    for sample_id, box, st in zip(ids, boxes, status):
        if st != L.OK:
            assert (box == 0).all()
            continue
        with Image.open(sample_dataset / sample_id) as im:
            width, height = im.size
        side = min(width, height)
        np.testing.assert_allclose(box[0], [(width - side) / 2, (height - side) / 2, (width + side) / 2,
                                            (height + side) / 2], err_msg=sample_id)
        assert (box[1:, :2] >= 0).all() and (box[1:, 2] <= width + 1e-3).all() and (box[1:, 3] <= height + 1e-3).all()
        assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
        np.testing.assert_array_equal(box, view_boxes(width, height, views=V, seed=0, sample_id=sample_id))
    huge = list(ids).index("huge.jpg")
    np.testing.assert_allclose(boxes[huge, 0], [1500, 0, 10500, 9000])  # source pixels, not decoded ones


def test_status_and_reasons_of_bad_inputs(root, tiny_store):
    ids, status, errors = root[L.IDS][:], root[L.STATUS][:], root[L.ERRORS][:]
    by_id = {i: (s, e) for i, s, e in zip(ids, status, errors)}
    for name, reason in BAD_FILES.items():
        assert by_id[name] == (L.MISSING if retryable(reason) else L.UNREADABLE, reason)
    for name in ("cmyk.jpg", "grey16.png", "grey.jpg", "rgba.png", "palette.png", "one_pixel.png", "huge.jpg"):
        assert by_id[name] == (L.OK, ""), name
    assert (status != L.PENDING).all() and (status == L.OK).sum() == N - len(BAD_FILES)
    info = store_info(tiny_store)
    assert info["unreadable"] == BAD_FILES and info["ok"] == N - 3 and info["pending"] == 0
    # unreadable samples hold no targets
    bad = np.flatnonzero(np.isin(status, L.BAD))
    assert (root[L.target_array("clip", "spatial")][bad[0]] == 0).all()


@pytest.mark.parametrize("name", TEACHER_NAMES)
def test_fidelity_and_norm_statistics(root, name):
    group = root[L.teacher_group(name)]
    fidelity = group.attrs["fidelity"]
    assert fidelity["spatial"]["mean_cos"] >= 0.999 and fidelity["spatial"]["min_cos"] > 0.99  # int8
    assert ("summary" in fidelity) == (name != "sam")
    ok = root[L.STATUS][:] == L.OK
    for target in L.TARGETS:
        if L.target_array(name, target) not in root:
            assert L.norm_array(name, target, "mean") not in root
            continue
        x = _dequantised(root, name, target)[ok].astype(np.float64)
        tokens = x.reshape(-1, x.shape[-1])  # every stored token of every readable view
        mean, cov = root[L.norm_array(name, target, "mean")][:], root[L.norm_array(name, target, "cov")][:]
        assert mean.shape == (tokens.shape[1],) and cov.shape == (tokens.shape[1],) * 2
        np.testing.assert_allclose(mean, tokens.mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(cov, np.cov(tokens.T, bias=True), rtol=1e-4, atol=1e-6)
        assert group.attrs["norm"][target]["count"] == tokens.shape[0]


@pytest.mark.parametrize("sample_id", ["circle/00000.jpg", "huge.jpg", "one_pixel.png"])
def test_stored_targets_are_the_teachers_output_on_the_stored_box(root, teachers, sample_dataset, sample_id):
    """Every teacher saw the same stored box: a fresh forward of that crop matches the dequantised targets."""
    k = list(root[L.IDS][:]).index(sample_id)
    boxes = root[L.BOXES][k]
    image, span, _ = load_rgb(sample_dataset / sample_id, min_side=max(t.resolution for t in teachers.values()))
    for name, teacher in teachers.items():
        pixels = np.stack([crop_resize(image, boxes[v], teacher.resolution, span=span) for v in range(V)])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(teacher.std).view(1, 3, 1, 1)
        with torch.inference_mode():
            summary, spatial = teacher(x)
        stored = torch.from_numpy(_dequantised(root, name, "spatial", k))
        assert codecs.token_cosine(spatial, stored).min() > 0.999, name
        if sample_id == "circle/00000.jpg":  # a textured scene: another view's crop gives other features
            assert codecs.token_cosine(spatial.flip(0), stored).mean() < 0.99, name
        if summary is not None:
            stored = torch.from_numpy(_dequantised(root, name, "summary", k))
            assert codecs.token_cosine(summary, stored).min() > 0.999, name


def test_open_store_refuses_what_is_not_ours(tmp_path, tiny_store):
    with pytest.raises(CacheLayoutError, match="no zarr.json"):
        open_store(tmp_path)
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["format"] = "something"
    with pytest.raises(CacheLayoutError, match="not a radio-distill store"):
        open_store(tmp_path / "other.zarr")
    import shutil
    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_store, old)
    zarr.open_group(old, mode="r+").attrs["layout_version"] = L.LAYOUT_VERSION + 1
    with pytest.raises(CacheLayoutError, match=f"layout v{L.LAYOUT_VERSION + 1}, this version reads "
                                               f"v1, v2, v3, v4, v{L.LAYOUT_VERSION}; rebuild it"):
        open_store(old)


def test_two_builds_into_different_paths_are_identical(tiny_store, cli_store, assert_same_store):
    path, result = cli_store
    assert result.exit_code == 0, result.output
    assert_same_store(tiny_store, path)
