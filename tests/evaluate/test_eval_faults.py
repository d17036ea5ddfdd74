"""A corrupt chunk met by radio-eval's spawned loader worker: one line naming array and sample; a full disk
while writing the report: one line."""

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from radio_distill.store import layout as L
from radio_distill.errors import CacheIntegrityError, EvaluationError
from radio_distill.evaluate.features import collect
from radio_distill.student import load_student
from radio_distill.store.reader import CacheReader


@pytest.mark.slow
def test_corrupt_chunk_through_a_worker_is_one_line(eval_setup, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(eval_setup.store, store)
    array = L.target_array("clip", "spatial")
    shard_file = store / array / "c" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 32] = bytes(b ^ 0xFF for b in data[mid:mid + 32])
    shard_file.write_bytes(bytes(data))
    reader = CacheReader(store)
    rows = [i for i in reader.indices(holdout=0.0).tolist() if i < 8]
    with pytest.raises(CacheIntegrityError) as e:
        collect(reader, load_student(eval_setup.run), rows, resolution=32, device=torch.device("cpu"), batch_size=8,
                workers=1, progress=False)
    message = str(e.value)
    assert message.startswith(f"{array}: sample '") and "\n" not in message
    assert message.split("'")[1] in [reader.ids[i] for i in rows]


def test_a_full_disk_while_writing_the_report_is_one_line_and_leaves_no_half_report(eval_setup, tmp_path, monkeypatch):
    from radio_distill.evaluate import EvalConfig, evaluate

    from .conftest import FAST

    write = Path.write_text

    def full_disk(path, text, *args, **kwargs):
        if path.name.startswith("report.json"):  # report.json, or where it is written first
            write(path, text[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "eval"
    with pytest.raises(EvaluationError) as e:
        evaluate(EvalConfig(store=eval_setup.store, run=eval_setup.run, out=out, **{**FAST, "throughput": False,
                                                                                      "sam": False, "pictures": 1}),
                 progress=False)
    assert str(e.value) == (f"cannot write the report to '{out}': No space left on device; free space and run "
                            "`radio-eval` again (the metrics are not kept)")
    assert not list(out.glob("report.*"))
