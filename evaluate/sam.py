"""The student as SAM's image encoder: a segment_anything `Sam` that `SamPredictor` uses unchanged.

The prompt encoder and mask decoder come from the SAM teacher's own checkpoint file (checked by
sha256 against the store's record); the image encoder is the student plus its adaptor for that
teacher, resized to SAM's embedding grid. Only the neck target (256 channels, the decoder's input)
can feed the decoder; stores built with `--sam-spatial preneck` are refused.

Letters: B batch, S SAM's input side (1024), R the student's side, C SAM's embedding channels,
g x g SAM's embedding grid (64 x 64 for the released models).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EvaluationError
from ..student import load_student
from ..student.model import Student
from .features import load_run


class StudentImageEncoder(nn.Module):
    """SAM-preprocessed pixels (B, 3, S, S) -> (B, C, g, g) from the student's adaptor for one teacher.

    SAM normalises 0-255 pixels by its own mean/std and zero-pads to S x S; this undoes that
    normalisation, applies the student's, resizes to the student's training side R (the view the
    SAM teacher saw at S, the student saw at R) and resizes the adaptor map to SAM's grid.
    """

    def __init__(self, student: Student, teacher: str, *, resolution: int, img_size: int, grid: tuple[int, int],
                 sam_mean: torch.Tensor, sam_std: torch.Tensor):
        super().__init__()
        self.student, self.teacher, self.resolution, self.grid = student, teacher, resolution, tuple(grid)
        self.img_size = img_size  # read by SamPredictor and Sam.preprocess
        self.register_buffer("sam_mean", sam_mean.view(1, 3, 1, 1).float(), persistent=False)
        self.register_buffer("sam_std", sam_std.view(1, 3, 1, 1).float(), persistent=False)
        self.register_buffer("mean", torch.tensor(student.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(student.std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * self.sam_std + self.sam_mean - self.mean) / self.std
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                          align_corners=False)
        return to_sam_grid(self.student(x).teachers[self.teacher].spatial, self.grid)


def to_sam_grid(spatial: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, g, g) float32, bilinear: the drop-in's resize, shared by `radio-eval`'s SAM metric."""
    if tuple(spatial.shape[-2:]) == tuple(grid):
        return spatial.float()
    return F.interpolate(spatial.float(), size=tuple(grid), mode="bilinear", align_corners=False)


def sam_model(run: str | Path, checkpoint: str | Path | None = None, *, teacher: str | None = None,
              device: str | torch.device = "cpu"):
    """A segment_anything `Sam` whose image encoder is the run's student (see the module docstring).

    Args:
        run: a `radio-train` run folder whose store has a SAM teacher.
        checkpoint: the SAM teacher's checkpoint file; None only for the tiny preset (seeded weights).
        teacher: which SAM teacher of the store, when it has several.
        device: where the model goes.

    Returns:
        the `Sam`, in eval mode.
    """
    info = load_run(run)
    sams = {n: i for n, i in info.store_settings["teachers"].items() if i["family"] == "sam"}
    if not sams:
        raise EvaluationError(f"run '{info.path}' was trained from a store without a SAM teacher")
    if teacher is None and len(sams) > 1:
        raise EvaluationError(f"run '{info.path}' has SAM teachers {sorted(sams)}; pick one with teacher=")
    name = teacher or next(iter(sams))
    if name not in sams:
        raise EvaluationError(f"'{name}' is not a SAM teacher of run '{info.path}'; its SAM teachers: {sorted(sams)}")
    ident = sams[name]
    if ident.get("spatial", "neck") != "neck":
        raise EvaluationError(f"SAM teacher '{name}' was cached pre-neck; SAM's mask decoder needs the neck target "
                              "(build the store with --sam-spatial neck)")
    sam = load_sam(ident, checkpoint, name)
    student = load_student(info.path)
    sam.image_encoder = StudentImageEncoder(
        student, name, resolution=info.resolution, img_size=sam.image_encoder.img_size,
        grid=sam.prompt_encoder.image_embedding_size, sam_mean=sam.pixel_mean, sam_std=sam.pixel_std)
    return sam.to(device).eval()


def sam_predictor(run: str | Path, checkpoint: str | Path | None = None, *, teacher: str | None = None,
                  device: str | torch.device = "cpu"):
    """`segment_anything.SamPredictor` over `sam_model(run, checkpoint)`: set_image, then predict as usual."""
    from segment_anything import SamPredictor

    return SamPredictor(sam_model(run, checkpoint, teacher=teacher, device=device))


