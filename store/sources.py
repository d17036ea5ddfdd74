"""Packed datasets (WebDataset tar shards, Parquet files) as build input, and reading any dataset's images.

`scan_source` turns the build's data argument into a `Manifest`: a folder or a list file as
`dataset.scan_dataset` lists it, or tar / Parquet files named by a path, a glob (`shards/*.tar`) or
a brace pattern (`shards/{000000..000123}.tar`, as `webdataset` writes them). The root of packed
files is the deepest folder holding them all; their ids are relative to it, so a moved dataset is
given again at its new place, like a folder.

Tar shards (uncompressed, as `webdataset` writes them): members are grouped by key, the member name
up to the first dot of its base name (`a/b.seg.png`: key `a/b`, extension `seg.png`). The image is
the member with the first of TAR_IMAGES the key has (jpg before jpeg, png, webp); the label is the
`cls` member (an integer) or the `label` (else `cls`) key of the `json` member. A key with no image
member is a sample recorded unreadable, its reason naming the members it has; a key with two members
of one extension (`a.jpg` twice, or `a.jpg` and `a.JPG`) is refused, as is an image listed twice in a
list file. Id `<tar>/<key>`; samples in tar order, then member order, so a shard of consecutive
samples is one span of a tar. Listing reads every member header of every tar (512 bytes per member,
spread over the whole file): with a file system's readahead, about the whole dataset streamed before
the first teacher runs, hundreds of TB for DataComp-1B.

Tars with img2dataset's sidecars are planned from the sidecars alone: beside `00042.tar` its
`00042.parquet` (a row per URL of the shard: `key`, `status`, `url`, `caption`, ...) and
`00042_stats.json` (counts: `successes`, ...). The samples are the rows with status `success`, in
row order, which is the tar's member order (img2dataset writes a success's row and its tar members
in one call, so both follow download completion); labels from a `label` column (integers) if the
sidecar has one, else -1. No tar is read, only stat'ed: where each image is comes from the tar's
headers when a worker first reads it (`UNRESOLVED`, `Images.resolve`), so the fingerprint is a
function of the sidecars; a key without an image member in the tar then reads as unreadable, saying
so. Planning costs ~0.3-0.6 ms of CPU a sidecar and 0.5 us a sample (bench/plan.py: 100,000 tars
in 50-71 s on a loaded 2-core VM). Refused in one line: a sidecar that cannot be read, lacks `key` or
`status`, lists a key twice as a success, or counts other successes than its `_stats.json` (when
there is one); and a tar without its sidecar beside tars with one: img2dataset writes one per tar,
so a missing one is a failed shard or an incomplete copy, and listing that tar's headers instead
would read it whole where the user expects nothing read (copy the sidecar, or leave the tar out of
the pattern).

Tars without sidecars are listed by their headers in the driver, unless the build is given `--tar-samples R`
(`tar_samples`): then R rows are planned per tar without listing one (the driver reads each tar's first
header block only: a file that is no tar is refused before anything is created). Row i of a tar is its i-th
sample in member order, location (tar, UNLISTED, i); the build worker of a shard lists its tar
(`Images.unlisted`) and records the ids, labels, locations and reasons the header scan would give, and the
rows past the tar's last sample as ABSENT (no sample; training skips them like unreadable ones, `info` counts
them apart). The store's layout is a function of the tar names and R, so a killed build resumes to the same
store; a tar with more than R samples fails its shards, naming the R it needs. Classes grow to the largest
label the workers find (recorded by the driver with the done state).

Parquet (the Hugging Face `datasets` layout): the image column is a struct with `bytes` (and
`path`), or plain binary; labels come from the `label` column, class names from the schema's
`huggingface` metadata when it has them. Labels are integers (floats when whole: pandas writes
integers with NaN as floats) or class names (strings: indices into the schema's names, else as a
list file's, `dataset.text_labels`), so string labels from pandas or `Value("string")` train too.
Id `<file>/<row>`; a row without bytes reads the file its `path` names (absolute, or relative to
the Parquet file's folder), and one with neither is unreadable. That file must be inside the root:
a path outside it is refused at the scan, as a list file refuses one (`_check_paths`).

`locations` (N, 3) int64 say where each image is, so training reads one image without scanning a
file: tar (file, offset of the member's data, its size; offset NO_IMAGE: no image member, UNRESOLVED:
planned from a sidecar, found by key in the tar's headers when read; UNLISTED: (file, UNLISTED, i), the i-th
sample of the tar); Parquet (file, row group, row
in the group). `file` indexes `files`.
"""

import glob
import io
import json
import os
import posixpath
import stat
import tarfile
import threading
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import compress
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from ..errors import DatasetError
from .dataset import (SURROGATES, Generated, Manifest, UnreadableImage, check_names, list_id, numbered_classes,
                      scan_dataset, text_labels)

