"""Tar shards and Parquet files as build input: the same images give the same targets as a folder, bad
files are named in one line, a partial build resumes, and training and evaluation read images by location."""

import io
import json
import os
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import load_cache_config
from radio_distill.store.dataset import scan_dataset
from radio_distill.store.inspect import verify_store
from radio_distill.cache.sample_data import BAD_FILES, CLASSES, make_sample_dataset
from radio_distill.store.sources import Images, scan_source
from radio_distill.store.group import open_store
from radio_distill.cli import cache_app
from radio_distill.errors import DatasetError

BUILD = dict(teachers="tiny", views=1, shard_size=4, workers=1)  # views=1: view 0 is the same box whatever the id
PER_TAR = 7
ROW_GROUP = 4


def write_tars(folder: Path, out: Path, *, per_tar: int = PER_TAR) -> list[Path]:
    """The folder's images as webdataset shards, in the folder's order: `<key>.<ext>` plus the label as
    `<key>.cls` (even keys) or `<key>.json` (odd keys); the last shard ends with a key with no image."""
    manifest = scan_dataset(folder)
    out.mkdir(parents=True)
    tars = []
    for t, start in enumerate(range(0, len(manifest), per_tar)):
        tars.append(out / f"{t:06d}.tar")
        with tarfile.open(tars[-1], "w") as tar:
            for k in range(start, min(start + per_tar, len(manifest))):
                key, ext = manifest.ids[k].rsplit(".", 1)
                members = {ext.lower(): (folder / manifest.ids[k]).read_bytes()}
                label = manifest.labels[k]
                if label >= 0:
                    members["cls" if k % 2 == 0 else "json"] = (str(label) if k % 2 == 0 else
                                                               json.dumps({"label": label})).encode()
                for e, data in members.items():
                    _add(tar, f"{key}.{e}", data)
            if start + per_tar >= len(manifest):
                _add(tar, "notes/readme.json", b'{"text": "no image here"}')
    return tars


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_parquet(folder: Path, out: Path, *, files: int = 2) -> list[Path]:
    """The folder's images as Hugging Face `datasets` Parquet files: image struct {bytes, path}, label,
    class names in the schema metadata; row groups of ROW_GROUP rows."""
    manifest = scan_dataset(folder)
    out.mkdir(parents=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": list(manifest.classes), "_type": "ClassLabel"}}}}
    schema = pa.schema([("image", image), ("label", pa.int64())], metadata={"huggingface": json.dumps(meta)})
    paths, per_file = [], -(-len(manifest) // files)
    for f in range(files):
        rows = range(f * per_file, min((f + 1) * per_file, len(manifest)))
        table = pa.table({"image": [{"bytes": (folder / manifest.ids[k]).read_bytes(), "path": manifest.ids[k]}
                                    for k in rows],
                          "label": [manifest.labels[k] if manifest.labels[k] >= 0 else None for k in rows]},
                         schema=schema)
        paths.append(out / f"train-{f:05d}-of-{files:05d}.parquet")
        pq.write_table(table, paths[-1], row_group_size=ROW_GROUP)
    return paths


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One set of images as a folder, as tar shards and as Parquet files."""
    root = tmp_path_factory.mktemp("sources")
    folder = make_sample_dataset(root / "data", images=8, size=64, bad=True)  # 17 images, 3 unreadable
    tars = write_tars(folder, root / "shards")
    parquets = write_parquet(folder, root / "parquet")
    return {"root": root, "folder": folder, "tars": tars, "parquets": parquets,
            "tar_pattern": str(root / "shards" / f"{{000000..{len(tars) - 1:06d}}}.tar"),
            "parquet_pattern": str(root / "parquet" / "*.parquet")}


@pytest.fixture(scope="module")
def stores(ray_session, datasets, tmp_path_factory):
    """{kind: store}: the three datasets built with the same settings."""
    out = tmp_path_factory.mktemp("source_stores")
    stores = {}
    for kind, data in (("folder", datasets["folder"]), ("tar", datasets["tar_pattern"]),
                       ("parquet", datasets["parquet_pattern"])):
        stores[kind] = out / f"{kind}.zarr"
        report = build_cache(load_cache_config(data=data, out=stores[kind], **BUILD), progress=False)
        assert report["complete"], report
    return stores


def _key(kind: str, sample_id: str, folder_ids: list[str]) -> str:
    """The folder id of a sample: the tar key plus its image's extension; the Parquet row's image."""
    if kind == "tar":
        return next((i for i in folder_ids if i.rsplit(".", 1)[0] == sample_id.split("/", 1)[1]), sample_id)
    return folder_ids[int(sample_id.rsplit("/", 1)[1]) + (PARQUET_OFFSET if "00001-of" in sample_id else 0)]


PARQUET_OFFSET = 9  # 17 rows in 2 files


def test_tar_scan_ids_labels_and_offsets_that_read_back_the_exact_bytes(datasets):
    folder = scan_dataset(datasets["folder"])
    m = scan_source(datasets["tar_pattern"])
    assert m.kind == "tar" and m.root == datasets["root"] / "shards" and m.files == ("000000.tar", "000001.tar",
                                                                                     "000002.tar")
    assert len(m) == len(folder) + 1  # and the key without an image
    assert m.ids[0] == f"000000.tar/{folder.ids[0].rsplit('.', 1)[0]}" and m.ids[-1] == "000002.tar/notes/readme"
    assert m.reasons == {len(m) - 1: "no image member (has: json)"}
    assert list(m.labels[:-1]) == list(folder.labels) and m.labels[-1] == -1
    assert m.classes == tuple(str(c) for c in range(len(CLASSES)))
    payloads = Images(m.source()).read(m.ids, m.locations)
    for k, sample_id in enumerate(folder.ids):
        assert payloads[k] == (datasets["folder"] / sample_id).read_bytes(), sample_id
    assert payloads[-1] is None
    again = scan_source(datasets["root"] / "shards" / "*.tar")  # a glob lists the same samples
    assert again.fingerprint() == m.fingerprint()


def test_parquet_scan_ids_labels_classes_and_rows(datasets):
    folder = scan_dataset(datasets["folder"])
    m = scan_source(datasets["parquet_pattern"])
    assert m.kind == "parquet" and m.column == "image" and len(m) == len(folder)
    assert m.ids[:2] == ("train-00000-of-00002.parquet/0", "train-00000-of-00002.parquet/1")
    assert m.ids[PARQUET_OFFSET] == "train-00001-of-00002.parquet/0"
    assert m.labels == folder.labels and m.classes == folder.classes == CLASSES
    assert m.locations[5].tolist() == [0, 1, 1] and m.locations[PARQUET_OFFSET + 4].tolist() == [1, 1, 0]
    payloads = Images(m.source()).read(m.ids, m.locations)
    assert payloads == [(datasets["folder"] / i).read_bytes() for i in folder.ids]


@pytest.mark.slow
def test_folder_tar_and_parquet_stores_hold_identical_targets(stores, datasets, read_arrays):
    arrays = {kind: read_arrays(path) for kind, path in stores.items()}
    folder_ids = [str(i) for i in arrays["folder"][L.IDS]]
    targets = [p for p in arrays["folder"] if p.startswith("teachers/") and "/moments/" not in p and "/norm/" not in p
               and not p.endswith("/done")]
    assert len(targets) >= 5  # clip, dinov2 summary + spatial (+ scales), sam spatial
    for kind in ("tar", "parquet"):
        x = arrays[kind]
        rows = {_key(kind, str(i), folder_ids): r for r, i in enumerate(x[L.IDS])}
        assert set(folder_ids) <= set(rows)
        for f, sample_id in enumerate(folder_ids):
            r = rows[sample_id]
            for path in (L.STATUS, L.ERRORS, L.BOXES, L.LABELS, *targets):
                assert np.array_equal(x[path][r], arrays["folder"][path][f]), (kind, sample_id, path)
        bad = {str(x[L.IDS][r]): str(x[L.ERRORS][r]) for r in np.flatnonzero(np.isin(x[L.STATUS], L.BAD))}
        expected = {_key(kind, i, folder_ids): reason for i, reason in bad.items()}
        assert {k: v for k, v in expected.items() if k in BAD_FILES} == BAD_FILES
        if kind == "tar":  # the key without an image is a sample, unreadable, saying what it has
            assert bad["000002.tar/notes/readme"] == "no image member (has: json)"
        assert open_store(stores[kind]).attrs["dataset"]["kind"] == kind
    info = CliRunner().invoke(cache_app, ["info", str(stores["tar"])])
    assert info.exit_code == 0 and f"({len(datasets['tars'])} tar files)" in " ".join(info.output.split()), info.output
    assert L.LOCATIONS not in arrays["folder"] and arrays["tar"][L.LOCATIONS].shape == (len(folder_ids) + 1, 3)


@pytest.mark.slow
def test_a_partial_tar_build_moved_and_resumed_equals_the_whole_build(ray_session, datasets, stores, tmp_path,
                                                                      assert_same_store):
    moved = tmp_path / "elsewhere"
    shutil.copytree(datasets["root"] / "shards", moved)
    out = tmp_path / "resumed.zarr"
    cfg = load_cache_config(data=datasets["tar_pattern"], out=out, max_shards=2, **BUILD)
    report = build_cache(cfg, progress=False)
    assert not report["complete"] and report["shards_run"] == 2
    report = build_cache(replace(cfg, data=Path(moved / "*.tar"), max_shards=None), progress=False)
    assert report["complete"] and report["shards_run"] == L.shard_count(18, 4) - 2
    verify_store(out)
    assert open_store(out).attrs["dataset"]["root"] == str(moved)
    open_store(out, mode="r+").attrs["dataset"] = open_store(stores["tar"]).attrs["dataset"]  # the one difference
    assert_same_store(out, stores["tar"])


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def test_bad_packed_input_is_named_in_one_line_before_anything_is_created(datasets, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(datasets["root"] / "shards", shards)
    (tmp_path / "p").mkdir()
    cases = [(str(tmp_path / "nothing" / "{000..009}.tar"), r"'.*nothing/000\.tar' \(from '.*'\) does not exist"),
             (str(tmp_path / "p" / "*.tar"), r"'.*\*\.tar' matches no file")]
    members = list(tarfile.open(shards / "000001.tar"))
    k = next(k for k, m in enumerate(members) if m.name.endswith(".jpg"))
    for name, size, why in (("cut_in_data.tar", members[k].offset_data + 100, "cannot be read .*unexpected end of data"),
                            ("cut_at_member.tar", members[k + 1].offset, "is truncated: it ends at byte"),
                            ("cut_in_header.tar", members[k + 1].offset + 100, "is truncated: it ends at byte")):
        shutil.copy(shards / "000001.tar", tmp_path / name)
        _cut(tmp_path / name, size)
        cases.append((str(tmp_path / name), rf"tar file '.*{name}' {why}"))
    parquet = tmp_path / "p" / "cut.parquet"
    shutil.copy(datasets["parquets"][0], parquet)
    _cut(parquet, parquet.stat().st_size - 20)
    cases.append((str(parquet), r"parquet file '.*cut\.parquet' cannot be read .*truncated or not Parquet"))
    pq.write_table(pa.table({"name": ["a"], "label": [1]}), tmp_path / "p" / "no_images.parquet")
    cases.append((str(tmp_path / "p" / "no_images.parquet"),
                  r"has no image column .*; its columns: name \(string\), label \(int64\)"))
    with tarfile.open(tmp_path / "p" / "000000.tar.gz", "w:gz") as tar:
        _add(tar, "k.jpg", (datasets["folder"] / scan_dataset(datasets["folder"]).ids[0]).read_bytes())
    for data in ("000000.tar.gz", "*.tar*"):  # named, or matched by a pattern beside plain tars
        cases.append((str(tmp_path / "p" / data), r"'.*000000\.tar\.gz' is a compressed tar: .*decompress"))
    shutil.copy(tmp_path / "p" / "000000.tar.gz", tmp_path / "p" / "photo.jpg")  # one file that is no list
    cases.append((str(tmp_path / "p" / "photo.jpg"), r"'.*photo\.jpg' is not a list file \(not UTF-8 text\)"))
    for data, pattern in cases:
        with pytest.raises(DatasetError, match=pattern) as e:
            scan_source(data)
        assert "\n" not in str(e.value)
    out = tmp_path / "x.zarr"
    result = CliRunner().invoke(cache_app, ["build", str(tmp_path / "cut_in_data.tar"), "--out", str(out),
                                            "--teachers", "tiny"])
    assert result.exit_code != 0 and "cut_in_data.tar" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_unreadable_members_and_rows_are_recorded_with_their_reasons(ray_session, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    make_sample_dataset(tmp_path / "good", images=2, size=64)
    for i, f in enumerate(sorted((tmp_path / "good" / "images").rglob("*.jpg"))):
        shutil.copy(f, folder / f"good{i}.jpg")
    (folder / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    write_tars(folder, tmp_path / "shards")
    paths = write_parquet(folder, tmp_path / "parquet", files=1)
    table = pq.read_table(paths[0])
    table = table.set_column(0, "image", pa.array([*table.column("image").to_pylist()[:2], None],
                                                   table.schema.field("image").type))
    pq.write_table(table, paths[0])
    for data, culprit in ((tmp_path / "shards" / "000000.tar", "000000.tar/noise"),
                          (paths[0], f"{paths[0].name}/2")):
        out = tmp_path / f"{culprit.split('.')[0]}.zarr"
        report = build_cache(load_cache_config(data=data, out=out, **BUILD), progress=False)
        assert report["complete"] and report["ok"] == 2, report
        reason = "no image bytes (null)" if culprit.endswith("/2") else "not an image (unidentified format)"
        assert [k for k, v in report["unreadable"].items() if v == reason] == [culprit], report["unreadable"]


@pytest.mark.slow
def test_parquet_rows_with_a_path_instead_of_bytes_read_that_file(ray_session, tmp_path):
    """As `datasets`' `to_parquet` writes local images: {bytes: null, path}, absolute or relative to the file."""
    folder = make_sample_dataset(tmp_path / "data", images=3, size=64, bad=False)
    files = sorted(folder.rglob("*.jpg"))
    (tmp_path / "parquet" / "sub").mkdir(parents=True)
    shutil.copy(files[0], tmp_path / "parquet" / "sub" / "far.jpg")
    shutil.copy(files[1], tmp_path / "parquet" / "near.jpg")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": None, "path": str(tmp_path / "parquet" / "sub" / "far.jpg")}, {"bytes": None, "path": "near.jpg"},
            {"bytes": None, "path": "gone.jpg"}, {"bytes": files[2].read_bytes(), "path": "/where/it/once/was.jpg"}]
    pq.write_table(pa.table({"image": pa.array(rows, image)}), tmp_path / "parquet" / "paths.parquet")
    report = build_cache(load_cache_config(data=tmp_path / "parquet" / "paths.parquet", out=tmp_path / "p.zarr",
                                           **BUILD), progress=False)
    assert report["complete"] and report["ok"] == 3 and report["unreadable"] == {"paths.parquet/2": "missing file"}
    folder_store = build_cache(load_cache_config(data=folder, out=tmp_path / "f.zarr", **BUILD), progress=False)
    assert folder_store["complete"]
    got, want = open_store(tmp_path / "p.zarr"), open_store(tmp_path / "f.zarr")
    where = {str(i): r for r, i in enumerate(want[L.IDS][:])}
    for row, f in ((0, files[0]), (1, files[1]), (3, files[2])):  # the same targets as the folder's
        assert np.array_equal(got["teachers/dinov2/summary"][row], want["teachers/dinov2/summary"][where[
            f.relative_to(folder).as_posix()]])


@pytest.mark.parametrize("written", ["../../x.jpg", "/etc/hostname", "~/x.jpg", "OUTSIDE"])
def test_a_parquet_row_naming_a_file_outside_the_dataset_is_refused_at_scan(tmp_path, written, monkeypatch):
    """As a list file refuses such paths (it was read). Root: the folder of both files; a row with bytes keeps
    its path unread, and its row group, all with bytes by its statistics, is not read."""
    written = str(tmp_path / "x.jpg") if written == "OUTSIDE" else written
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name, rows in (("a/0.parquet", [{"bytes": b"jpeg", "path": "/where/it/once/was.jpg"},
                                        {"bytes": None, "path": "../b/near.jpg"}, {"bytes": None, "path": written}]),
                       ("b/1.parquet", [{"bytes": None, "path": "near.jpg"}])):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image": pa.array(rows, image)}), tmp_path / "data" / name, row_group_size=1)
    groups, read = [], pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda pf, g, **kw: groups.append(g) or read(pf, g, **kw))
    with pytest.raises(DatasetError) as e:
        scan_source(tmp_path / "data" / "*" / "*.parquet")
    assert str(e.value) == (f"parquet file '{tmp_path / 'data' / 'a' / '0.parquet'}', row 2: image path '{written}' is "
                            f"outside the dataset's folder '{tmp_path / 'data'}'; a row without bytes names a file "
                            "under it")
    assert groups == [1, 2]


