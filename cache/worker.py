"""The build's Ray actor: holds every teacher on one device, computes and writes one shard at a time.

A shard's images are read once (their bytes recorded, `provenance.py`), decoded once for every
teacher, cropped to each view; each teacher's targets are encoded and written whole, then the sample
arrays and the statistics rows. Its status and integrity record go back to the driver, which records
them and then its done flags (`group.commit_shards`): the done state is the driver's alone.

Letters: S samples per shard, V views, R teacher resolution, h, w grid, C channels, D summary dims.
"""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import CacheIntegrityError, RadioDistillError
from ..ops import autocast, autocast_dtype, normalise
from ..store import codecs
from ..store import layout as L
from ..store import provenance
from ..store.dataset import UnreadableImage, load_rgb
from ..store.group import open_array, open_store, shard_key
from ..store.location import location
from ..store.lock import check_token
from ..store.sources import Images
from ..store.views import crop_resize, view_boxes
from . import calibrate
from .teachers import TeacherSpec, build_teachers


def gpu_index(gpu_ids: list, visible: str | None) -> int:
    """The CUDA index, inside an actor, of the first GPU Ray gave it (`ray.get_gpu_ids()`): its place in
    CUDA_VISIBLE_DEVICES (which Ray sets to the actor's GPUs: index 0), or the id itself where that is
    unset (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1: every GPU visible, each actor must pick its own)."""
    if not gpu_ids:
        return 0
    first = str(gpu_ids[0])
    if visible is None:
        return int(first)
    listed = [d.strip() for d in visible.split(",")]
    return listed.index(first) if first in listed else 0


def retryable(reason: str) -> bool:
    """Whether an unreadable sample may read on a rerun: its file was missing (not there yet, or looked
    for at the dataset's old place), or the OS failed to read it (an `[Errno N]` I/O error, not the image)."""
    return reason == "missing file" or "[Errno " in reason


