"""Tars planned from img2dataset's sidecars: the same samples as listing the tars' headers, found by key
when read, with no tar read while planning; a bad sidecar is named in one line before anything is created."""

import builtins
from dataclasses import replace
import io
import json
import math
import os
import pickle
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner
from webdataset import TarWriter

from radio_distill.cli import cache_app
from radio_distill.errors import DatasetError
from radio_distill.store import sources
from radio_distill.store.dataset import UnreadableImage
from radio_distill.store.sources import UNRESOLVED, Images, scan_source

SHARDS, PER_SHARD = 3, 10  # URLs per shard, as img2dataset's --number_sample_per_shard
BUFFER = 4  # sidecar rows per row group (img2dataset's BufferedParquetWriter: 100)
SCHEMA = pa.schema([("label", pa.int64()), ("caption", pa.string()), ("url", pa.string()), ("key", pa.string()),
                    ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                    ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
                    ("exif", pa.string())])  # img2dataset's: the saved input columns, then what it adds


def img2dataset_key(shard: int, index: int, per_shard: int = PER_SHARD, shard_digits: int = 5) -> str:
    """img2dataset's `compute_key`: shard and index in the shard, zero-padded."""
    digits = math.ceil(math.log10(per_shard))
    return f"{shard * 10 ** digits + index:0{digits + shard_digits}d}"


def write_img2dataset(out: Path, *, shards: int = SHARDS, per_shard: int = PER_SHARD) -> dict:
    """img2dataset's `--output_format webdataset` output: per shard `NNNNN.tar` (`webdataset.TarWriter`:
    `<key>.jpg`, `.txt`, `.json` per success), `NNNNN.parquet` (a row per URL) and `NNNNN_stats.json`.
    Every third URL failed to download; the rows follow download completion (shuffled), a success's row
    and its members written together, as img2dataset writes them.

    Returns:
        {key: (jpg bytes, label)} of the successes.
    """
    out.mkdir(parents=True)
    images = {}
    for shard in range(shards):
        order = list(range(per_shard))
        random.Random(shard).shuffle(order)
        rows, name = [], f"{shard:05d}"
        with open(out / f"{name}.tar", "wb") as f:
            tar = TarWriter(f)
            for i in order:
                key = img2dataset_key(shard, i, per_shard)
                ok = i % 3 != 1
                meta = {"label": (shard + i) % 4, "caption": f"photo {key}", "url": f"https://example.com/{key}.jpg",
                        "key": key, "status": "success" if ok else "failed_to_download",
                        "error_message": None if ok else "HTTP Error 404: Not Found", "width": 16 if ok else None,
                        "height": 12 if ok else None, "original_width": 32 if ok else None,
                        "original_height": 24 if ok else None, "exif": "{}" if ok else None}
                if ok:
                    data = io.BytesIO()
                    Image.new("RGB", (16, 12), (shard * 40, i * 20, 99)).save(data, "JPEG")
                    images[key] = data.getvalue(), meta["label"]
                    tar.write({"__key__": key, "jpg": data.getvalue(), "txt": meta["caption"],
                               "json": json.dumps(meta, indent=4)})
                rows.append(meta)
            tar.close()
        with pq.ParquetWriter(out / f"{name}.parquet", SCHEMA) as writer:  # its buffer: a row group per 100 rows
            for start in range(0, per_shard, BUFFER):
                writer.write_table(pa.Table.from_pylist(rows[start:start + BUFFER], SCHEMA))
        successes = sum(r["status"] == "success" for r in rows)
        (out / f"{name}_stats.json").write_text(json.dumps(
            {"count": per_shard, "successes": successes, "failed_to_download": per_shard - successes,
             "failed_to_resize": 0, "duration": 1.0, "start_time": 0.0, "end_time": 1.0,
             "status_dict": {"success": successes, "HTTP Error 404: Not Found": per_shard - successes}}, indent=4))
    return images


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """An img2dataset folder, and a copy of its tars alone (planned by their headers)."""
    root = tmp_path_factory.mktemp("img2dataset")
    images = write_img2dataset(root / "out")
    (root / "bare").mkdir()
    for tar in sorted((root / "out").glob("*.tar")):
        shutil.copy(tar, root / "bare" / tar.name)
    return {"root": root, "images": images, "pattern": str(root / "out" / "{00000..00002}.tar"),
            "bare": str(root / "bare" / "*.tar")}


@pytest.fixture
def opened(monkeypatch):
    """The paths opened through Python's `open`, `os.open`, `tarfile.open` and pyarrow's `ParquetFile`."""
    paths = []

    def tracking(fn):
        def wrapper(file, *args, **kwargs):
            paths.append(str(file))
            return fn(file, *args, **kwargs)
        return wrapper

    for owner, name in ((builtins, "open"), (io, "open"), (os, "open"), (tarfile, "open"), (pq, "ParquetFile")):
        monkeypatch.setattr(owner, name, tracking(getattr(owner, name)))
    return paths