TAR_IMAGES = ("jpg", "jpeg", "png", "webp")  # a key's image: the first of these it has
PACKED = {".tar": "tar", ".parquet": "parquet"}
COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
IMAGE_COLUMNS = ("image", "img", "jpg", "png")  # preferred, in this order, when a Parquet file has several
NO_IMAGE = -1  # tar location offset of a key without an image member
UNRESOLVED = -2  # tar location offset of a sample planned from its sidecar: found in its tar's headers when read
UNLISTED = -3  # tar location offset of a row planned unlisted: (tar, UNLISTED, i) is the tar's i-th sample, if any
SIDECAR_THREADS = 4  # sidecars read at once: a network file system's latencies overlap (more contend for the GIL)
TAR_LISTINGS = 4  # tars whose member headers one `Images` keeps (a build shard spans one or two)
COALESCE = 1 << 20  # tar members closer than this are read in one read (a build shard: its whole span)


def scan_source(data: str | Path, *, tar_samples: int | None = None) -> Manifest:
    """List the samples of DATA: an image folder, a list file, or tar / Parquet files (a path or a pattern).

    Args:
        tar_samples: plan tars without sidecars unlisted, this many rows per tar (`_plan_unlisted`); None:
            list their member headers here.
    """
    text = str(data)
    path = Path(text).expanduser()
    pattern = any(c in text for c in "*?[{")
    if path.is_dir() or (path.suffix not in PACKED and not path.name.endswith(COMPRESSED_TARS)
                         and (path.is_file() or not pattern)):
        if tar_samples is not None:
            raise DatasetError(f"--tar-samples is for tar files; '{text}' is an image folder or a list file")
        return scan_dataset(path)
    files = _expand(text)  # paths as text: 100,000 tars are listed in a second
    compressed = [f for f in files if f.endswith(COMPRESSED_TARS)]
    if compressed:
        raise DatasetError(f"'{compressed[0]}' is a compressed tar: training reads members by their offsets, which "
                           "a compressed stream has not; decompress the shards first (e.g. gunzip, zstd -d)")
    kinds = {PACKED.get(os.path.splitext(f)[1]) for f in files}
    if kinds - set(PACKED.values()) or len(kinds) > 1:
        raise DatasetError(f"'{text}' matches {', '.join(sorted(os.path.basename(f) for f in files)[:3])}...; a "
                           "pattern names only .tar files or only .parquet files")
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    start = len(os.path.join(root, ""))
    names = tuple(f[start:] for f in files)
    kind = kinds.pop()
    if tar_samples is not None and kind != "tar":
        raise DatasetError(f"--tar-samples is for tar files; '{text}' names {kind} files")
    manifest = _scan_tars(Path(root), names, tar_samples) if kind == "tar" else _scan_parquet(Path(root), names)
    if not manifest.ids:
        raise DatasetError(f"'{text}' ({len(files)} {kind} files) holds no samples")
    if manifest.tar_samples is None:  # unlisted: the worker checks the names it lists
        check_names(manifest)
    return manifest


def _expand(pattern: str) -> list[str]:
    """The files a brace and glob pattern names, resolved (`os.path.realpath`), each once, in pattern order
    (globs sorted as paths, component by component)."""
    files = []
    for part in braceexpand(os.path.expanduser(pattern)):
        if any(c in part for c in "*?["):
            files += sorted((p for p in glob.glob(part, recursive=True) if os.path.isfile(p)),
                            key=lambda p: p.split(os.sep))
        elif os.path.isfile(part):
            files.append(part)
        else:
            raise DatasetError(f"'{part}'{f' (from {pattern!r})' if part != pattern else ''} does not exist")
    if not files:
        raise DatasetError(f"'{pattern}' matches no file")
    folders = {}
    return list(dict.fromkeys(_resolved(f, folders) for f in files))


def _resolved(path: str, folders: dict[str, str]) -> str:
    """`os.path.realpath` of a file, each folder's links resolved once (`folders`: resolved so far): a file
    that is no link is its resolved folder and its name."""
    path = os.path.abspath(path)
    if os.path.islink(path):
        return os.path.realpath(path)
    folder, name = os.path.split(path)
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    return os.path.join(folders[folder], name)