class ShardWorker:
    """A Ray actor holding every teacher on one device; `run(shard, ...)` computes and writes one shard."""

    def __init__(self, specs: tuple[TeacherSpec, ...], store: str, *, batch_size: int, threads: int):
        import ray

        torch.set_num_threads(threads)
        self.gpu_ids = [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else []  # [] outside Ray
        self.device = torch.device("cpu")
        if torch.cuda.is_available():  # the GPU Ray placed this actor on, not every actor's cuda:0
            self.device = torch.device("cuda", gpu_index(self.gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES")))
        self.teachers = build_teachers(specs, device=self.device)
        self.store, self.batch_size = location(store), batch_size
        self.pool = ThreadPoolExecutor(max(4, threads * 2))  # PIL decode/resize release the GIL
        self.device_lock = threading.Lock()  # two shards in flight share the device: decode/write overlap, compute does not
        self._arrays, self._zarrs, self._transforms, self._root = {}, {}, {}, None

    def describe(self) -> dict:
        return {name: t.info() for name, t in self.teachers.items()}

    def placement(self) -> dict:
        """Where this actor runs: its node, the GPUs Ray gave it, CUDA_VISIBLE_DEVICES as Ray set it, the device
        its teachers run on, its threads, and the autocast they run under ('bfloat16', or None: fp32)."""
        import ray

        dtype = autocast_dtype(self.device)
        return {"node": ray.util.get_node_ip_address(), "gpu_ids": self.gpu_ids,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": str(self.device),
                "threads": torch.get_num_threads(), "autocast": dtype and str(dtype).removeprefix("torch.")}

    def _forward(self, teacher, pixels: np.ndarray) -> dict:
        """(B, R, R, 3) uint8 -> {'summary': (B, D) | None, 'spatial': (B, h, w, C)} on the device."""
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        x = normalise(x.permute(0, 3, 1, 2), teacher.mean, teacher.std)
        with torch.inference_mode(), autocast(self.device):
            summary, spatial = teacher(x)
        return {"summary": summary, "spatial": spatial}

    def calibrate(self, rows: np.ndarray, ids: list[str], locations: np.ndarray | None, source: dict, budgets: dict,
                  seed: int) -> dict:
        """Calibrate the codecs of the teachers in `budgets` ({name: storage settings with a fidelity}) on
        view 0 of the samples `rows` (`ids`, `locations` theirs; `source`: `Manifest.source`): per target,
        moments of the fit samples, a codec chosen on the held-back ones (`calibrate.choose`), then
        statistics and transforms of all of them.

        Returns:
            {'rows': (Q,) rows read, 'seconds', 'held', 'teachers': {name: {target: {'codec', 'budget',
            'cos_mean', 'cos_min', 'met', 'tried', 'arrays': {'mean': (C,), 'cov': (C, C), 'phis': (C, C),
            'basis': (C, k) or absent}}}}}
        """
        started = time.perf_counter()
        teachers = {name: self.teachers[name] for name in budgets}
        min_side = max(t.resolution for t in teachers.values())
        payloads = Images(source).read(ids, locations)
        decoded = [(r, d) for r, d in zip(rows, self.pool.map(lambda p: _decode(p, min_side), payloads))
                   if not isinstance(d, str)]  # an unreadable calibration sample is left out
        if len(decoded) < 2:
            raise RadioDistillError(f"calibration needs at least 2 readable images, {len(decoded)} of the "
                                    f"{len(rows)} calibration samples read")
        stride = max(2, -(-len(decoded) // L.CALIBRATION_HELD))
        held_back = np.arange(len(decoded)) % stride == 1
        boxes = [view_boxes(d[2], d[3], views=1, seed=seed, sample_id=str(r))[0] for r, d in decoded]  # view 0
        out = {}
        for name, teacher in teachers.items():
            pool = budgets[name]["pool"]
            fit, held = {}, {}
            for b in range(0, len(decoded), self.batch_size):
                batch = range(b, min(b + self.batch_size, len(decoded)))
                pixels = np.stack(list(self.pool.map(lambda i: crop_resize(decoded[i][1][0], boxes[i], teacher.resolution,
                                                                           span=decoded[i][1][1]), batch)))
                for target, value in self._forward(teacher, pixels).items():
                    if value is None:
                        continue
                    value = value.float()
                    stored = codecs.pool(value, pool) if target == "spatial" else value
                    mask = torch.from_numpy(held_back[batch.start:batch.stop]).to(value.device)
                    fit.setdefault(target, calibrate.Moments(value.shape[-1], value.device)).add(stored[~mask])
                    held.setdefault(target, []).append(value[mask])  # on the device: the candidates are measured there
            out[name] = {}
            for target, moments in fit.items():
                x = torch.cat(held[target])
                choice = calibrate.choose(moments.statistics(), x, budgets[name]["fidelity"], pool=pool)
                pooled = codecs.pool(x, pool) if x.dim() == 4 else x
                stats = moments.merged(calibrate.Moments(x.shape[-1], x.device).add(pooled)).statistics()
                arrays = {"mean": stats.mean.numpy(), "cov": stats.cov.numpy(),
                          "phis": calibrate.phis(stats).float().numpy()}
                basis = calibrate.basis(choice.codec, stats)
                if basis is not None:
                    arrays["basis"] = basis.numpy()
                out[name][target] = {"codec": choice.codec, "budget": budgets[name]["fidelity"], "met": choice.met,
                                     "cos_mean": choice.cos_mean, "cos_min": choice.cos_min, "tried": choice.tried,
                                     "arrays": arrays}
        return {"rows": np.array([r for r, _ in decoded], dtype=np.int64), "held": int(held_back.sum()),
                "seconds": time.perf_counter() - started, "teachers": out}

    def _transform(self, name: str, target: str, codec: str):
        """(mean (C,), basis (C, k)) float32 on the device of a calibrated codec, read from the store once; or None."""
        if codec in codecs.PLAIN:
            return None
        key = (name, target)
        if key not in self._transforms:
            read = [open_array(self.store, L.calib_array(name, target, a)).read() for a in ("mean", "basis")]
            mean, basis = (torch.from_numpy(np.asarray(r.result())).float().to(self.device) for r in read)
            self._transforms[key] = (mean, basis)
        return self._transforms[key]

    def _store(self):
        """The store, opened and checked once per actor (on S3 an open is some 45 requests); its arrays do not
        change while the build runs."""
        if self._root is None:
            self._root = open_store(self.store, mode="r+")
        return self._root

    def _zarr(self, name: str):
        """The store's array or group `name` through zarr, or None where the store has none: looked up once
        per actor, like the store (each lookup is a few requests on S3)."""
        if name not in self._zarrs:
            try:
                self._zarrs[name] = self._store()[name]
            except KeyError:
                self._zarrs[name] = None
        return self._zarrs[name]

    def _array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = open_array(self.store, name)
        return self._arrays[name]

    def _base(self, path: str, rows: slice, retry: bool) -> np.ndarray:
        """The values a shard's rows of an array start from: what is stored (a retry changes only
        some samples, so the others keep their bytes), or zeros."""
        arr = self._array(path)
        if retry:
            return arr[rows].read().result()
        return np.zeros((rows.stop - rows.start, *arr.shape[1:]), arr.dtype.numpy_dtype)

    def run(self, shard: int, data_root: str, token: str, samples: dict, *, retry: bool = False) -> dict:
        """Compute and write one shard, reading images under `data_root`; return its status and integrity
        record for the driver to commit. `retry`: the shard is done (the driver cleared its flags) and only
        its samples a rerun may now read (`retryable`) are redone, the others keep their bytes. `samples`: the
        shard's ids, labels and locations from the scan, written again with its files (a lost chunk of them
        is rewritten by the redo). `token` is the build's lock token: a build that no longer holds the store
        writes nothing."""
        check_token(self.store, token)
        root = self._store()
        n, views, seed, size = (root.attrs[k] for k in ("num_samples", "views", "seed", "shard_size"))
        rows = L.shard_rows(shard, size, n)
        count = rows.stop - rows.start
        ids, labels, locations = [str(i) for i in samples["ids"]], samples["labels"], samples["locations"]
        images = Images(root.attrs["dataset"], data_root)  # one read per tar span or Parquet row group, here
        absent = np.zeros(count, bool)
        if images.tar_samples is not None:  # planned unlisted: the shard's samples from its tar's headers
            ids, labels, locations, scanned, absent = images.unlisted(locations)
            samples = {**samples, "errors": scanned}
        if retry:
            boxes, status, errors, sources = (self._zarr(a)[rows] for a in (L.BOXES, L.STATUS, L.ERRORS, L.SOURCES))
            errors = errors.astype(object)
            redo = [k for k in range(count) if status[k] == L.MISSING]
        else:  # the errors known from the scan (a tar key without an image) are kept
            self._clear_partials(shard, L.shard_count(n, size))
            boxes, errors = np.zeros((count, views, 4), np.float32), np.asarray(samples["errors"], dtype=object)
            status, redo = np.where(absent, L.ABSENT, L.OK).astype(np.uint8), np.flatnonzero(~absent).tolist()
            sources = np.zeros((count, 3), np.int64)
        min_side = max(t.resolution for t in self.teachers.values())
        if images.kind == "tar":  # planned from sidecars: found in the tar's headers here, and stored for training
            locations = images.resolve(ids, locations)
        stats = provenance.source_stats(images, ids, locations)  # (S, 2): the shard's stamp, and mtimes of packed files
        wanted = ([ids[k] for k in redo], None if locations is None else locations[redo])
        payloads = images.read(*wanted)
        mtimes = stats[redo, 1] if images.packed else np.zeros(len(redo), np.int64)
        scanned = [errors[k] for k in redo]
        read = list(self.pool.map(lambda p, m, why: _read_decode(p, m, min_side, why), payloads, mtimes, scanned))
        decoded = {k: d for k, (d, _) in zip(redo, read)}
        sources[redo] = np.asarray([r for _, r in read], np.int64).reshape(-1, 3)  # none: a shard all ABSENT
        for k, d in decoded.items():
            if isinstance(d, str):
                status[k], errors[k] = (L.MISSING if retryable(d) else L.UNREADABLE), d
            else:
                status[k], errors[k] = L.OK, ""
                boxes[k] = view_boxes(d[2], d[3], views=views, seed=seed, sample_id=ids[k])
        pairs = [(k, v) for k in decoded if status[k] == L.OK for v in range(views)]

        seconds, arrays, moments = {}, {}, {}
        stat_shards = L.stat_shards(L.shard_count(n, size))
        stat_shard = shard in stat_shards
        for name, teacher in self.teachers.items():
            storage = self._zarr(L.teacher_group(name)).attrs["storage"]  # the codecs chosen (a budget's, or the user's)
            out = {p: self._base(p, rows, retry) for p in L.target_arrays(name) if self._zarr(p) is not None}
            seconds[name], found = self._run_teacher(teacher, decoded, boxes, pairs, out, storage, stat_shard)
            arrays.update(out)
            moments.update(found)
        side = root.attrs["settings"]["pixels"]
        if side:  # the student's view pixels, resized once here instead of every epoch
            arrays[L.PIXELS] = self._base(L.PIXELS, rows, retry)
            crops = self.pool.map(lambda p: crop_resize(decoded[p[0]][0], boxes[p[0], p[1]], side,
                                                        span=decoded[p[0]][1]), pairs)
            for (k, v), crop in zip(pairs, crops):
                arrays[L.PIXELS][k, v] = crop

        check_token(self.store, token)
        futures = [self._array(path)[rows].write(value) for path, value in arrays.items()]
        for f in futures:
            f.result()
        written = {L.BOXES: boxes, L.ERRORS: errors, L.SOURCES: sources, L.IDS: np.asarray(ids, dtype=object),
                   L.LABELS: np.asarray(labels, np.int32),
                   **({L.LOCATIONS: locations} if locations is not None else {})}
        for a, value in written.items():
            self._zarr(a)[rows] = value
        if stat_shard:  # every row is written, zeros included: a rerun of the shard replaces what a killed one left
            row = stat_shards.index(shard)
            for name in self.teachers:
                for path, moment in ((L.moment_array(name, t, m), m) for t in L.TARGETS for m in L.MOMENTS):
                    array = self._zarr(path)
                    if array is not None:
                        new = moments.get(path, np.zeros(array.shape[1:]))
                        written[path] = _merge(moment, array[row], new) if retry else new
                        array[row] = written[path]
        check_token(self.store, token)
        return {"shard": shard, "images": len(redo), "views": len(pairs), "seconds": seconds,
                "unreadable": int(sum(status[k] in L.BAD for k in redo)),
                "status": status, "record": self._record(shard, {**arrays, **written}),
                "stamp": provenance.stats_digest(stats),
                **({"split": np.fromiter(map(L.split_key, ids), np.uint16, count), "top": int(max(labels, default=-1))}
                   if images.tar_samples is not None else {})}

    def _clear_partials(self, shard: int, n_shards: int) -> None:
        """Delete the temporary files Zarr left where a kill stopped an earlier run of this shard in one of the
        writes below (`<chunk>.<uuid>.partial`: harmless, nothing reads them, but clutter). Only where an earlier
        run got that far: its target files, written first, are there (one stat; then a listing per array)."""
        if self.store.remote:  # an S3 write leaves no temporary file
            return
        targets = [p for name in self.teachers for p in L.target_arrays(name) if self._zarr(p) is not None]
        first = shard_key(self._zarr(targets[0]).metadata, targets[0], shard, n_shards)
        if not os.path.exists(self.store.key(f"{targets[0]}/{first}")):
            return
        arrays = [L.IDS, L.LABELS, L.LOCATIONS, L.BOXES, L.ERRORS, L.SOURCES] + \
            [L.moment_array(name, t, m) for name in self.teachers for t in L.TARGETS for m in L.MOMENTS]
        for array in arrays:
            if self._zarr(array) is not None:
                key = shard_key(self._zarr(array).metadata, array, shard, n_shards)
                if key is not None:
                    self.store.clear_partial(f"{array}/{key}")

    def _record(self, shard: int, values: dict) -> np.ndarray:
        """(F, 2) int64: shard `shard`'s row of the integrity record: per array its file's size and the digest of
        the values it holds (`values`, by array), as a later reader will find them (`provenance.py`)."""
        record = self._zarr(L.SHARDS)
        files = record.attrs["arrays"]
        row = np.zeros((len(files), 2), np.int64)
        for j, array in enumerate(files):
            key = shard_key(self._zarr(array).metadata, array, shard, record.shape[0])
            if key is not None:
                value = np.asarray(values[array], dtype=None if array in (L.IDS, L.ERRORS) else self._zarr(array).dtype)
                row[j] = self.store.file_size(f"{array}/{key}"), provenance.values_digest(value)
        return row

    def _run_teacher(self, teacher, decoded, boxes, pairs, out, storage, stats) -> tuple[float, dict]:
        """Forward (sample, view) `pairs` through one teacher; encode them into the shard's arrays `out`
        ({path: (S, V, ...)}, filled in place).

        `stats`: accumulate the normalisation moments and the codec's fidelity (statistics shards only).
        Returns (seconds of forward + encode, not the CPU resizing that overlaps it; {moment array: row})."""
        name, res = teacher.spec.name, teacher.resolution
        moments = {}
        def crop(p):
            return crop_resize(decoded[p[0]][0], boxes[p[0], p[1]], res, span=decoded[p[0]][1])

        batches = [pairs[b:b + self.batch_size] for b in range(0, len(pairs), self.batch_size)]
        pending = [self.pool.submit(crop, p) for p in batches[0]] if batches else []
        seconds = 0.0
        for i, batch in enumerate(batches):
            pixels = np.stack([f.result() for f in pending])
            if i + 1 < len(batches):  # resize the next batch on CPU threads while this one runs
                pending = [self.pool.submit(crop, p) for p in batches[i + 1]]
            with self.device_lock:  # the other shard in flight waits here, so seconds are this teacher's own
                started = time.perf_counter()
                for target, value in self._forward(teacher, pixels).items():
                    if value is None:
                        continue
                    stored = codecs.pool(value, storage["pool"]) if target == "spatial" else value
                    transform = self._transform(name, target, storage[target])
                    values, scale = codecs.encode(stored, storage[target], transform)
                    decoded_value = codecs.decode(values, scale, transform)
                    if stats:  # fidelity: what is stored, back at the teacher's grid, vs the raw output
                        back = codecs.unpool(decoded_value, value.shape[1:3]) if target == "spatial" else decoded_value
                        _accumulate(moments, target, decoded_value, codecs.token_cosine(value, back))
                    ks, vs = (list(c) for c in zip(*batch))
                    for path, arr in ((L.target_array(name, target), values), (L.scale_array(name, target), scale)):
                        if arr is not None:
                            out[path][ks, vs] = arr.cpu().numpy()
                seconds += time.perf_counter() - started
        return seconds, {L.moment_array(name, t, m): v for t, ms in moments.items() for m, v in ms.items()}


def _read_decode(payload, mtime: int, min_side: int, scanned: str):
    """(`_decode` of the image, its source record (size, mtime_ns, digest)): its bytes read once (`provenance`)."""
    data, record = provenance.read_image(payload, int(mtime)) if payload is not None else (None, (0, 0, 0))
    return _decode(data, min_side, scanned), record


def _decode(payload, min_side: int, scanned: str = ""):
    """(image, span, width, height) in source pixels (see `load_rgb`), or the reason it is unreadable.

    `payload`: what `Images.read` gave (None: the scan found no image, `scanned` says why)."""
    if payload is None:
        return str(scanned)
    if isinstance(payload, UnreadableImage):
        return str(payload)
    try:
        image, span, (width, height) = load_rgb(payload, min_side=min_side)
    except UnreadableImage as e:
        return str(e)
    return image, span, width, height


def _accumulate(moments: dict, target: str, x: torch.Tensor, cos: torch.Tensor) -> None:
    """Add count, sum and gram of the tokens of (..., C) `x` in float64, and [sum, count, min] of
    their (T,) cosines `cos` to the unencoded output."""
    tokens = x.reshape(-1, x.shape[-1]).double()
    m = moments.setdefault(target, {"count": 0, "sum": 0.0, "gram": 0.0, "fidelity": np.zeros(3)})
    m["count"] += tokens.shape[0]
    m["sum"] = m["sum"] + tokens.sum(0).cpu().numpy()
    m["gram"] = m["gram"] + (tokens.T @ tokens).cpu().numpy()
    m["fidelity"] = _merge("fidelity", m["fidelity"], np.array([float(cos.sum()), cos.numel(), float(cos.min())]))


def _merge(moment: str, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Two statistics rows of one shard added up; a fidelity row is [sum, count, min] of cosines."""
    if moment != "fidelity" or old[1] == 0 or new[1] == 0:  # an empty fidelity row is zeros: the sum is the other
        return old + new
    return np.array([old[0] + new[0], old[1] + new[1], min(old[2], new[2])])