def load_sam(ident: dict, checkpoint: str | Path | None, name: str):
    """The SAM teacher `name` (its store identity `ident`) as its library loads it, after checking the
    file is the one cached from; the tiny preset needs no file (seeded)."""
    from ..cache.teachers import TeacherSpec, build_teacher, sha256_file, tiny_teachers

    if ident.get("preset") == "tiny":
        if checkpoint is not None:
            raise EvaluationError(f"SAM teacher '{name}' is the tiny preset (seeded weights): it takes no checkpoint "
                                  f"file, got '{checkpoint}'")
        spec = next(s for s in tiny_teachers() if s.family == "sam")
        return build_teacher(spec).model  # seeded: the decoder the store's targets were made beside
    if checkpoint is None:
        raise EvaluationError(f"SAM teacher '{name}' ({ident['model']}): pass its checkpoint file")
    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.is_file():
        raise EvaluationError(f"SAM checkpoint '{checkpoint}' is not a file")
    if ident.get("sha256") and sha256_file(checkpoint) != ident["sha256"]:
        raise EvaluationError(f"SAM checkpoint '{checkpoint}' is not the file teacher '{name}' was cached from "
                              f"({ident.get('weights')}, sha256 {ident['sha256'][:12]}...)")
    spec = TeacherSpec(name, "sam", ident["model"], weights=str(checkpoint), resolution=ident.get("resolution"))
    sam = build_teacher(spec).model
    return sam.requires_grad_(False)


@torch.no_grad()
def prompt_masks(sam, embeddings: torch.Tensor, *, points: int = 4, seed: int = 0) -> torch.Tensor:
    """Masks SAM's decoder draws from `embeddings` (B, C, g, g) for a seeded grid of point prompts.

    Each image gets `points` x `points` single positive points: the centres of a regular grid over
    SAM's input frame, each moved by a seeded jitter of up to a quarter cell.

    Returns:
        (B, points**2, 4g, 4g) bool masks at the decoder's output size.
    """
    S = sam.prompt_encoder.input_image_size[0]
    rng = torch.Generator().manual_seed(seed)
    centres = (torch.arange(points) + 0.5) * S / points
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(-1, 1, 2)  # (P, 1, 2) x, y
    pe = sam.prompt_encoder.get_dense_pe()
    out = []
    for b, emb in enumerate(embeddings):
        coords = grid + (torch.rand(grid.shape, generator=rng) - 0.5) * S / points / 2
        coords, labels = coords.to(emb.device), torch.ones(len(coords), 1, dtype=torch.int, device=emb.device)
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        logits, _ = sam.mask_decoder(image_embeddings=emb[None], image_pe=pe, sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense, multimask_output=False)
        out.append(logits[:, 0] > sam.mask_threshold)
    return torch.stack(out)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks (..., H, W) -> (...); two empty masks agree fully (IoU 1)."""
    inter, union = (a & b).flatten(-2).sum(-1), (a | b).flatten(-2).sum(-1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float))


@torch.no_grad()
def mask_agreement(sam, reference: torch.Tensor, candidates: dict[str, torch.Tensor], *, points: int = 4,
                   seed: int = 0, batch: int = 16) -> dict[str, torch.Tensor]:
    """Per-prompt IoU of the masks each candidate's embeddings give vs those of `reference`, same prompts.

    Args:
        sam: a segment_anything `Sam` (its prompt encoder and mask decoder are used).
        reference: (M, C, g, g) embeddings, e.g. the cached SAM teacher features.
        candidates: name -> (M, C, g, g) embeddings.
        batch: images decoded at a time (the masks of a batch are (batch, points**2, 4g, 4g) bools).

    Returns:
        name -> (M, points**2) float IoUs, on the CPU.
    """
    device = sam.prompt_encoder.get_dense_pe().device
    out = {name: [] for name in candidates}
    for start in range(0, len(reference), batch):
        part = slice(start, start + batch)
        ref = prompt_masks(sam, reference[part].to(device), points=points, seed=seed + start)
        for name, emb in candidates.items():
            masks = prompt_masks(sam, emb[part].to(device), points=points, seed=seed + start)
            out[name].append(mask_iou(ref, masks).cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}