def _scan_tars(root: Path, names: tuple[str, ...], tar_samples: int | None) -> Manifest:
    """From the tars' img2dataset sidecars when they have them, else unlisted (`tar_samples` given), else from
    their member headers."""
    sidecars = [os.path.isfile(os.path.join(root, _sidecar(n))) for n in names]
    if any(sidecars):
        if not all(sidecars):
            lone = names[sidecars.index(False)]
            raise DatasetError(f"tar file '{root / lone}' has no sidecar '{_sidecar(lone)}' while {sum(sidecars)} of "
                               f"the {len(names)} tars have theirs; img2dataset writes one per tar: copy it, or leave "
                               "the tar out of the pattern")
        if tar_samples is not None:
            raise DatasetError(f"--tar-samples is for tars without img2dataset's sidecars; the tars under '{root}' "
                               "have theirs, which give each tar's samples: leave it out")
        return _scan_sidecars(root, names)
    if tar_samples is not None:
        return _plan_unlisted(root, names, tar_samples)
    ids, labels, locations, reasons = [], [], [], {}
    for f, name in enumerate(names):
        for key, members, label in _tar_samples(root / name):
            ext = next((e for e in TAR_IMAGES if e in members), None)
            if ext is None:
                reasons[len(ids)] = f"no image member (has: {', '.join(members)})"
            offset, size = members[ext] if ext else (NO_IMAGE, 0)
            ids.append(f"{name}/{key}")
            labels.append(label)
            locations.append((f, offset, size))
    return _manifest(root, ids, labels, None, kind="tar", files=names, locations=locations, reasons=reasons)


