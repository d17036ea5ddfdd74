"""Pictures: PCA-to-RGB feature maps of teachers next to the student, training curves, the SAM
metric's per-prompt IoU histogram, SAM's point-prompt masks from the student next to the teacher's
and the ground truth, fidelity vs the student's input side, and a store's fixed patterns
(`radio-cache info --picture`).

Drawn with matplotlib's Agg canvas (no display, no pyplot state). Per teacher, one PCA basis is
fitted on the teacher's cached maps of the shown images; the student's adaptor maps are projected
with the same basis and colour range, so equal colours mean equal features.

Letters: P shown images, h, w a teacher grid, C channels, T tokens.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass(frozen=True)
class PCA3:
    """A 3-component PCA basis with the colour range of the maps it was fitted on."""

    mean: np.ndarray  # (C,)
    basis: np.ndarray  # (3, C)
    lo: np.ndarray  # (3,)
    hi: np.ndarray  # (3,)


def fit_pca3(maps: np.ndarray) -> PCA3:
    """Fit on (..., C) maps: top-3 principal directions, range = 1st-99th percentile of each projection."""
    x = np.asarray(maps, dtype=np.float64).reshape(-1, maps.shape[-1])  # (T, C)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = np.zeros((3, x.shape[1]))
    basis[:min(3, len(vt))] = vt[:3]
    proj = (x - mean) @ basis.T  # (T, 3)
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    return PCA3(mean, basis, lo, np.where(hi > lo, hi, lo + 1.0))


def to_rgb(maps: np.ndarray, pca: PCA3) -> np.ndarray:
    """(..., C) maps -> (..., 3) colours in [0, 1] with a fitted basis."""
    proj = (np.asarray(maps, dtype=np.float64) - pca.mean) @ pca.basis.T
    return np.clip((proj - pca.lo) / (pca.hi - pca.lo), 0.0, 1.0)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def features_png(path: Path, images: list[np.ndarray], teacher_maps: dict[str, np.ndarray],
                 student_maps: dict[str, np.ndarray], *, note: str = "", captions: list[str] | None = None) -> Path:
    """One row per image: the image, then per teacher its cached map and the student's adaptor map.

    Args:
        images: P (H, W, 3) uint8 view crops.
        teacher_maps: {teacher: (P, h, w, C)} cached targets.
        student_maps: {teacher: (P, h, w, C)} the student's adaptor outputs at the teacher grid.
        note: a line under the title (e.g. which teachers are tiny, random-weight ones).
        captions: one per image row.
    """
    names = list(teacher_maps)
    P, cols = len(images), 1 + 2 * len(names)
    fig = _figure(1.7 * cols, 1.8 * P + 0.4)
    axes = fig.subplots(P, cols, squeeze=False)
    colours = {}
    for t in names:
        pca = fit_pca3(teacher_maps[t])
        colours[t] = (to_rgb(teacher_maps[t], pca), to_rgb(student_maps[t], pca))
    for r in range(P):
        cells = [images[r]] + [colours[t][k][r] for t in names for k in (0, 1)]  # teacher, student
        for c, (ax, cell) in enumerate(zip(axes[r], cells)):
            ax.imshow(cell, interpolation="nearest" if c else "bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
        if captions:
            axes[r, 0].set_ylabel(captions[r], fontsize=8)
    titles = ["image (view 0)"] + [f"{t}\n{who}" for t in names for who in ("teacher (cached)", "student")]
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=8)
    fig.suptitle("PCA of feature maps: the student projected on each teacher's basis" + (f"\n{note}" if note else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def pattern_png(path: Path, patterns: dict[str, tuple[np.ndarray, np.ndarray]], *, note: str = "") -> Path:
    """One panel per teacher: the norm of its fixed pattern at each grid position, over the RMS of its tokens
    about their mean (`store/pattern.py`), so that panels of different teachers share a scale.

    Args:
        patterns: {teacher: (offset (h, w, C), var (h, w, C))} as `radio-cache pattern` stores them.
    """
    fig = _figure(2.8 * len(patterns), 2.9)
    for ax, (name, (offset, var)) in zip(fig.subplots(1, len(patterns), squeeze=False)[0], patterns.items()):
        norm = np.sqrt((offset.astype(np.float64) ** 2).sum(-1))  # (h, w)
        tokens = np.sqrt((norm ** 2).mean() + var.astype(np.float64).sum(-1).mean())
        shown = ax.imshow(norm / max(tokens, 1e-30), cmap="magma", vmin=0, interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
        ax.set_title(f"{name} ({offset.shape[0]}x{offset.shape[1]}): RMS {np.sqrt((norm ** 2).mean()) / tokens:.3f}",
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    title = "fixed pattern: |mean at a position - mean over positions| / token RMS"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """metrics.csv of a run -> {column: (rows,) float array}."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in (rows[0] if rows else {})}


