"""A student as ONNX: one graph per input side, the batch dynamic, RADIO's interface flattened.

Each graph takes ``pixels`` (B, 3, S, S), float32 in [0, 1] (the normalisation is inside), and returns
``backbone.summary`` (B, S' * D), ``backbone.features``, then per teacher ``<teacher>.summary`` (B, Dt)
(teachers with a summary target only) and ``<teacher>.features``: (B, N, C) with feature_fmt 'NLC',
(B, C, h, w) with 'NCHW'. ``onnx.json`` beside the graphs lists the sides, files, inputs and outputs.

One graph per side, not one with dynamic height and width: the sides fix the ViT position-embedding
resampling and the window partitions (E-RADIO, ViTDet) to constants, which is also what TensorRT wants.
Letters: B batch, S side, D backbone width, S' summary tokens, N = h * w.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from timm.models.vision_transformer_sam import Attention as SamAttention
from torch import Tensor, nn

from ..errors import RadioDistillError
from .export import load_student
from .radio import FEATURE_FMTS, RadioStudent

INPUT = "pixels"
MANIFEST = "onnx.json"
OPSET = 18  # LayerNormalization (17) and the opset the torch.export-based exporter writes natively
_EXTERNAL_BYTES = 1 << 30  # above this the weights go to a `.onnx.data` file beside each graph (protobuf: 2 GB)


class _Flat(nn.Module):
    """RadioStudent's dict as a tuple of tensors, in the order of ``names``."""

    def __init__(self, model: RadioStudent, fmt: str):
        super().__init__()
        self.model, self.fmt = model, fmt
        self.keys = [(name, part) for name in ["backbone"] + model.adaptor_names for part in ("summary", "features")
                     if not (part == "summary" and name != "backbone"
                             and model.student.teachers[name].summary_dim is None)]
        self.names = [f"{name}.{part}" for name, part in self.keys]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.model(x, feature_fmt=self.fmt)
        return tuple(getattr(out[name], part) for name, part in self.keys)


def export_onnx(run: str | Path, folder: str | Path, *, sides: tuple[int, ...] | None = None,
                feature_fmt: str = "NLC", opset: int = OPSET) -> dict:
    """Writes ``student_<side>.onnx`` for each side and ``onnx.json`` into ``folder``.

    Args:
        run: a run folder or saved student folder.
        folder: created if missing; graphs there of the same names are replaced.
        sides: square input sides, each a multiple of the student's ``min_resolution_step``;
            default: its preferred resolution (the side it was trained at).
        feature_fmt: layout of the spatial outputs, 'NLC' or 'NCHW'.
        opset: the ONNX opset (default 18).

    Returns:
        the manifest written to ``onnx.json``.
    """
    try:
        import onnx  # noqa: F401  (torch's exporter needs both; said here in one line, not deep inside it)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise RadioDistillError(f"ONNX export needs onnx and onnxscript ({e.name} is missing): "
                                "pip install 'radio-distill[export]'") from None
    model = load_student(run, radio=True)
    if feature_fmt not in FEATURE_FMTS:
        raise RadioDistillError(f"--feature-fmt {feature_fmt!r}: choose from {', '.join(FEATURE_FMTS)}")
    step = model.min_resolution_step
    sides = tuple(sides or (model.preferred_resolution.height,))
    bad = [s for s in sides if s < step or s % step]
    if bad:
        raise RadioDistillError(f"--sides {bad[0]}: student '{model.student.name}' takes sides that are multiples "
                                f"of {step}, e.g. {model.get_nearest_supported_resolution(bad[0], bad[0]).height}")
    model.student.switch_to_deploy()  # BatchNorm folded into convolutions (E-RADIO): fewer nodes, same values
    for module in model.modules():
        if isinstance(module, SamAttention):  # ViTDet: onnxscript's SDPA takes 4-D q, k, v only, SAM's are 3-D
            module.fused_attn = False  # timm's explicit q k^T, softmax, v: the same values
    graph = _Flat(model, feature_fmt).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_BYTES
    files = {}
    for side in sides:
        x = torch.rand(2, 3, side, side)  # batch 2: torch.export specialises a dimension of size 1
        batch = torch.export.Dim("batch", min=1, max=4096)
        path = folder / f"student_{side}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            torch.onnx.export(graph, (x,), str(path), dynamo=True, input_names=[INPUT], output_names=graph.names,
                              dynamic_shapes=({0: batch},), opset_version=opset, external_data=external,
                              verbose=False)
        files[str(side)] = path.name
    student = model.student
    manifest = {
        "student": student.name,
        "input": {"name": INPUT, "shape": ["batch", 3, "side", "side"], "dtype": "float32", "range": [0, 1],
                  "normalised_inside": {"mean": list(student.mean), "std": list(student.std)}},
        "sides": files,
        "outputs": graph.names,
        "feature_fmt": feature_fmt,
        "opset": opset,
        "patch_size": model.patch_size,
        "min_resolution_step": model.min_resolution_step,
        "preferred_resolution": model.preferred_resolution.height,
        "teachers": {t: asdict(d) for t, d in student.teachers.items()},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
