"""`radio-train`: distil a student from a store's cached targets, never loading a teacher.

One function, read top to bottom: processes, store, student, run folder, losses, data, loop, export.
The device is waited on only every --log-every steps (and at checkpoints), where the metrics since
the last wait are checked to be finite: a checkpoint never holds a non-finite step.
Letters: B batch, R student side, K metrics per step, n steps since the last check.
"""

import contextlib
import csv
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import RadioDistillError, TrainingError
from ..progress import Progress, fmt
from ..store.provenance import values_digest
from ..store.reader import CacheReader, worker_error
from ..student import TeacherDims, create_student, save_student
from ..student.init import init_line, init_student
from .checkpoint import latest, load_checkpoint, read_state, save_checkpoint
from .config import TrainConfig
from .distributed import barrier, first_error, setup, teardown
from .losses import check_teacher_weights
from .step import DistillStep, make_optimizer, pair_teachers

RUNTIME_SETTINGS = ("resume", "stop_at", "workers", "device", "log_every", "checkpoint_every", "out", "store", "images",
                    "init")  # a resume starts from its checkpoint, whatever --init says
ADDED_SETTINGS = {"denoise": "none", "upsample": {}}  # settings added since runs were saved: what a run.json without them trained with


MIN_HELD_OUT = 32  # held-out samples below which radio-eval's numbers are mostly noise


def holdout_note(held: int, usable: int, holdout: float) -> str | None:
    """A warning line when the held-out split is too small to measure a student on, with a --holdout that
    would hold out MIN_HELD_OUT samples (when the store has them to spare); None when it is large enough."""
    if held >= MIN_HELD_OUT or usable == 0:
        return None
    wanted = math.ceil(100 * min(0.5, MIN_HELD_OUT / usable)) / 100
    more = f"; pass --holdout {wanted} to hold out about {round(wanted * usable)}" if wanted > holdout else ""
    return (f"warning: --holdout {holdout} holds out {held} of {usable} usable samples, too few for radio-eval "
            f"to measure the student on{more}")


def print_notes(reader: CacheReader, holdout: float) -> None:
    """The warnings of samples that cannot be trained on and of a small held-out split, on stderr."""
    notes = (reader.unusable_note(),
             holdout_note(len(reader.indices(holdout=holdout, split="holdout")), reader.num_usable, holdout))
    for note in filter(None, notes):
        print(note, file=sys.stderr)