def _plan_unlisted(root: Path, names: tuple[str, ...], per_tar: int) -> Manifest:
    """`per_tar` rows for each tar, its members listed by the build worker of its shards: row i of a tar is its
    i-th sample, rows past its last are ABSENT (`Images.unlisted`). The layout is a function of the tar names
    and `per_tar` alone, so a killed build resumes to the same store. Only each tar's first header block is
    read here (a file that is not a tar is named before anything is created)."""
    if per_tar < 1:
        raise DatasetError(f"--tar-samples must be >= 1, got {per_tar}")
    for name in names:
        _check_first_block(root / name)
    n = len(names) * per_tar

    def locations(rows):
        return np.column_stack([rows // per_tar, np.full(len(rows), UNLISTED), rows % per_tar]).astype(np.int64)

    return Manifest(root, Generated(n, lambda rows: [""] * len(rows)),
                    Generated(n, lambda rows: np.full(len(rows), -1, np.int32)), (), kind="tar", files=names,
                    locations=Generated(n, locations), tar_samples=per_tar)


def _check_first_block(path: Path) -> None:
    """Refuse a file whose first 512 bytes are no tar header (an empty archive's zero block passes)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            block = os.pread(fd, tarfile.BLOCKSIZE, 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise DatasetError(f"tar file '{path}' cannot be read ({e})") from None
    if block == bytes(tarfile.BLOCKSIZE):
        return
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise DatasetError(f"tar file '{path}' is not an uncompressed tar: its first header block is invalid ({e})") \
            from None


def _sidecar(tar: str) -> str:
    """img2dataset's Parquet sidecar of a tar: `a/00042.tar` -> `a/00042.parquet`."""
    return tar[:-len(".tar")] + ".parquet"


def _scan_sidecars(root: Path, names: tuple[str, ...]) -> Manifest:
    """The tars' samples from their sidecars. On a warm page cache the reads are bound by the GIL (~0.3 ms
    a sidecar on 2 cores); the threads overlap a network file system's latency."""
    pool = ThreadPoolExecutor(SIDECAR_THREADS)
    try:  # the first bad sidecar in tar order is named; those not started yet are cancelled
        planned = list(pool.map(lambda name: _sidecar_samples(root, name), names))
    finally:
        pool.shutdown(cancel_futures=True)
    ids = [i for tar_ids, _ in planned for i in tar_ids]
    labels = [v for _, values in planned for v in values]
    locations = np.zeros((len(ids), 3), np.int64)
    locations[:, 0] = np.repeat(np.arange(len(names)), [len(i) for i, _ in planned])
    locations[:, 1] = UNRESOLVED
    return _manifest(root, ids, labels, None, kind="tar", files=names, locations=locations)


def _sidecar_samples(root: Path, name: str) -> tuple[list[str], list[int]]:
    """(ids, labels) of a tar's samples from its sidecars, in member order: the `success` rows of its
    Parquet sidecar (only its `key`, `status` and `label` columns are read), checked against the
    `successes` of its `_stats.json` when it has one.

    Raises:
        DatasetError: naming the sidecar: unreadable, without `key` or `status` (or not text), a key
            twice among its successes, a label that is no integer, successes other than its stats count.
    """
    import pyarrow as pa

    path = os.path.join(root, _sidecar(name))
    try:  # status as codes into its few values; pre-buffering off: 2 small reads cost less than its IO-thread hop
        pf = _open_parquet(path, "parquet sidecar", pre_buffer=False, read_dictionary=["status"])
    except KeyError:  # no status column
        pf = _open_parquet(path, "parquet sidecar")
    have = pf.schema_arrow.names
    lacking = [c for c in ("key", "status") if c not in have]
    if lacking:
        raise DatasetError(f"parquet sidecar '{path}' has no '{lacking[0]}' column (its columns: {', '.join(have)}); "
                           "img2dataset writes `key` and `status` for every URL of the tar")
    try:
        table = pf.read(columns=["key", "status"] + (["label"] if "label" in have else []), use_threads=False)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"parquet sidecar '{path}' cannot be read ({e}); it is truncated or not Parquet") from None
    for column in ("key", "status"):
        kind = table.schema.field(column).type
        values = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (pa.types.is_string(values) or pa.types.is_large_string(values)):
            raise DatasetError(f"parquet sidecar '{path}': its '{column}' column is {kind}; img2dataset writes it "
                               "as text")
    success = _success_rows(table.column("status"))
    keys = list(compress(table.column("key").to_pylist(), success.tolist()))
    if None in keys:
        raise DatasetError(f"parquet sidecar '{path}': a 'success' row has no key")
    ids = [f"{name}/{k}" for k in keys]
    if len(set(ids)) < len(ids):
        seen = set()
        twice = next(i for i in ids if i in seen or seen.add(i)).split("/")[-1]
        raise DatasetError(f"parquet sidecar '{path}' lists key '{twice}' twice as a success; a tar holds each key "
                           "once")
    _check_stats(os.path.join(root, f"{name[:-len('.tar')]}_stats.json"), path, len(ids))
    labels = [-1] * len(ids)
    if "label" in have:
        values, text = _label_values(table.column("label").filter(pa.array(success)), path)
        if text:
            raise DatasetError(f"parquet sidecar '{path}': its 'label' column holds class names; labels of tar "
                               "samples are class indices (0, 1, ...), as in their `cls` or `json` member")
        labels = [-1 if v is None else v for v in values]
    return ids, labels


def _success_rows(status) -> np.ndarray:
    """(rows,) bool: where a dictionary-encoded `status` column is 'success' (null: not)."""
    rows = [np.zeros(0, bool)]
    for chunk in status.chunks:  # a row group, with its own codes
        values = chunk.dictionary.to_pylist()
        code = values.index("success") if "success" in values else -1
        rows.append(chunk.indices.to_numpy(zero_copy_only=False) == code)  # a null is NaN: no code
    return np.concatenate(rows)


def _check_stats(path: str, sidecar: str, successes: int) -> None:
    """Refuse a Parquet sidecar whose `success` rows are not the `successes` its `_stats.json` counts (a
    sidecar of another download of the shard); a tar without stats (other writers than img2dataset) passes."""
    try:
        with open(path, "rb") as f:
            stats = json.loads(f.read())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise DatasetError(f"stats file '{path}' cannot be read ({e}); img2dataset writes a JSON object") from None
    counted = stats.get("successes") if isinstance(stats, dict) else None
    if not isinstance(counted, int) or isinstance(counted, bool):
        raise DatasetError(f"stats file '{path}' has no 'successes' count; img2dataset writes it for every tar")
    if counted != successes:
        raise DatasetError(f"parquet sidecar '{sidecar}' lists {successes} 'success' rows, its stats "
                           f"'{os.path.basename(path)}' count {counted} successes; they come from different downloads "
                           "of the shard: copy both again")


def _tar_samples(path: Path, *, labels: bool = True) -> list[tuple[str, dict, int]]:
    """(key, {extension: (data offset, size)}, label or -1) per key of a tar, in member order; labels
    False: the `cls` and `json` members are not read (every label -1).

    `tarfile` reads each header and seeks over the data. It ends quietly at a header it cannot read
    (a file cut mid-header or at a member boundary), so the end-of-archive blocks are checked too.

    Raises:
        DatasetError: the tar is truncated or not a tar, holds a member of a key twice, or a label is not an integer.
    """
    samples, names = {}, {}  # names: (key, extension) -> member name
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                key, _, ext = posixpath.basename(m.name).partition(".")
                if not m.isfile() or not key or not ext:  # not a sample's member, as `webdataset` reads tars
                    continue
                key = posixpath.join(posixpath.dirname(m.name), key)
                if (key, ext.lower()) in names:  # the second would replace the first: a sample lost without a word
                    raise DatasetError(f"tar file '{path}': members '{names[key, ext.lower()]}' and '{m.name}' are "
                                       f"both the '{ext.lower()}' of key '{key}'; a tar holds each member of a key "
                                       "once")
                names[key, ext.lower()] = m.name
                members, label = samples.setdefault(key, ({}, [-1]))
                members[ext.lower()] = (m.offset_data, m.size)
                if labels and ext.lower() in ("cls", "json"):
                    label[0] = _label(tar.extractfile(m).read(), ext.lower(), f"{path}: {m.name}")
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(2 * tarfile.BLOCKSIZE)
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"tar file '{path}' cannot be read ({e}); it is truncated or not an uncompressed tar") from None
    if len(marker) < 2 * tarfile.BLOCKSIZE or any(marker):
        raise DatasetError(f"tar file '{path}' is truncated: it ends at byte {end} without the end-of-archive "
                           "blocks; copy it again")
    return [(key, members, label[0]) for key, (members, label) in samples.items()]