def _write_masks(datasets, stores) -> Path:
    """Masks mirroring the tar and Parquet ids, where evaluation looks by default (next to the shards' folder)."""
    folder_masks = datasets["folder"].parent / "masks"
    masks = datasets["root"] / "masks"
    for kind in ("tar", "parquet"):
        for sample_id in open_store(stores[kind])[L.IDS][:]:
            key = _key(kind, str(sample_id), [str(i) for i in open_store(stores["folder"])[L.IDS][:]])
            source = folder_masks / Path(key).with_suffix(".png")
            if source.is_file():
                target = masks / f"{sample_id}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target)
    return masks


def test_training_and_evaluation_read_tar_and_parquet_images_by_location(stores, datasets, tmp_path, monkeypatch):
    from radio_distill.evaluate import EvalConfig, evaluate
    from radio_distill.train.config import TrainConfig
    from radio_distill.train.loop import train
    from radio_distill.store.reader import CacheReader

    _write_masks(datasets, stores)
    folder = CacheReader(stores["folder"])
    folder_ids = [str(i) for i in folder.ids[np.arange(folder.num_samples)]]

    def no_scan(*args, **kwargs):
        raise AssertionError("a tar was scanned while training")

    monkeypatch.setattr(tarfile, "open", no_scan)
    for kind in ("tar", "parquet"):
        reader = CacheReader(stores[kind])
        reader.check_images(reader.indices(holdout=0.0))
        rows = reader.indices(holdout=0.0)
        crops = reader.dataset(resolution=32).crops([(int(r), 0) for r in rows])
        for r, crop in zip(rows, crops):  # the same pixels as decoded from the folder's file
            f = folder_ids.index(_key(kind, reader.ids[int(r)], folder_ids))
            assert np.array_equal(crop, folder.dataset(resolution=32).crop(f, 0)), (kind, reader.ids[int(r)])
        run = tmp_path / f"run_{kind}"
        result = train(TrainConfig(store=stores[kind], out=run, student="test_vit", steps=3, batch_size=4,
                                   resolution=32, workers=1 if kind == "tar" else 0, device="cpu", holdout=0.3,
                                   log_every=1), progress=False)
        assert result["step"] == 3
        report = evaluate(EvalConfig(store=stores[kind], run=run, out=tmp_path / f"eval_{kind}", throughput=False,
                                     pictures=1, probe_images=4, workers=0, device="cpu", probe_steps=5,
                                     batch_size=8, sam=False), progress=False)
        assert "skipped" not in report["dense"] and report["dense"]["train_images"] > 0, report["dense"]
        assert "skipped" not in report["fidelity"] and "skipped" not in report["knn"]


