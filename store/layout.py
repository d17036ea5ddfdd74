"""The store layout: the one contract between `radio-cache build` and `radio-train`.

Letters: N samples, V views per sample, R stored pixel side, S samples per shard, K statistics shards,
D summary channels, h, w teacher grid (after pooling), C spatial channels, M classes, k stored channels of a
calibrated codec, Q calibration samples.

```
<store>.zarr/                 attrs: FORMAT, LAYOUT_VERSION, settings (the build's identity), dataset, ...
  samples/ids        (N,)          str, path relative to the dataset root (tar: `<tar>/<key>`, Parquet: `<file>/<row>`)
  samples/labels     (N,)          int32, -1 when unlabelled
  samples/boxes      (N, V, 4)     float32, x0 y0 x1 y1 in source-image pixels
  samples/status     (N,)          uint8, PENDING / OK / UNREADABLE / MISSING (v5) / ABSENT; chunks of STATUS_CHUNK rows, written by the
                                   build's driver with the done state (layout v5 on)
  samples/stamps     (n_shards,)   int64, per shard the digest of its images' (size, mtime) when it was built
                                   (`provenance.py`), written by the driver with the done state (v5 on)
  samples/split      (N,)          uint16, `split_key` of each id: the hold-out split without reading ids (v5 on);
                                   of tars planned unlisted, written by the driver with the status
  samples/errors     (N,)          str, why a sample is unreadable ('' when ok)
  samples/sources    (N, 3)        int64, (size, mtime_ns, digest) of the image bytes each sample's targets were
                                   computed from (`provenance.py`); zeros where unreadable
  samples/shards     (n_shards, F, 2) int64, per shard the (size, digest) of its file of each of the F arrays its
                                   attrs `arrays` list, written before its done flags (`provenance.py`); chunks
                                   of RECORD_CHUNK shards (v5 on)
  samples/locations  (N, 3)        int64, where each image is in a tar or Parquet dataset (`sources.py`): tar
                                   (file, offset, size) of the image member's data, Parquet (file, row group,
                                   row in it); file indexes attrs dataset.files. Absent for folders and lists
  samples/pixels     (N, V, R, R, 3) uint8, each view at the student resolution R (`--pixels R`, optional)
  samples/calibration (Q,)         int64, rows whose view 0 calibrated the codecs (with `--fidelity` only)
  teachers/<t>/                    attrs: teacher info, storage (the codecs chosen), calibration, fidelity, norm;
                                   a tiled entry `<t>_xK` (spec `@RxK`) is a teacher of its own at the canvas
                                   side, its attrs `tiles` give K, the overlap and the tiles' boxes in the view
    summary          (N, V, D|k)   float16 or int8 (+ summary_scale (N, V))
    spatial          (N, V, h, w, C|k) float16 or int8 (+ spatial_scale (N, V, h, w))
    calib/*          (C,) (C, C) (C, k)  the calibration of a teacher with a fidelity budget, per target:
                                   float64 mean and cov, float32 PHI-S transform W (C, C) and, for a
                                   calibrated codec (`codecs.py`), its basis; decoded x = y @ basisᵀ + mean
    done             (n_shards,)   uint8, set only after the shard's data is written; chunks of DONE_CHUNK
                                   shards (v5 on)
    moments/*        (K, ...)      float64 per-shard sums for the normalisation statistics, and the
                                   codec's fidelity: [sum, count, min] of token cosines (K, 3)
    norm/*           (C,) (C, C)   float64 mean and covariance, written when the build completes
    text/embeddings  (M, D)        float32 unit-norm class embeddings of a CLIP teacher's text tower
                                   (`radio-cache text`); attrs: classes, templates, identity
    pattern/offset   (h, w, C)     float32 the teacher's fixed pattern: per grid position the mean of its decoded
                                   spatial targets minus their mean over all positions (`radio-cache pattern`)
    pattern/var      (h, w, C)     float32 per position the variance of those targets about their mean there;
                                   attrs: samples, maps (samples x views read), grid, resolution
  build.lock                       the one-writer lock a build holds (`lock.py`; local folders only)
  build.json                       the holder of that lock (host, pid, start, token), while a build runs;
                                   on S3 it is the lock itself, a lease its build renews
  .partial/                        a store being created, moved in with zarr.json last (`create_store`)
```
attrs `dataset`: root (where the images were at the last build), kind (folder | list | tar | parquet),
classes, fingerprint; for tar and parquet also files (relative to root) and column (Parquet's image column).
attrs `weight_files` (only when a teacher loads a local weight file): {teacher: absolute path} where the last
build found it; not part of the identity (which holds the file's name and sha256), a hint that `radio-eval`
and `radio-cache text` follow only while the file there still has that sha256.

Target arrays: chunk = one (sample, view), shard = S samples, written whole by one worker; shard k of
every target, scale and pixels array is one file, `c/k/0/...`, present once the shard is done.
Sample arrays: chunk = S samples, written by the worker that owns the shard. From layout v4 every chunk
has its file, fill values included, so an absent file is always a loss.
The done state (status, the integrity record, the done flags) is written by the build's driver alone,
in that order, from what each worker returns once its shard's files are written: a few objects however
many shards there are, so that opening a store or resuming a build reads few files (layout v5 on; before,
each worker wrote its shard's, a file per shard).

Layout v2 added the calibrated codecs (`calib/*`, `samples/calibration`); a v1 store has none of them
and reads as before, while an older version refuses a v2 store instead of misreading its codes.
Layout v3 added tar and Parquet datasets (`samples/locations`, dataset kind, files, column); a v1 or v2
store is a folder or list dataset.
Layout v4 added the integrity records (`samples/sources`, `samples/shards`, attrs `written` of arrays
written whole); a store of an older layout opens with the checks it allows (files present).
Layout v5 gathered the done state into few objects (driver-written, see above) and added `samples/split`;
an older store is read (its split computed from its ids) but not resumed.
"""