def default_warmup(steps: int) -> int:
    """Warmup steps when none are given: 5% of the run, at least one."""
    return max(1, steps // 20)


def get_lr(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """The learning rate of step `step` (0-based) of `steps`: linear warmup to `lr` over the first `warmup`
    steps (step warmup - 1 is at `lr`), then a cosine from `lr` down to `min_lr` at step `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def check_resume(saved: dict, run: dict, out: Path) -> None:
    """--resume continues only the run that `saved` (its run.json) describes: the same store settings, student,
    settings and subtracted fixed patterns (`--denoise mean`); `run` is what this call would start.

    Raises:
        TrainingError: naming what differs."""
    if saved["store_settings"] != run["store_settings"]:
        raise TrainingError(f"--resume: run '{out}' was trained from a store with other teachers or settings "
                            f"than '{run['store']}'; resume with its own store or start a new --out")
    if saved["student"] != run["student"] or saved["config"]["student_overrides"] != run["config"]["student_overrides"]:
        raise TrainingError(f"--resume: run '{out}' trains '{saved['student']}', not '{run['student']}'")
    had = {**ADDED_SETTINGS, **saved["config"]}
    changed = sorted(k for k in run["config"] if k not in RUNTIME_SETTINGS and had.get(k) != run["config"][k])
    if changed:
        was = ", ".join(f"{k}={had.get(k)}" for k in changed)
        raise TrainingError(f"--resume: run '{out}' was started with {was}; an exact resume needs the same settings")
    if saved.get("patterns") != run["patterns"]:
        raise TrainingError(f"--resume: the fixed patterns in '{run['store']}' changed since run '{out}' started "
                            "(`radio-cache pattern` ran again); an exact resume needs the ones it subtracted: start "
                            "a new --out")


def check_upsample(upsample: dict[str, int], metas, *, sides: tuple[int, ...] = (), reduction: int | None = None) -> None:
    """One line unless every `--upsample NAME=K` names a teacher of the store and K is at most its grid's side;
    given the student's `reduction`, unless its K-times-finer map is no finer than the teacher's grid at some side.

    Raises:
        TrainingError: naming the teacher and the value."""
    grids = {t.name: t.grid for t in metas}
    for name, k in upsample.items():
        if name not in grids:
            raise TrainingError(f"--upsample {name}={k}: no teacher '{name}' in the store; it has {sorted(grids)}")
        if k > max(grids[name]):  # finer than the teacher's whole grid from one student token
            raise TrainingError(f"--upsample {name}={k}: above the side of the {grids[name][0]} x {grids[name][1]} grid "
                                f"of teacher '{name}'")
        if reduction is not None and all(k * (side // reduction) > max(grids[name]) for side in sides):
            finest = max(1, max(grids[name]) // (min(sides) // reduction))
            raise TrainingError(f"--upsample {name}={k}: the student's map would be finer than the {grids[name][0]} x "
                                f"{grids[name][1]} grid of teacher '{name}' at every --resolution; at most {finest} here")


def finite_rows(pending: list[torch.Tensor], step: int, *, names: list[str], world: int, ckpt: Path) -> list[list[float]]:
    """Wait for the device once: the (K,) metrics of the steps up to `step` (averaged over `world` ranks, a
    collective when world > 1), each finite, else a one-line error naming the first bad step and metric.

    Raises:
        TrainingError: a loss or the gradient norm is NaN or inf (the last checkpoint in `ckpt` is kept)."""
    values = torch.stack(pending)  # (n, K)
    if world > 1:
        dist.all_reduce(values)
        values /= world
    rows = values.tolist()
    for k, row in enumerate(rows):
        bad = [name for name, v in zip(names, row) if not math.isfinite(v)]
        if bad:
            at = step - len(rows) + 1 + k
            what = f"loss of teacher '{bad[0].split('/')[0]}' ({bad[0]})" if "/" in bad[0] else bad[0]
            raise TrainingError(f"{what} is not finite at step {at}; the last checkpoint in '{ckpt}' is kept")
    return rows


def train(cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or, with cfg.resume, continue) a student; returns the final losses and where it went."""
    # 1. processes and device (one process, torchrun DDP or Ray Train)
    procs = setup(cfg.device)
    device = procs.device

    # 2. the store: what each teacher produced, and the samples to train on
    reader = CacheReader(cfg.store, allow_partial=cfg.allow_partial, images=cfg.images, denoise=cfg.denoise)
    check_upsample(cfg.upsample, reader.teachers)
    teachers = {t.name: TeacherDims(t.summary_dim, t.spatial_dim, cfg.upsample.get(t.name, 1)) for t in reader.teachers}
    check_teacher_weights(cfg.loss, list(teachers))
    indices = reader.indices(holdout=cfg.holdout)  # read lazily, a block at a time (`Split`)
    per_step = sum(cfg.batch_sizes)  # samples a step, over all its parts
    if not indices.at_least(per_step) and len(indices):  # reads blocks until per_step rows are found: few
        sizes = ",".join(map(str, cfg.batch_sizes))
        raise TrainingError(f"--batch-size {sizes} takes {per_step} samples a step, more than the "
                            f"{len(indices)} of the training split (--holdout {cfg.holdout} of {reader.num_usable} "
                            "usable): every batch would repeat samples; lower --batch-size")
    reader.check_images(indices, resolution=max(cfg.sides))
    notes = threading.Thread(target=print_notes, args=(reader, cfg.holdout), daemon=True)
    if procs.main:  # the counts take a pass over the status and split keys: beside the first steps, not before
        notes.start()
    if cfg.denoise == "shift" and not reader.pairs and procs.main:
        print(f"warning: --denoise shift: store '{reader.path}' holds one view per image, so the student is compared "
              "with the teacher on its own view, as with --denoise none", file=sys.stderr)
    steps = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * len(indices) / per_step)
    warmup = default_warmup(steps) if cfg.warmup_steps is None else cfg.warmup_steps
    # 3. the student (built before the run folder: a bad name or resolution creates nothing)
    torch.manual_seed(cfg.seed)
    model = create_student(cfg.student, teachers=teachers, **cfg.student_overrides).to(device)
    bad = [side for side in cfg.sides if side % model.input_stride]
    if bad:
        raise TrainingError(f"--resolution {bad[0]} is not a multiple of {model.input_stride}, "
                            f"the input stride of '{cfg.student}'")
    check_upsample(cfg.upsample, reader.teachers, sides=cfg.sides, reduction=model.feature_info["reduction"])
    model.preferred_resolution = max(cfg.sides)  # recorded with the student, RADIO's preferred_resolution
    started = None  # --init: a trained student's backbone, and its heads of the teachers this store has too
    if cfg.init is not None and not cfg.resume:
        started = init_student(model, cfg.init)
        if procs.main:
            print(init_line(started))

    # 4. the run folder: a fresh run, or --resume of one trained from the same store settings
    pairing = pair_teachers(reader.teachers, cfg.sides)  # a teacher cached at several sides: the closest trains
    partial = any(len(names) < len(teachers) for names in pairing.values())
    if partial and procs.main:
        print("teachers trained per student resolution: " + "; ".join(f"{side}: {', '.join(names)}"
                                                                       for side, names in pairing.items()))
    out, ckpt = Path(cfg.out), Path(cfg.out) / "checkpoint"
    run = {"student": cfg.student, "config": json.loads(json.dumps(asdict(cfg), default=str)),
           "store": str(reader.path), "store_settings": reader.settings, "steps": steps,
           "teachers": {n: asdict(d) for n, d in teachers.items()}, "pairing": {str(s): n for s, n in pairing.items()},
           "init": started,
           # the digests of the patterns subtracted (`--denoise mean`), for --resume to check
           "patterns": {t.name: values_digest(t.pattern["cpu"].numpy()) for t in reader.teachers if t.pattern} or None}
    if cfg.resume:
        resume_from = latest(ckpt)
        if resume_from is None:
            raise TrainingError(f"--resume: no checkpoint in '{out}'")
        saved = read_state(resume_from)["run"]
        run["init"] = saved.get("init")
        check_resume(saved, run, out)
    elif ckpt.exists() or latest(ckpt) is not None:  # a crash mid-swap leaves only checkpoint.old
        raise TrainingError(f"run folder '{out}' already holds a checkpoint; pass --resume or choose another --out")
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(run, indent=2))

    # 5. the optimizer and the step (losses: statistics come from the store, never from a teacher)
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = load_checkpoint(resume_from, model=model, optimizer=optimizer) if cfg.resume else 0
    # heads of teachers not paired with a step's side get no gradient at that step
    net = DistributedDataParallel(model, find_unused_parameters=partial) if procs.world > 1 else model
    distill = DistillStep(model, optimizer, reader.teachers, loss=cfg.loss, grad_clip=cfg.grad_clip, device=device,
                          net=net, pairing=pairing if partial else None)

    # 6. data: one view per image per step, this process's slice of each global batch (one loader batch per part)
    end = min(steps, cfg.stop_at or steps)
    workers = _loader_workers(cfg.workers)
    loader = reader.loader(indices, resolution=cfg.resolution, batch_size=cfg.batch_size,
                           policy=cfg.resolution_policy, seed=cfg.seed, start_step=start, steps=end, rank=procs.rank,
                           world=procs.world, workers=workers, pin_memory=device.type == "cuda")
    parts = len(cfg.batch_sizes)  # loader batches per step
    metrics = Metrics(out, start) if procs.main else None

    # 7. the loop; a batch that cannot be read (corrupt chunk, vanished image) stops it with one line,
    # after a checkpoint of the last step done
    net.train()
    last, seen, tick, pending, batches, kept = {}, 0, time.perf_counter(), [], iter(loader), start
    with Progress("training", total=steps, unit="steps", start=start, enabled=procs.main and progress) as bar, \
            _step_threads(device, workers):
        for step in range(start, end):
            try:
                batch, error = [next(batches) for _ in range(parts)], None
            except RadioDistillError as e:
                batch, error = None, worker_error(e)
            error = first_error(error, procs)  # every rank, before this step's collectives: one rank's failure ends all
            if error is not None:
                if step > kept:
                    if pending:  # every rank is here: the steps since the last check are checked as usual
                        finite_rows(pending, step - 1, names=distill.names, world=procs.world, ckpt=ckpt)
                    if procs.main:
                        save_checkpoint(ckpt, model=model, optimizer=optimizer, step=step, run=run)
                    kept = step
                barrier(procs)  # the others end once rank 0's checkpoint is written
                if kept:
                    raise type(error)(f"{error}; the checkpoint in '{ckpt}' holds step {kept}: continue with "
                                      "--resume once the store is repaired") from None
                raise error from None
            lr = get_lr(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=warmup, steps=steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pending.append(distill(*batch))
            seen += sum(len(part["pixels"]) for part in batch) * procs.world
            logs = (step + 1) % cfg.log_every == 0 or step + 1 == end
            saves = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end
            if logs or saves:
                values, pending = finite_rows(pending, step, names=distill.names, world=procs.world, ckpt=ckpt)[-1], []
                last = dict(zip(distill.names[:-2], values[:-2]))
            if procs.main and logs:
                now = time.perf_counter()
                metrics.log(step + 1, {"lr": lr, "loss": values[-2], "grad_norm": values[-1], **last,
                                       "images_per_s": seen / (now - tick)})
                seen, tick = 0, now
            bar.advance(info="  ".join(f"{k} {fmt(v)}" for k, v in last.items()) if logs else None)
            if saves:
                if procs.main:
                    save_checkpoint(ckpt, model=model, optimizer=optimizer, step=step + 1, run=run)
                kept = step + 1
                if procs.world > 1:
                    dist.barrier()

    # 8. export: a student loadable with `load_student`, without this package's training code
    if procs.main:
        metrics.close()
        try:
            save_student(model, out / "student")
        except OSError as e:
            raise TrainingError(f"cannot write the student to '{out / 'student'}': {e.strerror or e}; the checkpoint "
                                f"in '{ckpt}' holds step {kept}: free space and export it with --resume") from None
    teardown()
    if notes.is_alive():
        notes.join()
    return {"out": str(out), "steps": steps, "step": end, "losses": last}


def _cores() -> int:
    """This process's share of the machine's cores."""
    return max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _loader_workers(workers: int | None) -> int:
    """Given, or the cores this process's share of the machine leaves after the main process."""
    return workers if workers is not None else max(1, _cores() - 1)


@contextlib.contextmanager
def _step_threads(device: torch.device, workers: int):
    """On the CPU, the step's intra-op threads leave the loader workers their cores: threads spinning
    beside busy workers on the same cores halved radio-train's speed (BENCHMARKS.md)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, _cores() - workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Metrics:
    """metrics.csv (one row per logged step) and TensorBoard scalars; a resumed run drops rows past its checkpoint."""

    def __init__(self, out: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter
        self.path = out / "metrics.csv"
        rows = []
        if self.path.exists() and start:
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
        self.file = self.path.open("w", newline="")
        self.writer = None
        if rows:
            self._start(list(rows[0]))
            self.writer.writerows(rows)
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)

    def _start(self, fields: list[str]) -> None:
        self.writer = csv.DictWriter(self.file, fieldnames=fields)
        self.writer.writeheader()

    def log(self, step: int, values: dict) -> None:
        row = {"step": step, **values}
        if self.writer is None:
            self._start(list(row))
        self.writer.writerow(row)
        self.file.flush()
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()