def curves_png(path: Path, metrics: dict[str, np.ndarray]) -> Path:
    """One panel per teacher (its summary and spatial losses over steps), plus total loss and lr."""
    steps = metrics["step"]
    teachers = sorted({k.split("/", 1)[0] for k in metrics if "/" in k})
    cols = len(teachers) + 1
    fig = _figure(3.2 * cols, 2.8)
    axes = fig.subplots(1, cols, squeeze=False)[0]
    for ax, t in zip(axes, teachers):
        for key in sorted(k for k in metrics if k.startswith(f"{t}/")):
            ax.plot(steps, metrics[key], label=key.split("/", 1)[1])
        ax.set_title(f"{t} loss", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    if "loss" in metrics:
        ax.plot(steps, metrics["loss"], color="black", label="total loss")
    ax.set_title("total loss and lr", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
    if "lr" in metrics:
        lr_ax = ax.twinx()
        lr_ax.plot(steps, metrics["lr"], color="tab:orange", linestyle="--", label="lr")
        lr_ax.tick_params(labelsize=7)
        lr_ax.legend(fontsize=7, loc="upper center")
    ax.legend(fontsize=7)
    for a in axes:
        a.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def sam_png(path: Path, ious: dict[str, np.ndarray]) -> Path:
    """One histogram per SAM teacher: per-prompt IoU of the student's masks to the teacher's ({name: (Q,)})."""
    fig = _figure(3.6 * len(ious), 2.8)
    axes = fig.subplots(1, len(ious), squeeze=False)[0]
    for ax, (name, iou) in zip(axes, ious.items()):
        ax.hist(iou, bins=np.linspace(0, 1, 21), color="tab:blue")
        ax.axvline(float(np.mean(iou)), color="black", linestyle="--", label=f"mean {np.mean(iou):.3f}")
        ax.set_title(f"{name}: student mask IoU per prompt ({len(iou)})", fontsize=9)
        ax.set_xlabel("IoU to the teacher's mask", fontsize=8)
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def resolution_png(path: Path, sweep: dict) -> Path:
    """Fidelity vs student input side, one line per teacher and target (the report's fidelity_by_resolution)."""
    fig = _figure(4.8, 3.2)
    ax = fig.subplots()
    sides = sweep["resolutions"]
    for i, (t, v) in enumerate(sweep["teachers"].items()):
        colour = f"C{i}"
        ax.plot(sides, v["spatial"], marker="o", color=colour, label=f"{t} spatial")
        if v["summary"][0] is not None:
            ax.plot(sides, v["summary"], marker="s", linestyle="--", color=colour, label=f"{t} summary")
    for k, side in enumerate(sweep["trained"]):
        ax.axvline(side, color="grey", linestyle=":", label=None if k else "trained at " +
                   ", ".join(map(str, sweep["trained"])) + " px")
    ax.set_xticks(sides)
    ax.set_xlabel("student input side (px)", fontsize=8)
    ax.set_ylabel("mean cosine to the cached targets", fontsize=8)
    ax.set_title("fidelity vs resolution", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _overlay(image: np.ndarray, masks: np.ndarray, ids: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8 image with each (H, W) bool mask of `masks` (K, H, W) painted in its object's colour."""
    out = image.astype(np.float64) / 255
    for mask, k in zip(masks, ids):
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(_colour(k))
    return out


def _colour(k) -> tuple[float, float, float]:
    """Object number k (1, 2, ...) -> its colour (tab10)."""
    from matplotlib import colormaps

    return tuple(colormaps["tab10"]((int(k) - 1) % 10)[:3])


def sam_masks_png(path: Path, images: list[np.ndarray], panels: dict[str, list[dict]], *,
                  captions: list[str] | None = None, note: str = "") -> Path:
    """One row per image: the image, its ground-truth instances, then per SAM teacher the point-prompt
    masks decoded from the teacher's cached embeddings and from the student's, prompt points drawn.

    Args:
        images: P (s, s, 3) uint8 view crops.
        panels: {teacher: P dicts with 'truth' (s, s) instance ids, 'ids' (K,), 'points' (K, 2) x, y in
            pixels, 'teacher' and 'student' (K, s, s) bool masks, 'iou' {'teacher', 'student'} means}
            (what `report.sam_mask_panels` gives).
        captions: one per image row.
        note: a line under the title.
    """
    names = list(panels)
    P, cols = len(images), 2 + 2 * len(names)
    fig = _figure(1.8 * cols, 2.05 * P + 0.6)
    axes = fig.subplots(P, cols, squeeze=False)
    for r, image in enumerate(images):
        first = panels[names[0]][r]
        truth = first["truth"]
        kinds = np.unique(truth[truth > 0])
        cells = [(image, None, ""), (_overlay(image, truth[None] == kinds[:, None, None], kinds), first, "")]
        for t in names:
            cell = panels[t][r]
            cells += [(_overlay(image, cell[who], cell["ids"]), cell, f"IoU {cell['iou'][who]:.2f}")
                      for who in ("teacher", "student")]
        outlines = [None, (truth[None] == kinds[:, None, None], kinds)] + [(panels[t][r][who], panels[t][r]["ids"])
                                                                      for t in names for who in ("teacher", "student")]
        for ax, (picture, cell, label), outline in zip(axes[r], cells, outlines):
            ax.imshow(picture, interpolation="nearest")
            for mask, k in zip(*outline) if outline is not None else ():
                if mask.any() and not mask.all():  # the edge of each mask, in its object's colour
                    ax.contour(mask.astype(float), levels=[0.5], colors=[_colour(k)], linewidths=1.2)
            if cell is not None:
                ax.scatter(cell["points"][:, 0] - 0.5, cell["points"][:, 1] - 0.5, s=28, c="white",
                           edgecolors="black", linewidths=1.0, marker="o")
            ax.set_xlim(-0.5, image.shape[1] - 0.5)
            ax.set_ylim(image.shape[0] - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(label, fontsize=8)
        if captions:
            axes[r, 0].set_ylabel(captions[r], fontsize=7)
    titles = ["image (view 0)", "ground truth\n(prompt points)"] + [f"{t}\n{who}" for t in names
                                                                 for who in ("teacher (cached)", "student")]
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=8)
    fig.suptitle("SAM point-prompt masks: one point per object, the student as SAM's image encoder"
                 + (f"\n{note}" if note else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path