def test_a_missing_or_cut_tar_is_named_before_training(stores, datasets, tmp_path):
    from radio_distill.store.reader import CacheReader

    shards = tmp_path / "shards"
    shutil.copytree(datasets["root"] / "shards", shards)
    reader = CacheReader(stores["tar"], images=shards)
    rows = reader.indices(holdout=0.0)
    reader.check_images(rows)
    _cut(shards / "000001.tar", 3000)
    with pytest.raises(DatasetError, match=r"image '.*000001\.tar \(cut short: 3000 bytes, its members reach byte"):
        reader.check_images(rows)
    (shards / "000001.tar").unlink()
    with pytest.raises(DatasetError, match=r"image '.*000001\.tar' is missing; .*--images"):
        reader.check_images(rows)


@pytest.mark.slow
def test_calibration_reads_tar_samples_by_location(ray_session, datasets, tmp_path):
    out = tmp_path / "budget.zarr"
    report = build_cache(load_cache_config(data=datasets["tar_pattern"], out=out, fidelity={None: 0.99},
                                           **BUILD), progress=False)
    assert report["complete"] and report["calibration"]["ran"]
    rows = open_store(out)[L.CALIBRATION][:]
    ids = open_store(out)[L.IDS][:]
    assert len(rows) == report["calibration"]["samples"] >= 10 and all("/" in str(ids[r]) for r in rows)


