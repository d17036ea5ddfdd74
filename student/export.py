"""Save / load a student as ``model.safetensors`` + ``config.json`` (no pickle anywhere).

The config names the student and its overrides, so ``load_student`` rebuilds it with
``create_student`` alone: nothing of the training code or the cache is needed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from timm.models import VisionTransformerSAM

from ..errors import RadioDistillError
from ._registry import create_student
from .backbones import TimmMap, TimmViT
from .model import Student
from .radio import RadioStudent

FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_student(model: Student, directory: str | Path) -> Path:
    """Writes the weights and the config that rebuilds ``model``.

    Args:
        model: a student made by ``create_student``.
        directory: created if missing; existing files are overwritten.

    Returns:
        the directory.

    Raises:
        OSError: a file cannot be written; the files there before are left as they were.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = student_config(model)
    try:
        text = json.dumps(config, indent=2)
    except TypeError as e:
        raise ValueError(f"student overrides {model.overrides!r} are not JSON data: {e}") from e
    # copies, so tied / viewed tensors never share storage (safetensors refuses that)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    # written beside and renamed over the files, so a failed save (a full disk) leaves no half file
    tmp_weights, tmp_config = directory / f".{WEIGHTS}.tmp", directory / f".{CONFIG}.tmp"
    try:
        save_file(state, tmp_weights, metadata={"format_version": str(FORMAT_VERSION)})
        tmp_config.write_text(text + "\n")
    except OSError:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
        raise
    tmp_weights.replace(directory / WEIGHTS)
    tmp_config.replace(directory / CONFIG)
    return directory


def student_config(model: Student) -> dict:
    """What ``load_student`` rebuilds ``model`` from (``config.json``)."""
    return {
        "format_version": FORMAT_VERSION,
        "student": model.name,
        "overrides": model.overrides,
        "teachers": {t: asdict(d) for t, d in model.teachers.items()},
        "deployed": model.deployed,
        "mean": list(model.mean),
        "std": list(model.std),
        "input_stride": model.input_stride,
        "feature_info": model.feature_info,
        "preferred_resolution": model.preferred_resolution,
    }


def student_dir(path: str | Path) -> Path:
    """The saved student of ``path``: a run folder (its ``student/``) or the student folder itself."""
    path = Path(path)
    if not (path / CONFIG).is_file() and (path / "student" / CONFIG).is_file():
        path = path / "student"
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise RadioDistillError(f"{path} is neither a run folder nor a saved student; it needs {CONFIG} and {WEIGHTS}")
    return path


def load_student(directory: str | Path, *, device: str | torch.device = "cpu",
                 radio: bool = False) -> Student | RadioStudent:
    """Rebuilds a saved student, loads its weights strictly and returns it in eval mode.

    Args:
        directory: a run folder of `radio-train`, or the folder written by ``save_student``.
        device: where the model goes.
        radio: return it behind RADIO's interface (``RadioStudent``: pixels in [0, 1], a dict of
            ``(summary, features)``), not as the bare ``Student`` (normalised pixels, ``StudentOutput``).

    Returns:
        the ``Student`` (calling it gives the backbone's and every adaptor's outputs), or with ``radio``
        the ``RadioStudent`` around it.
    """
    directory = student_dir(directory)
    config = json.loads((directory / CONFIG).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise RadioDistillError(
            f"{directory} is student format v{config.get('format_version')}, this version reads "
            f"v{FORMAT_VERSION}; re-export it with save_student")
    overrides = {**config["overrides"], "pretrained": False} if "pretrained" in config["overrides"] \
        else config["overrides"]  # the weights come from the file, never a download
    model = create_student(config["student"], teachers=config["teachers"], **overrides)
    model.overrides = config["overrides"]
    if config.get("deployed"):
        model.switch_to_deploy()
    model.load_state_dict(load_file(directory / WEIGHTS), strict=True)
    model.preferred_resolution = config.get("preferred_resolution")
    model = model.to(device).eval()
    return RadioStudent(model).to(device).eval() if radio else model


def export_timm(run: str | Path, file: str | Path) -> dict:
    """Writes a ViT or ViTDet student's backbone as a plain timm checkpoint (safetensors).

    Plain timm then loads it with no code of this package::

        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=FILE), **kwargs)

    and its ``forward_features`` gives what the student backbone computes: for a ViT the tokens
    (B, P + h * w, D), P prefix tokens (one summary token per summary teacher, then registers) before
    the patch tokens; for a ViTDet student (timm's ``VisionTransformerSAM``) the map (B, D, h, w),
    whose mean is the student's summary.

    Args:
        run: a run folder or saved student folder of a timm ViT or ViTDet student.
        file: the ``.safetensors`` file to write.

    Returns:
        ``{"model": name, "kwargs": {...}}``: the timm name and the ``create_model`` keywords.
    """
    model = load_student(run)
    backbone = model.backbone
    if not (isinstance(backbone, TimmViT) or isinstance(getattr(backbone, "model", None), VisionTransformerSAM)):
        raise RadioDistillError(f"{run}: student '{model.name}' is not a timm ViT; only ViT and ViTDet students "
                                "export to timm")
    if getattr(backbone, "conv_stem", False):
        raise RadioDistillError(f"{run}: student '{model.name}' has a conv stem, which plain timm cannot build; "
                                "export it to ONNX, or load it with load_student / torch.hub")
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(state, Path(file))
    return {"model": backbone.timm_name, "kwargs": timm_kwargs(model)}


NOT_TIMM = {"num_registers", "pretrained", "head_hidden", "head_blocks", "head_pre_norm"}  # student-only overrides


def timm_kwargs(model: Student) -> dict:
    """The ``timm.create_model`` keywords that rebuild a timm student's backbone (its ``backbone.model``)
    as it computes in eval mode."""
    if isinstance(model.backbone, TimmMap):  # it keeps what it was created with (a ViTDet size's keywords too)
        return dict(model.backbone.timm_kwargs)
    kwargs = {k: v for k, v in model.overrides.items() if k not in NOT_TIMM}
    kwargs.update(num_classes=0, global_pool="")
    if isinstance(model.backbone, TimmViT):
        cpe_size = kwargs.pop("cpe_size", None)
        if cpe_size is not None:  # CPE at evaluation is timm's own grid resize of a class-free table
            kwargs.update(img_size=cpe_size, no_embed_class=True)
        kwargs.update(class_token=False, reg_tokens=model.backbone.model.num_reg_tokens, dynamic_img_size=True)
    return kwargs
