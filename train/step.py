"""One distillation step, the one `radio-train`'s loop runs and the benchmarks time.

Letters: B batch, R student side, h, w a grid, T = h * w tokens, C channels, D summary dims,
K metrics (the per-teacher losses, then the weighted total and the gradient norm).
"""

import contextlib

import torch
import torch.nn.functional as F

from ..errors import TrainingError
from ..ops import autocast, normalise
from ..store.reader import TeacherMeta, decode_targets
from .losses import LossConfig, amradio_spatial_loss, phis_scale, phis_spatial_loss, summary_loss
from .shift import shift_targets


def to_grid(spatial: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) at the student grid -> (B, T, C) at the teacher grid (antialiased when shrinking)."""
    if tuple(spatial.shape[-2:]) != tuple(grid):
        shrink = spatial.shape[-2] > grid[0] or spatial.shape[-1] > grid[1]
        spatial = F.interpolate(spatial.float(), size=grid, mode="bilinear", align_corners=False, antialias=shrink)
    return spatial.flatten(2).transpose(1, 2)


def pair_teachers(teachers: list[TeacherMeta], sides: tuple[int, ...]) -> dict[int, list[str]]:
    """The teachers each student side trains: of the entries of one teacher model cached at several
    resolutions (e.g. dinov2_lo@224, dinov2_hi@448), the one closest to the side (a tie: the higher);
    every other teacher at every side."""
    models = {}
    for t in teachers:
        models.setdefault(t.model, []).append(t)
    pick = {side: {min(group, key=lambda t: (abs(t.resolution - side), -t.resolution)).name
                   for group in models.values()} for side in sides}
    return {side: [t.name for t in teachers if t.name in pick[side]] for side in sides}


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on norms, biases, tokens and position embeddings."""
    decays = {n: p.ndim >= 2 and "token" not in n and "pos_embed" not in n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decays[n]]
    other = [p for n, p in model.named_parameters() if not decays[n]]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))


def total_loss(losses: dict[str, torch.Tensor], loss: LossConfig, trained: list[str]) -> torch.Tensor:
    """The loss a step minimises: sum over the `trained` teachers' losses ({'<teacher>/<target>': value}) of
    teacher weight (default 1) x target weight (`summary_weight`, `spatial_weight`) x loss."""
    total = 0.0
    for key, value in losses.items():
        teacher, target = key.split("/")
        if teacher in trained:
            total = total + loss.teacher_weights.get(teacher, 1.0) * getattr(loss, f"{target}_weight") * value
    return total


class DistillStep:
    """Normalise pixels, forward (bf16 autocast on CUDA), each teacher's losses at its grid, backward,
    gradient clipping and the optimizer step.

    Never waits for the device: the metrics come back as one device tensor, for the caller to read
    (one host sync) only when it logs or checkpoints.

    Args:
        model: the student (its parameters are clipped).
        teachers: what the store holds (`CacheReader.teachers`, or built for live teachers).
        net: what runs the forward, when not `model` itself (its DDP wrapper).
        pairing: {student side: teachers trained at it} (`pair_teachers`); None: every teacher at every
            side. The metrics hold every teacher's losses, trained or not.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, teachers: list[TeacherMeta], *,
                 loss: LossConfig, grad_clip: float, device: torch.device, net: torch.nn.Module | None = None,
                 pairing: dict[int, list[str]] | None = None):
        self.model, self.net, self.optimizer = model, net or model, optimizer
        self.teachers, self.loss, self.grad_clip, self.device = list(teachers), loss, grad_clip, device
        self.pairing = pairing
        self.phis = {}  # statistics come from the store, never from a teacher
        if loss.kind == "phis":
            for t in self.teachers:
                if "spatial" not in t.norm:
                    raise TrainingError(f"--loss phis needs the normalisation statistics of teacher '{t.name}', "
                                        "written when the store's build completes")
                self.phis[t.name] = phis_scale(t.norm["spatial"]["cov"])
        self.names = [f"{t.name}/{target}" for t in self.teachers for target in ("summary", "spatial")
                      if target == "spatial" or t.summary_dim is not None] + ["loss", "grad_norm"]

    def __call__(self, *parts: dict) -> torch.Tensor:
        """Loader batches ('pixels' (B, 3, R, R) uint8 and encoded targets), one per part of the step
        (one R each) -> (K,) metrics on the device."""
        return self.update_parts([(part["pixels"].to(self.device, non_blocking=True), self.targets(part))
                                  for part in parts])

    def targets(self, part: dict) -> dict:
        """A loader batch's decoded targets (`decode_targets`); one with another view's spatial targets ('other')
        and both boxes ('boxes' (B, 2, 4), `--denoise shift`): each spatial target is that view's map over the
        student's view, with its 'weight' (B, h, w) on the overlap (`shift_targets`)."""
        targets = decode_targets(part, self.teachers, self.device)
        if "other" in part:
            others, boxes = decode_targets(part["other"], self.teachers, self.device), part["boxes"].to(self.device)
            for name, target in targets.items():
                target["spatial"], target["weight"] = shift_targets(target["spatial"], others[name]["spatial"], boxes)
        return targets

    def update(self, pixels: torch.Tensor, targets: dict) -> torch.Tensor:
        """pixels (B, 3, R, R) in 0..255 on the device; targets as `targets` returns them -> (K,) metrics."""
        return self.update_parts([(pixels, targets)])

    def update_parts(self, parts: list[tuple[torch.Tensor, dict]]) -> torch.Tensor:
        """One optimizer step on the parts ((pixels, targets) as `update` takes them) -> (K,) metrics.

        Each part's losses are weighted by its share of the samples, so the parts train (and report) as
        one batch would; each part runs backward at once, so the memory held is that of the largest part."""
        total_size = sum(len(pixels) for pixels, _ in parts)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = 0.0
        for k, (pixels, targets) in enumerate(parts):
            share = len(pixels) / total_size
            # DDP: gradients are averaged over processes once, after the last part
            sync = k == len(parts) - 1 or not hasattr(self.net, "no_sync")
            with contextlib.nullcontext() if sync else self.net.no_sync():
                losses, total = self._losses(pixels, targets)
                (total * share if len(parts) > 1 else total).backward()
            metrics = metrics + torch.stack([v.detach().float() for v in losses] + [total.detach()]) * share
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return torch.cat([metrics, grad_norm.float()[None]])

    def _losses(self, pixels: torch.Tensor, targets: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The per-teacher losses of one part (in `names` order) and their weighted sum."""
        with autocast(self.device):
            output = self.net(normalise(pixels, self.model.mean, self.model.std))
        losses = {}
        for t in self.teachers:
            pred, target = output.teachers[t.name], targets[t.name]
            if target["summary"] is not None:
                losses[f"{t.name}/summary"] = summary_loss(pred.summary, target["summary"])
            spatial = to_grid(pred.spatial, t.grid)  # (B, T, C) at the teacher's grid
            goal = target["spatial"].flatten(1, 2)
            weight = None if target.get("weight") is None else target["weight"].flatten(1)  # (B, T)
            losses[f"{t.name}/spatial"] = (phis_spatial_loss(spatial, goal, self.phis[t.name], weight) if self.phis
                                           else amradio_spatial_loss(spatial, goal, weight))
        # a teacher not paired with this side: its losses are reported, its heads get no gradient
        trained = self.pairing[pixels.shape[-1]] if self.pairing else [t.name for t in self.teachers]
        return list(losses.values()), total_loss(losses, self.loss, trained)