def test_sidecars_plan_the_header_scans_samples_without_reading_a_tar(downloaded, opened):
    m = scan_source(downloaded["pattern"])
    assert opened and not [p for p in opened if p.endswith(".tar")], opened
    opened.clear()
    headers = scan_source(downloaded["bare"])
    assert {Path(p).name for p in opened if p.endswith(".tar")} == set(headers.files)  # the tracking sees tars
    assert m.ids == headers.ids and m.labels == headers.labels and m.classes == headers.classes
    assert m.files == headers.files == ("00000.tar", "00001.tar", "00002.tar") and not m.reasons
    keys = [i.split("/", 1)[1] for i in m.ids]
    assert sorted(keys) == sorted(downloaded["images"])  # the successes only: no failed URL's key
    assert [m.labels[k] for k in range(len(m))] == [downloaded["images"][key][1] for key in keys]
    assert m.ids[0].startswith("00000.tar/00000") and len(keys[0]) == 6  # img2dataset's keys: shard, index
    assert (m.locations[:, 1] == UNRESOLVED).all() and (m.locations[:, 2] == 0).all()
    assert (m.locations[:, 0] == headers.locations[:, 0]).all()
    resolved = Images(m.source()).resolve(m.ids, m.locations)
    assert np.array_equal(resolved, headers.locations) and (m.locations[:, 1] == UNRESOLVED).all()
    for tar in Path(downloaded["pattern"]).parent.glob("*.tar"):  # placeholders: the plan is the sidecars'
        shutil.copy(tar, tar.with_suffix(".keep"))
        tar.write_bytes(b"")
    try:
        assert scan_source(downloaded["pattern"]).fingerprint() == m.fingerprint() != headers.fingerprint()
    finally:
        for tar in Path(downloaded["pattern"]).parent.glob("*.keep"):
            tar.rename(tar.with_suffix(".tar"))


def test_unresolved_samples_read_the_bytes_their_resolved_locations_read(downloaded, monkeypatch):
    m = scan_source(downloaded["pattern"])
    listed, real = [], sources._tar_samples
    images = Images(m.source())
    monkeypatch.setattr(sources, "_tar_samples", lambda path, **kw: listed.append(path.name) or real(path, **kw))
    payloads = images.read(m.ids, m.locations)
    assert payloads == [downloaded["images"][i.split("/", 1)[1]][0] for i in m.ids]
    assert listed == ["00000.tar", "00001.tar", "00002.tar"]
    assert images.read(m.ids, images.resolve(m.ids, m.locations)) == payloads and len(listed) == SHARDS  # kept
    spawned = pickle.loads(pickle.dumps(images))  # a loader worker lists the tars again, in its own process
    assert spawned.read(m.ids[:2], m.locations[:2]) == payloads[:2] and listed[-1] == "00000.tar"