def _label(data: bytes, ext: str, where: str) -> int:
    """The label of a `cls` (integer text) or `json` ('label' or 'cls' key) member; -1 for a json without one."""
    try:
        value = data.decode().strip() if ext == "cls" else json.loads(data)
        if ext == "json":
            value = value.get("label", value.get("cls", -1)) if isinstance(value, dict) else -1
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError
        return int(value)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise DatasetError(f"tar member '{where}': the label is not an integer ({data[:40]!r})") from None


def _scan_parquet(root: Path, names: tuple[str, ...]) -> Manifest:
    ids, labels, locations, column, classes, texts = [], [], [], None, None, None
    for f, name in enumerate(names):
        pf = _open_parquet(root / name)
        schema = pf.schema_arrow
        found = _image_column(schema, root / name)
        if column not in (None, found):
            raise DatasetError(f"parquet file '{root / name}' has its images in column '{found}', the files before "
                               f"it in '{column}'; give files of one dataset")
        column = found
        _check_paths(pf, root / name, root, column)
        names_here = _class_names(schema)
        if names_here is not None:
            if classes not in (None, names_here):
                raise DatasetError(f"parquet file '{root / name}' names other classes than the files before it")
            classes = names_here
        if "label" in schema.names:
            values, text = _label_values(pf.read(columns=["label"]).column("label"), root / name)
            if texts not in (None, text):
                kinds = ("class names", "integers") if text else ("integers", "class names")
                raise DatasetError(f"parquet file '{root / name}' has {kinds[0]} as labels, the files before it "
                                   f"{kinds[1]}; give files of one dataset")
            labels, texts = labels + values, text
        else:
            labels += [None] * pf.metadata.num_rows
        row = 0
        for g in range(pf.metadata.num_row_groups):
            for r in range(pf.metadata.row_group(g).num_rows):
                ids.append(f"{name}/{row}")
                locations.append((f, g, r))
                row += 1
    if texts:
        def where(k: int) -> str:  # of an id '<file>/<row>'
            return "parquet file '{}/{}', row {}".format(root, *ids[k].rsplit("/", 1))

        labels, classes = _named_labels(labels, classes, where)
    else:
        labels = [-1 if v is None else v for v in labels]
    return _manifest(root, ids, labels, classes, kind="parquet", files=names, locations=locations, column=column)


def _label_values(column, path: Path) -> tuple[list, bool]:
    """A Parquet file's `label` column: (values, whether they are class names): integers, or class names
    (strings); None where unlabelled (null, or a float NaN).

    Raises:
        DatasetError: a float label that is not a whole number (1.5 was read as 1), or a column of another type.
    """
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):  # as pandas writes categories
        column = column.cast(column.type.value_type)
    kind = column.type
    values = column.to_pylist()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return values, True
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        raise DatasetError(f"parquet file '{path}': its 'label' column is {kind}; labels are integers or class names")
    values = [None if v is None or v != v else v for v in values]
    bad = next((k for k, v in enumerate(values) if v is not None and not float(v).is_integer()), None)
    if bad is not None:
        raise DatasetError(f"parquet file '{path}', row {bad}: label {values[bad]} is not a whole number; labels are "
                           "class indices (0, 1, ...) or class names")
    return [v if v is None else int(v) for v in values], False


def _named_labels(names: list, classes: tuple[str, ...] | None, where) -> tuple[list[int], tuple[str, ...]]:
    """Labels of class-name labels (None: unlabelled): indices into the classes the schema names, when it names
    them, else as a list file's (`text_labels`: names sorted, or integers when all are)."""
    if classes is None:
        return text_labels([n or "" for n in names], where)
    index = {c: k for k, c in enumerate(classes)}
    unknown = next((k for k, n in enumerate(names) if n and n not in index), None)
    if unknown is not None:
        raise DatasetError(f"{where(unknown)}: label '{names[unknown]}' is not among the classes its schema names "
                           f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    return [index[n] if n else -1 for n in names], classes


def _open_parquet(path: Path, what: str = "parquet file", **options):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, **options)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{what} '{path}' cannot be read ({e}); it is truncated or not Parquet") from None


def _image_column(schema, path: Path) -> str:
    """The column holding image bytes: a struct with a binary `bytes` field, or binary."""
    import pyarrow as pa

    def is_image(t):
        if pa.types.is_struct(t):
            i = t.get_field_index("bytes")
            return i >= 0 and is_image(t.field(i).type)
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    found = [f.name for f in schema if is_image(f.type)]
    if not found:
        have = ", ".join(f"{f.name} ({f.type})" for f in schema)
        raise DatasetError(f"parquet file '{path}' has no image column (a struct with 'bytes', or binary); "
                           f"its columns: {have}")
    return next((c for c in IMAGE_COLUMNS if c in found), found[0])