def test_a_keys_image_by_extension_order_labels_from_json_and_a_binary_parquet_column(tmp_path):
    jpg, png = io.BytesIO(), io.BytesIO()
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    image.save(jpg, "JPEG")
    image.save(png, "PNG")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for name, data in (("x/k1.png", png.getvalue()), ("x/k1.JPG", jpg.getvalue()), ("x/k1.json", b'{"cls": 3}'),
                           ("k2.webp.txt", b"caption"), ("k2.png", png.getvalue()), ("README", b"not a member")):
            _add(tar, name, data)
    m = scan_source(tmp_path / "a.tar")
    assert m.ids == ("a.tar/x/k1", "a.tar/k2") and m.labels == (3, -1) and m.classes == ("0", "1", "2", "3")
    assert Images(m.source()).read(m.ids, m.locations) == [jpg.getvalue(), png.getvalue()]  # jpg before png
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        _add(tar, "k.jpg", jpg.getvalue())
        _add(tar, "k.cls", b"cat")
    with pytest.raises(DatasetError, match=r"tar member '.*b\.tar: k\.cls': the label is not an integer \(b'cat'\)"):
        scan_source(tmp_path / "b.tar")
    pq.write_table(pa.table({"caption": ["a", "b"], "jpg": [png.getvalue(), None]}), tmp_path / "c.parquet")
    m = scan_source(tmp_path / "c.parquet")
    assert m.column == "jpg" and m.labels == (-1, -1) and m.classes == ()
    got = Images(m.source()).read(m.ids, m.locations)
    assert got[0] == png.getvalue() and str(got[1]) == "no image bytes (null)"