def test_a_sidecar_key_without_an_image_member_or_a_tar_reads_as_unreadable(downloaded, tmp_path, monkeypatch):
    m = scan_source(downloaded["pattern"])
    monkeypatch.setattr(sources, "TAR_LISTINGS", 1)
    out = tmp_path / "out"
    shutil.copytree(Path(downloaded["pattern"]).parent, out)
    images = Images(m.source(), out)
    with tarfile.open(out / "00001.tar", "a") as tar:  # a failed URL's key with a caption, no image
        info = tarfile.TarInfo("000011.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    ids = [m.ids[0], "00001.tar/000011", "00001.tar/000099", "00002.tar/000020"]
    locations = np.array([[0, UNRESOLVED, 0], [1, UNRESOLVED, 0], [1, UNRESOLVED, 0], [2, UNRESOLVED, 0]])
    (out / "00002.tar").unlink()
    assert images.missing(ids, locations) == str(out / "00002.tar")
    first, no_image, no_key, gone = images.read(ids, locations)
    assert first == downloaded["images"][m.ids[0].split("/")[1]][0]
    assert str(no_image) == "no image member in '00001.tar' (has: txt)" and isinstance(no_image, UnreadableImage)
    assert str(no_key) == "no image member in '00001.tar' (no member of key '000099')"
    assert str(gone) == "missing file"
    resolved = images.resolve(ids, locations)
    assert resolved[0, 1] > 0 and (resolved[1:, 1] == UNRESOLVED).all() and list(images._listings) == [1]
    shutil.copy(Path(downloaded["pattern"]).parent / "00002.tar", out / "00002.tar")
    end = int(resolved[0, 1] + resolved[0, 2])
    (out / "00000.tar").write_bytes((out / "00000.tar").read_bytes()[:end - 1])
    assert images.missing(ids, locations) is None  # unresolved: how far the members reach is not known
    assert images.missing(ids, resolved) == f"{out / '00000.tar'} (cut short: {end - 1} bytes, its members reach " \
                                            f"byte {end})"


def _with(out: Path, shard: str, **columns) -> None:
    """Rewrite a shard's sidecar with columns replaced (None: dropped)."""
    table = pq.read_table(out / f"{shard}.parquet")
    for name, values in columns.items():
        table = table.drop_columns([name])
        if values is not None:
            table = table.append_column(name, values if isinstance(values, pa.Array) else pa.array(values))
    pq.write_table(table, out / f"{shard}.parquet")


def test_bad_sidecars_are_named_in_one_line_before_anything_is_created(downloaded, tmp_path):
    source = Path(downloaded["pattern"]).parent
    rows = pq.read_table(source / "00001.parquet").to_pylist()
    keys = [r["key"] for r in rows]
    a, b = [k for k, r in enumerate(rows) if r["status"] == "success"][:2]
    cases = {
        "cut": (lambda o: (o / "00001.parquet").write_bytes((o / "00001.parquet").read_bytes()[:-20]),
                r"parquet sidecar '.*00001\.parquet' cannot be read .*truncated or not Parquet"),
        "no key": (lambda o: _with(o, "00001", key=None), r"sidecar '.*00001\.parquet' has no 'key' column \(its col"),
        "no status": (lambda o: _with(o, "00001", status=None), r"'.*00001\.parquet' has no 'status' column"),
        "key twice": (lambda o: _with(o, "00001", key=keys[:b] + [keys[a]] + keys[b + 1:]),
                      rf"sidecar '.*00001\.parquet' lists key '{keys[a]}' twice as a success"),
        "int keys": (lambda o: _with(o, "00001", key=[int(k) for k in keys]),
                     r"sidecar '.*00001\.parquet': its 'key' column is int64; img2dataset writes it as text"),
        "int status": (lambda o: _with(o, "00001", status=[len(r["status"]) for r in rows]),
                       r"sidecar '.*00001\.parquet': its 'status' column is int64"),
        "class names": (lambda o: _with(o, "00001", label=[str(k) for k in keys]),
                        r"sidecar '.*00001\.parquet': its 'label' column holds class names"),
        "no sidecar": (lambda o: (o / "00002.parquet").unlink(),
                       r"tar file '.*00002\.tar' has no sidecar '00002\.parquet' while 2 of the 3 tars have"),
        "other stats": (lambda o: (o / "00000_stats.json").write_text('{"count": 10, "successes": 9}'),
                        r"sidecar '.*00000\.parquet' lists 7 'success' rows, its stats '00000_stats\.json' count 9"),
        "bad stats": (lambda o: (o / "00000_stats.json").write_text('{"count": 10,'),
                      r"stats file '.*00000_stats\.json' cannot be read \("),
        "no count": (lambda o: (o / "00000_stats.json").write_text('{"count": 10}'),
                     r"stats file '.*00000_stats\.json' has no 'successes' count"),
    }
    for case, (spoil, message) in cases.items():
        out = tmp_path / case.replace(" ", "_")
        shutil.copytree(source, out)
        spoil(out)
        with pytest.raises(DatasetError, match=message) as e:
            scan_source(out / "*.tar")
        assert "\n" not in str(e.value), case
    (tmp_path / "no_stats").mkdir()  # other writers than img2dataset: no stats, checked no further
    for f in source.glob("0000[01].*"):
        shutil.copy(f, tmp_path / "no_stats" / f.name)
    _with(tmp_path / "no_stats", "00001", status=[None if k == a else r["status"] for k, r in enumerate(rows)])
    m = scan_source(tmp_path / "no_stats" / "*.tar")
    assert len(m) == 13 and f"00001.tar/{keys[a]}" not in m.ids  # a row without status is no success
    store = tmp_path / "x.zarr"
    result = CliRunner().invoke(cache_app, ["build", str(tmp_path / "no_sidecar" / "*.tar"), "--out", str(store),
                                            "--teachers", "tiny"])
    assert result.exit_code != 0 and "00002.tar" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not store.exists()


def test_a_build_from_sidecars_stores_the_locations_the_headers_give(ray_session, tiny_config, tmp_path):
    """The planner reads no tar; each build worker finds its shard's members by key, and the store keeps where they
    are, so that training reads each image at its offset like a header-scanned tar's."""
    from radio_distill.cache.build import build_cache
    from radio_distill.store import layout as L
    from radio_distill.store.group import open_array
    from radio_distill.store.reader import CacheReader

    write_img2dataset(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "*.tar")
    planned = scan_source(pattern)
    assert (planned.locations[:, 1] == UNRESOLVED).all()
    out = tmp_path / "cache.zarr"
    report = build_cache(replace(tiny_config(out), data=pattern, views=1), progress=False)
    assert report["complete"] and report["ok"] == len(planned)
    for sidecar in (tmp_path / "shards").glob("*.parquet"):  # the header scan of the same tars
        sidecar.unlink()
    np.testing.assert_array_equal(open_array(out, L.LOCATIONS).read().result(), scan_source(pattern).locations)
    reader = CacheReader(out)
    assert reader.dataset(resolution=16)[(int(reader.indices(holdout=0.0)[0]), 0)]["pixels"].shape == (3, 16, 16)