def _check_paths(pf, path: Path, root: Path, column: str) -> None:
    """Refuse a row without bytes whose `path` is outside the dataset's folder, as a list file refuses such a
    path. Only row groups whose statistics count rows without bytes are read (a `datasets` file that embeds
    its images is not: its paths, where the images once were, are never read).

    Raises:
        DatasetError: naming the file, the row and the path.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = pf.schema_arrow.field(column).type
    if not pa.types.is_struct(kind) or kind.get_field_index("path") < 0:
        return
    start = 0
    for g in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(g)
        stats = next((group.column(c).statistics for c in range(group.num_columns)
                      if group.column(c).path_in_schema == f"{column}.bytes"), None)
        if stats is None or not stats.has_null_count or stats.null_count:
            cells = pf.read_row_group(g, columns=[f"{column}.bytes", f"{column}.path"]).column(0).combine_chunks()
            without = pc.and_(cells.is_valid(), cells.field("bytes").is_null()).to_numpy(zero_copy_only=False)
            for r in np.flatnonzero(without):
                written = cells.field("path")[int(r)].as_py()
                if written and list_id((path.parent / Path(written).expanduser()).as_posix(), root.as_posix()) is None:
                    raise DatasetError(f"parquet file '{path}', row {start + int(r)}: image path '{written}' is "
                                       f"outside the dataset's folder '{root}'; a row without bytes names a file "
                                       "under it")
        start += group.num_rows


def _class_names(schema) -> tuple[str, ...] | None:
    """The label names of a Hugging Face `ClassLabel` in the schema metadata, or None."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        meta = json.loads(raw)
        names = meta.get("info", meta)["features"]["label"]["names"]
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return tuple(str(n) for n in names) if isinstance(names, list) else None


def _image_file(parquet: Path, path: str | None) -> Path | UnreadableImage:
    """A row without bytes whose `path` names its image, as `datasets`' `to_parquet` writes local images:
    the file, absolute or relative to the Parquet file's folder."""
    if not path:
        return UnreadableImage("no image bytes (null)")
    return parquet.parent / Path(path).expanduser()


def _manifest(root, ids, labels, classes, *, kind, files, locations, column=None, reasons=None) -> Manifest:
    """Classes default to the label integers as names (0 .. max label)."""
    if classes is None:
        classes = numbered_classes(max(labels, default=-1), f"dataset '{root}'")
    bad = [v for v in labels if v >= len(classes) or v < -1]
    if bad:
        raise DatasetError(f"dataset '{root}': label {bad[0]} is outside its {len(classes)} classes")
    return Manifest(root, tuple(ids), tuple(labels), tuple(classes), kind=kind, files=files, column=column,
                    locations=np.asarray(locations, dtype=np.int64).reshape(-1, 3), reasons=reasons or {})


