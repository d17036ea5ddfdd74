"""Start a student from a trained one (`radio-train --init`), whatever teachers the new store has.

The backbone comes over whole. A head (summary or spatial) of a teacher the trained student also had
(same name, same shapes) comes over; a new teacher's heads stay as the new student was built (seeded),
and a teacher the new student lacks is dropped. A ViT's prefix tokens follow their teachers: summary
token i of the new student is the trained summary token of the same teacher (fresh for a new one), the
registers come over in order, and so do the prefix rows of the position embedding.
Letters: P prefix tokens (S summary + R registers), N patch positions, D width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import RadioDistillError
from .backbones import TimmViT
from .export import CONFIG, WEIGHTS, student_dir
from .model import Student, as_teacher_dims

FRESH = "backbone.cpe_state"  # the CPE crop sequence: each run draws its own


def init_source(path: str | Path) -> tuple[Path, Path]:
    """(config.json, weights) of what ``--init`` names: a run folder (its ``student/``, else its last
    checkpoint's), a saved student or Hugging Face export folder, or a student's ``.safetensors`` file
    with its ``config.json`` beside it."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors" or not (path.parent / CONFIG).is_file():
            raise RadioDistillError(f"--init {path}: a file must be a student's .safetensors weights with its "
                                    f"{CONFIG} beside it (as radio-train writes in RUN/student/)")
        return path.parent / CONFIG, path
    if path.is_dir() and not (path / CONFIG).is_file() and not (path / "student" / CONFIG).is_file():
        for checkpoint in ("checkpoint", "checkpoint.old"):  # a run stopped before its end (--stop-at)
            if (path / checkpoint / "student" / WEIGHTS).is_file():
                path = path / checkpoint / "student"
                break
    try:
        folder = student_dir(path)
    except RadioDistillError as e:
        raise RadioDistillError(f"--init: {e}") from None
    return folder / CONFIG, folder / WEIGHTS


def init_config(path: str | Path) -> dict:
    """The saved config (student name, overrides, teachers...) of what ``--init`` names."""
    return json.loads(init_source(path)[0].read_text())


def init_student(model: Student, path: str | Path) -> dict:
    """Loads a trained student's weights into ``model`` as the module docstring says.

    Args:
        model: the freshly built student (its heads for new teachers stay as built).
        path: see ``init_source``.

    Returns:
        ``{"from": path, "kept": ["clip/summary", "clip/spatial", ...] (heads that came over), "new": [...]
        (heads as built), "dropped": [teachers of the trained student this one lacks]}``.

    Raises:
        RadioDistillError: another student, or backbone weights that do not fit (named).
    """
    config_file, weights_file = init_source(path)
    config = json.loads(config_file.read_text())
    if config.get("student") != model.name:
        raise RadioDistillError(f"--init {path} holds a '{config.get('student')}' student, this run trains "
                                f"'{model.name}'; give the same --student, or none to train the init's")
    old_teachers = as_teacher_dims(config["teachers"])
    saved = load_file(weights_file)
    state = model.state_dict()

    # 1. the backbone, whole (prefix tokens by teacher)
    mine = {k for k in state if k.startswith("backbone.") and k != FRESH}
    theirs = {k for k in saved if k.startswith("backbone.") and k != FRESH}
    if mine != theirs:
        diff = sorted(mine ^ theirs)
        raise RadioDistillError(f"--init {path}: its backbone does not fit this '{model.name}' "
                                f"({', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''} in one only); "
                                "give the student overrides it was trained with")
    rows = _prefix_rows(model, old_teachers, saved)
    for key in sorted(mine):
        value = saved[key]
        if key in rows:
            value = _map_rows(state[key], value, rows[key])
        if value.shape != state[key].shape:
            raise RadioDistillError(f"--init {path}: {key} is {tuple(value.shape)} there, {tuple(state[key].shape)} "
                                    "here; give the student overrides it was trained with")
        state[key] = value

    # 2. heads: each head of a teacher both students have, where its tensors fit
    kept = []
    for teacher in model.teachers:
        for kind in ("summary", "spatial"):
            prefix = f"{kind}_heads.{teacher}."
            keys = {k for k in state if k.startswith(prefix)}
            if keys and keys == {k for k in saved if k.startswith(prefix)} \
                    and all(saved[k].shape == state[k].shape for k in keys):
                state.update({k: saved[k] for k in keys})
                kept.append(f"{teacher}/{kind}")
    model.load_state_dict(state, strict=True)
    return {"from": str(path), "kept": kept,
            "new": [f"{t}/{kind}" for t in model.teachers for kind, heads in
                    (("summary", model.summary_heads), ("spatial", model.spatial_heads))
                    if t in heads and f"{t}/{kind}" not in kept],
            "dropped": [t for t in old_teachers if t not in model.teachers]}


def init_line(report: dict) -> str:
    """One line saying what ``init_student`` took: '--init RUN: backbone, heads a/summary, ...; new heads: ...'."""
    line = f"--init {report['from']}: backbone, heads {', '.join(report['kept']) or '(none)'}"
    line += f"; new heads: {', '.join(report['new'])}" if report["new"] else "; no new heads"
    return line + (f"; dropped teachers: {', '.join(report['dropped'])}" if report["dropped"] else "")


def _prefix_rows(model: Student, old_teachers: dict, saved: dict) -> dict[str, list[int | None]]:
    """For a ViT: {key: for each new prefix row, the saved row it takes, or None (keep the fresh one)}."""
    if not isinstance(model.backbone, TimmViT):
        return {}
    vit = model.backbone.model
    new_summary = [t for t, d in model.teachers.items() if d.summary_dim is not None]
    old_summary = [t for t, d in old_teachers.items() if d.summary_dim is not None]
    old_prefix = saved["backbone.model.reg_token"].shape[1]
    new_registers, old_registers = vit.num_reg_tokens - len(new_summary), old_prefix - len(old_summary)
    rows = [old_summary.index(t) if t in old_summary else None for t in new_summary]
    rows += [len(old_summary) + j if j < old_registers else None for j in range(new_registers)]
    out = {"backbone.model.reg_token": rows}
    if not vit.no_embed_class:  # the position table has a row per prefix token before the patches'
        patches = vit.pos_embed.shape[1] - vit.num_prefix_tokens
        out["backbone.model.pos_embed"] = rows + [old_prefix + n for n in range(patches)]
    return out


def _map_rows(fresh: torch.Tensor, saved: torch.Tensor, rows: list[int | None]) -> torch.Tensor:
    """(1, P', D) from the saved (1, P, D): row i is saved row rows[i], or the fresh one where None."""
    if any(r is not None and r >= saved.shape[1] for r in rows) or fresh.shape[2:] != saved.shape[2:]:
        return saved  # does not fit: the caller names the shapes
    out = fresh.clone()
    for i, r in enumerate(rows):
        if r is not None:
            out[:, i] = saved[:, r].to(out.device)
    return out
