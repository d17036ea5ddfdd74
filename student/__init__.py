"""Students: timm backbones, E-RADIO or ViTDet, with summary tokens and per-teacher adaptor heads."""

from . import eradio as _eradio  # noqa: F401  (registers the E-RADIO sizes)
from . import vit_convstem as _vit_convstem  # noqa: F401  (registers the conv-stem ViTs with timm)
from . import vitdet as _vitdet  # noqa: F401  (registers the ViTDet sizes)
from ._registry import check_student_name, create_student, list_students, register_student
from .export import export_timm, load_student, save_student
from .hf import export_hf
from .model import StudentOutput, TeacherDims
from .onnx import export_onnx
from .radio import RadioStudent

__all__ = ["check_student_name", "create_student", "list_students", "register_student", "TeacherDims",
           "StudentOutput", "save_student", "load_student", "export_timm", "export_onnx", "export_hf", "RadioStudent"]