class Images:
    """Reads a dataset's images as `load_rgb` takes them: a file per sample (folder, list), a tar member's
    bytes, a Parquet cell's bytes.

    Args:
        source: what the store records (`Manifest.source`): root, kind, and for packed kinds files and column.
        root: where the dataset is now, when it moved (default: the recorded root).
    """

    def __init__(self, source: dict, root: str | Path | None = None):
        self.root = Path(root).expanduser().resolve() if root else Path(source["root"])
        self.kind = source.get("kind", "folder")  # stores before layout v3 are folders or lists: read alike
        self.files, self.column = tuple(source.get("files", ())), source.get("column")
        self.tar_samples = source.get("tar_samples")  # planned unlisted: rows per tar, labels read from its members
        self._parquet, self._lock = {}, threading.Lock()  # open Parquet files (footers parsed once)
        self._listings = OrderedDict()  # file index -> a tar's keys listed from its headers, the last TAR_LISTINGS

    def __getstate__(self) -> dict:  # a spawned loader worker opens its own Parquet files, lists its own tars
        return {**self.__dict__, "_parquet": {}, "_lock": None, "_listings": OrderedDict()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def packed(self) -> bool:
        return self.kind in ("tar", "parquet")

    def read(self, ids, locations: np.ndarray | None) -> list:
        """Per sample: its file's path (folder, list), its image bytes, an `UnreadableImage`, or None for a
        tar key without an image (its reason is the scan's, stored in the store). An UNRESOLVED tar sample
        is found by key in its tar's headers (`resolve`); its key without an image member reads as an
        `UnreadableImage` saying so.

        Args:
            ids: (B,) sample ids.
            locations: (B, 3) their locations (packed kinds).
        """
        if not self.packed:
            return [self.root / i for i in ids]
        out = [None] * len(ids)
        if self.kind == "tar":
            locations, reasons = self._resolve(ids, locations)
            for k, reason in reasons.items():
                out[k] = UnreadableImage(reason)
        by_file = defaultdict(list)
        for k, (f, a, b) in enumerate(np.asarray(locations).tolist()):
            if self.kind == "parquet" or a >= 0:
                by_file[f].append((k, a, b))
        read = self._tar if self.kind == "tar" else self._rows
        for f, wanted in by_file.items():
            for k, value in read(self.root / self.files[f], wanted):
                out[k] = value
        return out

    def resolve(self, ids, locations: np.ndarray) -> np.ndarray:
        """(B, 3) `locations` of tar samples with their UNRESOLVED rows found by key in their tars' member
        headers (each tar listed once per process, the last TAR_LISTINGS kept). A row stays UNRESOLVED
        where the key has no image member or the tar cannot be listed: `read` gives the reason.

        The build worker calls it on its shard before reading (a listing per tar of the shard, then its
        images read as spans) and records what it returns in the store's locations, so training's random
        reads find each image without listing a tar.

        Args:
            ids: (B,) sample ids.
            locations: (B, 3) their locations.
        """
        return self._resolve(ids, locations)[0]

    def unlisted(self, locations: np.ndarray) -> tuple[list[str], list[int], np.ndarray, list[str], np.ndarray]:
        """What the header scan gives of rows planned unlisted, (f, UNLISTED, i): the i-th sample of tar f.

        Returns:
            (B,) ids ('' where absent), (B,) labels, (B, 3) locations (as the header scan's: NO_IMAGE for a key
            without an image; absent rows keep theirs), (B,) the scan's reasons ('' but for a key without an
            image), (B,) bool absent: i is past the tar's samples.

        Raises:
            DatasetError: naming the tar: it cannot be listed, holds more samples than the rows planned for
                it (`tar_samples`), a name that is not UTF-8, or a label that is no class number.
        """
        locations = np.array(locations, dtype=np.int64)
        ids, labels, reasons = [""] * len(locations), [-1] * len(locations), [""] * len(locations)
        absent = np.zeros(len(locations), bool)
        for k, (f, _, i) in enumerate(locations.tolist()):
            name, samples = self.files[f], self._listing(f)[0]
            if len(samples) > self.tar_samples:
                raise DatasetError(f"tar file '{self.root / name}' holds {len(samples)} samples, more than the "
                                   f"{self.tar_samples} rows planned for each tar (--tar-samples); build again with "
                                   f"--tar-samples {len(samples)} or more")
            if i >= len(samples):
                absent[k] = True
                continue
            key, members, label = samples[i]
            if SURROGATES.search(key) or not -1 <= label:
                raise DatasetError(f"tar file '{self.root / name}': key {key!r} " + (
                    "is not UTF-8; rename the member" if SURROGATES.search(key) else f"has label {label}; class "
                    "numbers are 0, 1, ... (-1: none)"))
            numbered_classes(label, f"tar file '{self.root / name}': key '{key}'")
            ext = next((e for e in TAR_IMAGES if e in members), None)
            ids[k], labels[k] = f"{name}/{key}", label
            locations[k, 1:] = members[ext] if ext else (NO_IMAGE, 0)
            if ext is None:
                reasons[k] = f"no image member (has: {', '.join(members)})"
        return ids, labels, locations, reasons, absent

    def _resolve(self, ids, locations: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """(`resolve`'s locations, {row: why it stays UNRESOLVED}); an UNLISTED row is found by its place in the
        tar (read for calibration)."""
        locations = np.array(locations, dtype=np.int64)
        rows = np.flatnonzero(np.isin(locations[:, 1], (UNRESOLVED, UNLISTED)))
        reasons = {}
        for f in np.unique(locations[rows, 0]).tolist():
            name = self.files[f]
            samples, listing = self._listing(f)
            for k in rows[locations[rows, 0] == f].tolist():
                if locations[k, 1] == UNLISTED:
                    i = int(locations[k, 2])
                    key = samples[i][0] if not isinstance(listing, str) and i < len(samples) else None
                    found = listing if isinstance(listing, str) else listing[key] if key else f"absent: tar '{name}' " \
                        f"holds {len(samples)} samples"
                else:
                    key = ids[k][len(name) + 1:]
                    found = listing if isinstance(listing, str) else listing.get(key, "")
                if isinstance(found, str):
                    reasons[k] = found or f"no image member in '{name}' (no member of key '{key}')"
                else:
                    locations[k, 1:] = found
        return locations, reasons

    def _listing(self, f: int) -> tuple[list, dict | str]:
        """Of tar `f` from its member headers: its samples as `_tar_samples` gives them (labels read when planned
        unlisted), and {key: (offset, size) of its image member, or why it has none}, or why it cannot be listed
        (not kept: a later read tries again).

        Raises:
            DatasetError: the tar cannot be listed, where it was planned unlisted (its rows are not known)."""
        with self._lock:
            if f in self._listings:
                self._listings.move_to_end(f)
                return self._listings[f]
        path = self.root / self.files[f]
        try:
            samples = _tar_samples(path, labels=self.tar_samples is not None)
        except DatasetError as e:
            if self.tar_samples is not None:
                raise
            return [], "missing file" if not path.exists() else str(e)
        listing = {}
        for key, members, _ in samples:
            ext = next((e for e in TAR_IMAGES if e in members), None)
            listing[key] = members[ext] if ext else f"no image member in '{self.files[f]}' (has: {', '.join(members)})"
        listing = samples, listing
        with self._lock:
            self._listings[f] = listing
            while len(self._listings) > TAR_LISTINGS:
                self._listings.popitem(last=False)
        return listing

    def _tar(self, path: Path, wanted: list) -> list:
        """(k, bytes or UnreadableImage) of members (k, offset, size): members within COALESCE of each other
        are one read, so a build shard reads its span of the tar once, sequentially."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return [(k, UnreadableImage("missing file")) for k, _, _ in wanted]
        except OSError as e:
            return [(k, UnreadableImage(str(e))) for k, _, _ in wanted]
        out = []
        try:
            wanted = sorted(wanted, key=lambda w: w[1])
            start = 0
            while start < len(wanted):
                stop, end = start + 1, wanted[start][1] + wanted[start][2]
                while stop < len(wanted) and wanted[stop][1] - end <= COALESCE:
                    end = max(end, wanted[stop][1] + wanted[stop][2])
                    stop += 1
                first = wanted[start][1]
                try:
                    span = os.pread(fd, end - first, first)
                except OSError as e:
                    span, error = b"", str(e)
                else:
                    error = "truncated file: the tar ends inside this member (it changed since the store was built)"
                for k, offset, size in wanted[start:stop]:
                    data = span[offset - first:offset - first + size]
                    out.append((k, data if len(data) == size else UnreadableImage(error)))
                start = stop
        finally:
            os.close(fd)
        return out

    def _rows(self, path: Path, wanted: list) -> list:
        """(k, bytes or UnreadableImage) of Parquet rows (k, row group, row): each row group read once."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        groups = defaultdict(list)
        for k, g, r in wanted:
            groups[g].append((k, r))
        out = []
        for g, rows in groups.items():
            try:
                with self._lock:
                    if path not in self._parquet:
                        self._parquet[path] = pq.ParquetFile(path)
                    column = self._parquet[path].read_row_group(g, columns=[self.column]).column(0).combine_chunks()
            except FileNotFoundError:
                out += [(k, UnreadableImage("missing file")) for k, _ in rows]
                continue
            except (pa.ArrowException, OSError) as e:
                out += [(k, UnreadableImage(f"corrupt row group {g}: {e}")) for k, _ in rows]
                continue
            take = [r for _, r in rows]
            paths = [None] * len(rows)
            if pa.types.is_struct(column.type):
                if column.type.get_field_index("path") >= 0:
                    paths = column.field("path").take(take).to_pylist()
                column = column.field("bytes")
            cells = column.take(take).to_pylist()
            out += [(k, c if c is not None else _image_file(path, p)) for (k, _), c, p in zip(rows, cells, paths)]
        return out

    def missing(self, ids, locations: np.ndarray | None) -> str | None:
        """The first image file (folder, list) or packed file that is absent, or a tar shorter than its
        members reach (UNRESOLVED samples: not known without listing the tar; its presence is checked);
        None when all are there."""
        if not self.packed:
            return next((str(self.root / i) for i in ids if not (self.root / i).is_file()), None)
        ends = np.zeros(len(self.files), np.int64)
        if self.kind == "tar":
            known = locations[locations[:, 1] >= 0]
            np.maximum.at(ends, known[:, 0], known[:, 1] + known[:, 2])
        # one stat a file, relative to the root's descriptor: 10,000 tars in ~20 ms here (two or four threads took
        # as long: the loop is Python under the GIL)
        try:
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # the root is gone: so is its first file
            return str(self.root / self.files[0]) if self.files else None
        try:
            for name, end in zip(self.files, ends.tolist()):
                try:
                    found = os.stat(name, dir_fd=root)
                except OSError:
                    found = None
                if found is None or not stat.S_ISREG(found.st_mode):
                    return str(self.root / name)
                if found.st_size < end:
                    return f"{self.root / name} (cut short: {found.st_size} bytes, its members reach byte {end})"
        finally:
            os.close(root)
        return None


def oriented_size(source: Path | bytes) -> tuple[int, int]:
    """(W, H) of an image after the EXIF rotation `load_rgb` applies (from its header): boxes are in those."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        w, h = image.size
        return (h, w) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