import zlib
from dataclasses import dataclass

import numpy as np

FORMAT = "radio-distill-cache"
LAYOUT_VERSION = 5
READS = (1, 2, 3, 4, 5)  # layout versions this version opens

IDS = "samples/ids"
LABELS = "samples/labels"
BOXES = "samples/boxes"
STATUS = "samples/status"
ERRORS = "samples/errors"
PIXELS = "samples/pixels"
CALIBRATION = "samples/calibration"
LOCATIONS = "samples/locations"
SOURCES = "samples/sources"
SHARDS = "samples/shards"
SPLIT = "samples/split"
STAMPS = "samples/stamps"

PENDING, OK, UNREADABLE, MISSING, ABSENT = 0, 1, 2, 3, 4  # MISSING: unreadable for now (the file absent, an I/O
# error): a rerun retries it (`worker.retryable`) without reading the errors; ABSENT: a row planned for a tar
# past its last sample (`sources.UNLISTED`), no sample at all
BAD = (UNREADABLE, MISSING)

LOCK_FILE = "build.lock"
HOLDER_FILE = "build.json"
STAGING = ".partial"
STATUS_CHUNK = 1 << 20  # rows of a status chunk (v5): 100M samples are 96 files
DONE_CHUNK = 1 << 16  # shards of a done-flags chunk (v5)
RECORD_CHUNK = 1024  # shards of an integrity-record chunk (v5): ~1 MB, rewritten at each commit
STORE_NAMES = ("zarr.json", "samples", "teachers")  # what a store holds at its top, beside the three above


def ours(name: str) -> bool:
    """Whether a name at the top of a store's folder is one a build writes (a lock record being replaced too)."""
    return name in (LOCK_FILE, HOLDER_FILE, STAGING, *STORE_NAMES) or name.startswith(f"{HOLDER_FILE}.")


TARGETS = ("summary", "spatial")
MOMENTS = ("count", "sum", "gram", "fidelity")  # per statistics shard (`moment_array`)
CODECS = ("fp16", "int8")  # the ones a user names; a fidelity budget also picks the calibrated ones
STAT_SHARDS = 16  # normalisation statistics come from K shards spread over the dataset: plenty of tokens, bounded cost
CALIBRATION_SAMPLES = 2048  # view 0 of this many samples, spread over the dataset, calibrate the codecs
CALIBRATION_HELD = 128  # of which at most this many are held back to measure the candidates (kept in memory)
CALIB = ("mean", "cov", "phis", "basis")
PATTERN = ("offset", "var")


