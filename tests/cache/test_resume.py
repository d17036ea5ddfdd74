"""A rerun reads the images where it is told they are now, and retries the samples whose files were missing."""

import shutil

import numpy as np
import pytest
import torch
import zarr

from radio_distill.store import codecs
from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache
from radio_distill.cache.worker import retryable
from radio_distill.cache.config import load_cache_config
from radio_distill.store.dataset import load_rgb
from radio_distill.store.inspect import verify_store
from radio_distill.store.views import crop_resize
from radio_distill.errors import CacheLayoutError

GONE = ("circle/00004.jpg", "star/00006.jpg")  # rows 1 (shard 0) and 5 (shard 2) of the list


def _list(folder, ids) -> None:
    (folder / "list.csv").write_text("path,label\n" + "".join(f"{i},{i.split('/')[0]}\n" for i in ids))


@pytest.mark.slow
def test_rerun_reads_the_dataset_where_it_is_now_and_retries_missing_files(
        ray_session, small_dataset, teachers, tmp_path, read_arrays, file_digests, shard_worker_processes):
    first = shutil.copytree(small_dataset, tmp_path / "first")
    ids = sorted(p.relative_to(first).as_posix() for p in first.glob("*/*.jpg"))
    _list(first, ids)
    kept = {name: (first / name).read_bytes() for name in GONE}
    for name in GONE:
        (first / name).unlink()
    out = tmp_path / "cache.zarr"
    config = dict(teachers="tiny", views=2, shard_size=2, workers=2)
    report = build_cache(load_cache_config(data=first / "list.csv", out=out, max_shards=2, **config), progress=False)
    assert report["ok"] == 3 and report["unreadable"] == {GONE[0]: "missing file"} and report["retryable"] == 1
    before = read_arrays(out)

    moved = first.rename(tmp_path / "moved")  # the dataset moves, and the missing files come back
    for name, data in kept.items():
        (moved / name).write_bytes(data)
    report = build_cache(load_cache_config(data=moved / "list.csv", out=out, **config), progress=False)

    assert report["complete"] and report["ok"] == 8 and report["unreadable"] == {} and report["failed"] == {}
    assert report["shards_run"] == 3  # shards 2 and 3, and shard 0 again for its missing sample
    root = zarr.open_group(out, mode="r")
    assert root.attrs["dataset"]["root"] == str(moved)
    verify_store(out)
    workers = {p.pid for p in shard_worker_processes()}
    again = build_cache(load_cache_config(data=moved / "list.csv", out=out, **config), progress=False)
    assert again["complete"] and again["shards_run"] == 0 and again["ok"] == 8
    assert {p.pid for p in shard_worker_processes()} <= workers  # a complete store loads no teacher
    after = read_arrays(out)
    for path, values in before.items():  # the samples that were ok keep their bytes
        if path.startswith(("teachers/", "samples/")) and values.shape[:1] == (8,):
            assert np.array_equal(after[path][[0, 2, 3]], values[[0, 2, 3]]), path
    # the retried sample holds the teacher's output for its image
    d = load_rgb(moved / GONE[0], min_side=112)
    teacher = teachers["clip"]
    x = torch.from_numpy(crop_resize(d.image, after[L.BOXES][1, 0], teacher.resolution, span=d.span))
    x = (x.permute(2, 0, 1)[None].float() / 255 - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(
        teacher.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        _, spatial = teacher(x)
    stored = codecs.decode(torch.from_numpy(after[L.target_array("clip", "spatial")][1, 0]),
                           torch.from_numpy(after[L.scale_array("clip", "spatial")][1, 0]))
    assert codecs.token_cosine(spatial[0], stored).min() > 0.999
    # its tokens were added to shard 0's statistics: 2 samples x 2 views x 8x8 tokens
    assert after[L.moment_array("clip", "spatial", "count")][0] == 2 * 2 * 64
    assert after[L.moment_array("clip", "spatial", "fidelity")][0, 1] == 2 * 2 * 64

    # other images at the same --out: refused before any work, the store untouched
    _list(moved, ids[:-1])
    digests, workers = file_digests(out), {p.pid for p in shard_worker_processes()}
    with pytest.raises(CacheLayoutError, match=r"was built with other dataset") as e:
        build_cache(load_cache_config(data=moved / "list.csv", out=out, **config), progress=False)
    assert "\n" not in str(e.value)
    assert file_digests(out) == digests and {p.pid for p in shard_worker_processes()} <= workers


@pytest.mark.parametrize("reason, again", [
    ("missing file", True), ("corrupt image: [Errno 5] Input/output error: '/data/a.jpg'", True),
    ("truncated image", False), ("empty file (0 bytes)", False), ("not an image (unidentified format)", False),
])
def test_which_unreadable_samples_a_rerun_retries(reason, again):
    assert retryable(reason) is again