def test_a_member_twice_in_a_tar_is_refused_naming_tar_and_key(tmp_path):
    """`a.jpg` twice: the second replaced the first, 4 images became 3 samples without a word."""
    jpg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpg, "JPEG")
    for second in ("sub/a.jpg", "sub/a.JPG"):
        with tarfile.open(tmp_path / "dup.tar", "w") as tar:
            for name in ("sub/a.jpg", "b.jpg", second, "c.jpg"):
                _add(tar, name, jpg.getvalue())
        with pytest.raises(DatasetError) as e:
            scan_source(tmp_path / "dup.tar")
        assert str(e.value) == (f"tar file '{tmp_path / 'dup.tar'}': members 'sub/a.jpg' and '{second}' are both the "
                                "'jpg' of key 'sub/a'; a tar holds each member of a key once")


def _labelled_parquet(path: Path, labels, *, classes=None) -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    meta = {"huggingface": json.dumps({"info": {"features": {"label": {"names": classes}}}})} if classes else None
    table = pa.table({"image": [png.getvalue()] * len(labels), "label": labels})
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_parquet_labels_whole_floats_and_class_names(tmp_path):
    """Float labels were truncated (1.5 -> 1); string labels gave a traceback."""
    (tmp_path / "a").mkdir()
    _labelled_parquet(tmp_path / "a" / "floats.parquet", [0.0, 2.0, float("nan"), None])  # pandas' ints with NaN
    m = scan_source(tmp_path / "a" / "floats.parquet")
    assert m.labels == (0, 2, -1, -1) and m.classes == ("0", "1", "2")
    _labelled_parquet(tmp_path / "a" / "half.parquet", [0.0, 1.5])
    with pytest.raises(DatasetError, match=r"^parquet file '.*half\.parquet', row 1: label 1\.5 is not a whole number"):
        scan_source(tmp_path / "a" / "half.parquet")

    (tmp_path / "b").mkdir()  # class names over two files: sorted over both, as folder classes
    _labelled_parquet(tmp_path / "b" / "0.parquet", ["dog", None])
    _labelled_parquet(tmp_path / "b" / "1.parquet", ["cat", "emu"])
    m = scan_source(tmp_path / "b" / "*.parquet")
    assert m.labels == (1, -1, 0, 2) and m.classes == ("cat", "dog", "emu")
    _labelled_parquet(tmp_path / "b" / "2.parquet", [3, 1])
    with pytest.raises(DatasetError, match=r"'.*2\.parquet' has integers as labels, the files before it class names"):
        scan_source(tmp_path / "b" / "*.parquet")

    (tmp_path / "c").mkdir()
    _labelled_parquet(tmp_path / "c" / "numbers.parquet", ["2", "10"])  # all integers: as a list file's
    assert scan_source(tmp_path / "c" / "numbers.parquet").labels == (2, 10)
    _labelled_parquet(tmp_path / "c" / "named.parquet", ["emu", "cat"], classes=["emu", "cat"])  # the schema's order
    m = scan_source(tmp_path / "c" / "named.parquet")
    assert m.labels == (0, 1) and m.classes == ("emu", "cat")
    _labelled_parquet(tmp_path / "c" / "unnamed.parquet", ["emu", "dog"], classes=["emu", "cat"])
    with pytest.raises(DatasetError, match=r"unnamed\.parquet', row 1: label 'dog' is not among the classes its "
                                           r"schema names \(emu, cat\)$"):
        scan_source(tmp_path / "c" / "unnamed.parquet")


def test_a_tar_member_name_that_is_not_utf8_is_refused_at_scan(tmp_path):
    jpg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpg, "JPEG")
    with tarfile.open(tmp_path / "a.tar", "w", encoding="utf-8", errors="surrogateescape") as tar:
        _add(tar, "good.jpg", jpg.getvalue())
        _add(tar, os.fsdecode(b"bad\xe9.jpg"), jpg.getvalue())  # a Latin-1 name
    with pytest.raises(DatasetError, match=r"the name b'.*/a\.tar/bad\\xe9' is not UTF-8"):
        scan_source(tmp_path / "a.tar")


def test_a_tar_class_number_too_large_to_be_a_class_is_refused(tmp_path):
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        for key, label in (("a", b"1"), ("b", b"3000000")):
            _add(tar, f"{key}.jpg", b"not decoded at scan")
            _add(tar, f"{key}.cls", label)
    with pytest.raises(DatasetError, match="label 3000000 would make 3000001 classes; class numbers run 0, 1"):
        scan_source(tmp_path / "000000.tar")
