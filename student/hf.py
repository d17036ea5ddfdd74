"""A student as a Hugging Face folder: ``AutoModel.from_pretrained(folder, trust_remote_code=True)``.

The folder holds ``config.json`` (with ``auto_map``), ``model.safetensors`` (the student's own weights,
same names) and ``modeling_radio_student.py``: ``_hf_modeling.py`` of this package with E-RADIO's and
the adaptor head's code copied in, so it imports torch, timm and transformers only. The config also
carries what ``save_student`` writes, so ``load_student`` and ``radio-train --init`` read the folder too.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import RadioDistillError
from .backbones import TimmMap, TimmViT
from .eradio import ERadio
from .export import WEIGHTS, load_student, student_config, timm_kwargs
from .model import Student
from .radio import FEATURE_FMTS, RadioStudent

MODELING = "modeling_radio_student.py"
MODEL_TYPE = "radio_distill_student"
_TEMPLATE = Path(__file__).with_name("_hf_modeling.py")
_BEGIN, _END = "# <inline>", "# </inline>"


def export_hf(run: str | Path, folder: str | Path, *, feature_fmt: str = "NLC") -> dict:
    """Writes the Hugging Face folder of a student.

    Args:
        run: a run folder or saved student folder.
        folder: created if missing; its config, weights and modeling file are replaced.
        feature_fmt: the default layout of the spatial features, 'NLC' (RADIO's) or 'NCHW'.

    Returns:
        the config written to ``config.json``.
    """
    if feature_fmt not in FEATURE_FMTS:
        raise RadioDistillError(f"--feature-fmt {feature_fmt!r}: choose from {', '.join(FEATURE_FMTS)}")
    model = load_student(run)
    radio = RadioStudent(model)
    first = next(iter(model.spatial_heads.values()), None)
    config = {
        **student_config(model),
        "model_type": MODEL_TYPE,
        "architectures": ["RadioStudentModel"],
        "auto_map": {"AutoConfig": f"{MODELING[:-3]}.RadioStudentConfig",
                     "AutoModel": f"{MODELING[:-3]}.RadioStudentModel"},
        "backbone": backbone_spec(model),
        "heads": {t: {"summary": _dims(model.summary_heads[t]) if t in model.summary_heads else None,
                      "spatial": _dims(model.spatial_heads[t]), "upsample": d.upsample} for t, d in model.teachers.items()},
        "head_blocks": len(first.blocks) if first is not None else 1,
        "head_pre_norm": not isinstance(first.pre_norm, torch.nn.Identity) if first is not None else True,
        "patch_size": radio.patch_size,
        "min_resolution_step": radio.min_resolution_step,
        "preferred_resolution": radio.preferred_resolution.height,
        "feature_fmt": feature_fmt,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / MODELING).write_text(modeling_source())
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def backbone_spec(model: Student) -> dict:
    """How the modeling file rebuilds ``model.backbone`` with timm or the inlined E-RADIO."""
    backbone = model.backbone
    if isinstance(backbone, ERadio):
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.cfg.__dict__.items()}
        return {"kind": "eradio", "cfg": cfg, "deployed": model.deployed}
    if isinstance(backbone, TimmViT):
        if backbone.conv_stem:
            raise RadioDistillError(f"student '{model.name}' has a conv stem, which the Hugging Face modeling file "
                                    "(plain timm) cannot build; export it to ONNX, or load it with torch.hub")
        return {"kind": "timm_vit", "model": backbone.timm_name, "kwargs": timm_kwargs(model),
                "num_summary": backbone.num_summary, "input_stride": backbone.input_stride,
                "cpe": hasattr(backbone, "cpe_state")}
    if isinstance(backbone, TimmMap):
        return {"kind": "timm_map", "model": backbone.timm_name, "kwargs": timm_kwargs(model),
                "dropped": backbone.dropped, "nhwc": backbone.nhwc}
    raise RadioDistillError(f"student '{model.name}': its backbone {type(backbone).__name__} has no Hugging Face "
                            "export; timm ViTs, timm feature-map models and E-RADIO do")


def _dims(head) -> list[int]:
    """[in, hidden, out] of an MLP2 head."""
    return [head.fc1.in_features, head.fc1.out_features, head.final[-1].out_features]


def modeling_source() -> str:
    """The modeling file: the template with its ``<inline>`` block replaced by the source of what it imports."""
    template = _TEMPLATE.read_text()
    head, rest = template.split(_BEGIN, 1)
    block, tail = rest.split(_END, 1)
    constants, code = [], []
    for node in ast.parse(block.split("\n", 1)[1]).body:  # the block's import statements
        module = importlib.import_module(f".{node.module}", __package__)
        for alias in node.names:
            obj = getattr(module, alias.name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                code.append(inspect.getsource(obj))
            else:
                constants.append(f"{alias.name} = {obj!r}\n")
    note = "# copied from radio_distill.student (eradio.py, model.py) by radio_distill.student.hf\n"
    return head + note + "".join(constants) + "\n\n" + "\n\n".join(code) + tail.split("\n", 1)[1]
