"""`radio-train`: distil a student from a store's cached targets, never loading a teacher.

One function, read top to bottom: processes, store, run folder, student, losses, data, loop, export.
Letters: B batch, R student side, h, w a grid, T = h * w tokens, C channels, D summary dims.
"""

import csv
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..errors import TrainingError
from ..student import TeacherDims, create_student, save_student
from .checkpoint import latest, load_checkpoint, read_state, save_checkpoint
from .config import TrainConfig
from .distributed import setup, teardown
from .losses import amradio_spatial_loss, phis_scale, phis_spatial_loss, summary_loss
from .reader import CacheReader, decode_targets


RUNTIME_SETTINGS = ("resume", "stop_at", "workers", "device", "log_every", "checkpoint_every", "out", "store")


def train(cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or, with cfg.resume, continue) a student; returns the final losses and where it went."""
    # 1. processes and device (one process, torchrun DDP or Ray Train)
    procs = setup(cfg.device)
    device = procs.device

    # 2. the store: what each teacher produced, and the samples to train on
    reader = CacheReader(cfg.store, allow_partial=cfg.allow_partial)
    indices = reader.indices(holdout=cfg.holdout)
    reader.check_images(indices, resolution=cfg.resolution)
    steps = cfg.steps or math.ceil(cfg.epochs * len(indices) / cfg.batch_size)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, steps // 20)
    teachers = {t.name: TeacherDims(t.summary_dim, t.spatial_dim) for t in reader.teachers}
    unknown = set(cfg.loss.teacher_weights) - set(teachers)
    if unknown:
        raise TrainingError(f"loss weights for unknown teachers {sorted(unknown)}; the store has {sorted(teachers)}")

    # 3. the run folder: a fresh run, or --resume of one trained from the same store settings
    out, ckpt = Path(cfg.out), Path(cfg.out) / "checkpoint"
    run = {"student": cfg.student, "config": json.loads(json.dumps(asdict(cfg), default=str)),
           "store": str(reader.path), "store_settings": reader.settings, "steps": steps,
           "teachers": {n: asdict(d) for n, d in teachers.items()}}
    if cfg.resume:
        resume_from = latest(ckpt)
        if resume_from is None:
            raise TrainingError(f"--resume: no checkpoint in '{out}'")
        saved = read_state(resume_from)["run"]
        if saved["store_settings"] != reader.settings:
            raise TrainingError(f"--resume: run '{out}' was trained from a store with other teachers or settings "
                                f"than '{reader.path}'; resume with its own store or start a new --out")
        if saved["student"] != cfg.student or saved["config"]["student_overrides"] != run["config"]["student_overrides"]:
            raise TrainingError(f"--resume: run '{out}' trains '{saved['student']}', not '{cfg.student}'")
        changed = sorted(k for k in run["config"] if k not in RUNTIME_SETTINGS
                         and saved["config"].get(k) != run["config"][k])
        if changed:
            was = ", ".join(f"{k}={saved['config'].get(k)}" for k in changed)
            raise TrainingError(f"--resume: run '{out}' was started with {was}; an exact resume needs the same settings")
    elif ckpt.exists():
        raise TrainingError(f"run folder '{out}' already holds a checkpoint; pass --resume or choose another --out")
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(run, indent=2))

    # 4. the student and its optimizer (no weight decay on norms, biases, tokens, position embeddings)
    torch.manual_seed(cfg.seed)
    model = create_student(cfg.student, teachers=teachers, **cfg.student_overrides).to(device)
    if cfg.resolution % model.input_stride:
        raise TrainingError(f"--resolution {cfg.resolution} is not a multiple of {model.input_stride}, "
                            f"the input stride of '{cfg.student}'")
    decays = {n: p.ndim >= 2 and "token" not in n and "pos_embed" not in n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decays[n]]
    other = [p for n, p in model.named_parameters() if not decays[n]]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    start = load_checkpoint(resume_from, model=model, optimizer=optimizer) if cfg.resume else 0
    net = DistributedDataParallel(model) if procs.world > 1 else model

    def lr_at(step: int) -> float:  # linear warmup, then cosine down to min_lr
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))

    # 5. losses: statistics come from the store, never from a teacher
    phis = {}
    if cfg.loss.kind == "phis":
        for t in reader.teachers:
            if "spatial" not in t.norm:
                raise TrainingError(f"--loss phis needs the normalisation statistics of teacher '{t.name}', "
                                    "written when the store's build completes")
            phis[t.name] = phis_scale(t.norm["spatial"]["cov"])

    # 6. data: one view per image per step, this process's slice of each global batch
    end = min(steps, cfg.stop_at or steps)
    loader = reader.loader(indices, resolution=cfg.resolution, batch_size=cfg.batch_size, seed=cfg.seed,
                           start_step=start, steps=end, rank=procs.rank, world=procs.world,
                           workers=_loader_workers(cfg.workers), pin_memory=device.type == "cuda")
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1)
    metrics = Metrics(out, start) if procs.main else None

    # 7. the loop
    net.train()
    last, seen, tick = {}, 0, time.perf_counter()
    with _progress(procs.main and progress, start, steps) as (bar, task):
        for step, batch in zip(range(start, end), loader):
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pixels = batch["pixels"].to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
            targets = decode_targets(batch, reader.teachers, device)
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                output = net(pixels)

            losses, total = {}, 0.0
            for t in reader.teachers:
                pred, target = output.teachers[t.name], targets[t.name]
                weight = cfg.loss.teacher_weights.get(t.name, 1.0)
                if target["summary"] is not None:
                    losses[f"{t.name}/summary"] = summary_loss(pred.summary, target["summary"])
                    total = total + weight * cfg.loss.summary_weight * losses[f"{t.name}/summary"]
                spatial = _to_grid(pred.spatial, t.grid)  # (B, T, C) at the teacher's grid
                goal = target["spatial"].flatten(1, 2)
                losses[f"{t.name}/spatial"] = (phis_spatial_loss(spatial, goal, phis[t.name]) if phis
                                               else amradio_spatial_loss(spatial, goal))
                total = total + weight * cfg.loss.spatial_weight * losses[f"{t.name}/spatial"]

            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()

            values = torch.stack([v.detach().float() for v in losses.values()] + [total.detach(), grad_norm.float()])
            if procs.world > 1:
                dist.all_reduce(values)
                values /= procs.world
            values = values.tolist()
            last = dict(zip(losses, values[:-2]))
            bad = [k for k, v in last.items() if not math.isfinite(v)]
            if bad:
                raise TrainingError(f"loss of teacher '{bad[0].split('/')[0]}' ({bad[0]}) is not finite at step {step}; "
                                    f"the last checkpoint in '{ckpt}' is kept")
            seen += len(pixels) * procs.world
            if procs.main and ((step + 1) % cfg.log_every == 0 or step + 1 == end):
                now = time.perf_counter()
                metrics.log(step + 1, {"lr": lr, "loss": values[-2], "grad_norm": values[-1], **last,
                                       "images_per_s": seen / (now - tick)})
                seen, tick = 0, now
                bar.update(task, losses="  ".join(f"{k} {v:.4f}" for k, v in last.items()))
            bar.advance(task)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                if procs.main:
                    save_checkpoint(ckpt, model=model, optimizer=optimizer, step=step + 1, run=run)
                if procs.world > 1:
                    dist.barrier()

    # 8. export: a student loadable with `load_student`, without this package's training code
    if procs.main:
        save_student(model, out / "student")
        metrics.close()
    teardown()
    return {"out": str(out), "steps": steps, "step": end, "losses": last}


def _loader_workers(workers: int | None) -> int:
    """Given, or the cores this process's share of the machine leaves after the main process."""
    if workers is not None:
        return workers
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 2) // local_world - 1)


def _to_grid(spatial: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) at the student grid -> (B, T, C) at the teacher grid (antialiased when shrinking)."""
    if tuple(spatial.shape[-2:]) != tuple(grid):
        shrink = spatial.shape[-2] > grid[0] or spatial.shape[-1] > grid[1]
        spatial = F.interpolate(spatial.float(), size=grid, mode="bilinear", align_corners=False, antialias=shrink)
    return spatial.flatten(2).transpose(1, 2)


class _progress:
    """A rich progress bar with a losses field, or a no-op one."""

    def __init__(self, enabled: bool, start: int, steps: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[losses]}"), disable=not enabled)
        self.task = self.bar.add_task("train", total=steps, completed=start, losses="")

    def __enter__(self):
        self.bar.__enter__()
        return self.bar, self.task

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


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