@dataclass(frozen=True)
class TeacherInfo:
    """What a loaded teacher takes and produces; copied into its group's attrs."""

    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grid: tuple[int, int]
    summary_dim: int | None
    spatial_dim: int
    tiles: dict | None = None  # a tiled entry's {'tiles': K, 'overlap': px, 'boxes': [[x0, y0, x1, y1] per tile, as
    # fractions of the view]} (`teachers.TiledTeacher`); only tiled entries' attrs hold it



def teacher_group(teacher: str) -> str:
    return f"teachers/{teacher}"


def target_array(teacher: str, target: str) -> str:
    """Path of a target array, `target` in TARGETS."""
    return f"teachers/{teacher}/{target}"


def scale_array(teacher: str, target: str) -> str:
    """Path of the per-token fp16 scales of an int8 target."""
    return f"teachers/{teacher}/{target}_scale"


def target_arrays(teacher: str) -> list[str]:
    """Every target and scale array a teacher can have, in TARGETS order; a store holds those its codecs need."""
    return [p for t in TARGETS for p in (target_array(teacher, t), scale_array(teacher, t))]


def done_array(teacher: str) -> str:
    return f"teachers/{teacher}/done"


def moment_array(teacher: str, target: str, moment: str) -> str:
    """`moment` in ('count', 'sum', 'gram'): per statistics-shard sums of x and x xᵀ; 'fidelity':
    [sum, count, min] of the cosines of stored tokens to the teacher's output."""
    return f"teachers/{teacher}/moments/{target}_{moment}"


def norm_array(teacher: str, target: str, stat: str) -> str:
    """`stat` in ('mean', 'cov')."""
    return f"teachers/{teacher}/norm/{target}_{stat}"


def calib_array(teacher: str, target: str, name: str) -> str:
    """`name` in CALIB: a calibrated teacher's statistics and transforms of one target."""
    return f"teachers/{teacher}/calib/{target}_{name}"


def pattern_array(teacher: str, stat: str) -> str:
    """`stat` in PATTERN: a teacher's fixed-pattern estimate (`radio-cache pattern`)."""
    return f"teachers/{teacher}/pattern/{stat}"


def pattern_group(teacher: str) -> str:
    """Group of a teacher's pattern arrays; attrs: samples, maps, grid, resolution (one entry per resolution)."""
    return f"teachers/{teacher}/pattern"


def split_key(sample_id: str) -> int:
    """The 16 bits of an id that decide its split: the top half of its crc32, so a rebuild agrees."""
    return zlib.crc32(sample_id.encode()) >> 16


def held_out(keys: np.ndarray, fraction: float) -> np.ndarray:
    """(N,) bool of (N,) `split_key`s: held out when the key falls in the first `fraction` of its range."""
    return keys < round(fraction * 65536)


def calibration_rows(num_samples: int) -> np.ndarray:
    """(Q,) int64 rows spread evenly over the dataset (sorted by path: leading rows are few classes)."""
    return np.unique(np.linspace(0, num_samples - 1, min(num_samples, CALIBRATION_SAMPLES)).round().astype(np.int64))


def text_group(teacher: str) -> str:
    """Group of a CLIP teacher's class text embeddings (written by `radio-cache text`, read by `radio-eval`)."""
    return f"teachers/{teacher}/text"


def text_array(teacher: str) -> str:
    """(M, D) float32 unit-norm text embedding per class, in the store's label order."""
    return f"teachers/{teacher}/text/embeddings"


def stat_shards(n_shards: int) -> list[int]:
    """The K shards that feed the normalisation statistics, evenly spaced: samples are sorted by
    path, so leading shards would hold only the first few classes. Moment row k is shard [k]."""
    k = min(n_shards, STAT_SHARDS)
    return sorted({round(i * (n_shards - 1) / max(k - 1, 1)) for i in range(k)})


def shard_count(num_samples: int, shard_size: int) -> int:
    return -(-num_samples // shard_size)


def shard_rows(shard: int, shard_size: int, num_samples: int) -> slice:
    return slice(shard * shard_size, min(num_samples, (shard + 1) * shard_size))
