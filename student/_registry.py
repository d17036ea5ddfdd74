"""Student names: our registered builders first, then any timm model name."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

import timm

from ..errors import UnknownStudentError
from .backbones import build_timm_student
from .model import Student, TeacherDims, as_teacher_dims

_STUDENTS: dict[str, Callable[..., Student]] = {}


def register_student(fn: Callable[..., Student]) -> Callable[..., Student]:
    """Registers ``fn(*, teachers, **overrides) -> Student`` under its function name."""
    if fn.__name__ in _STUDENTS:
        raise ValueError(f"student {fn.__name__!r} is already registered")
    _STUDENTS[fn.__name__] = fn
    return fn


def list_students(pattern: str = "*") -> list[str]:
    """Names registered here (not timm's; see ``timm.list_models``) matching a glob pattern."""
    return sorted(n for n in _STUDENTS if fnmatch.fnmatchcase(n, pattern))


def check_student_name(name: str) -> None:
    """Raises UnknownStudentError, with the closest names, unless ``name`` is registered here or in timm."""
    if name in _STUDENTS or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, list_students() + timm.list_models(), n=3)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    raise UnknownStudentError(f"unknown student {name!r}; {hint}see radio_distill.student.list_students() "
                              f"and timm.list_models('{name.split('_')[0]}*')")


def create_student(name: str, *, teachers: dict[str, TeacherDims], **overrides) -> Student:
    """Builds a student by name: a registered builder, else a timm backbone.

    Args:
        name: a ``list_students()`` name or a ``timm.list_models()`` name.
        teachers: ``{teacher_name: TeacherDims}``; plain ``{'summary_dim', 'spatial_dim'}``
            dicts are accepted too.
        **overrides: builder keywords (head options, ``num_registers``, ``pretrained``...).

    Returns:
        the ``Student``, with ``name`` and ``overrides`` recorded for export.

    Raises:
        UnknownStudentError: ``name`` is in neither registry.
    """
    teachers = as_teacher_dims(teachers)
    check_student_name(name)
    if name in _STUDENTS:
        model = _STUDENTS[name](teachers=teachers, **overrides)
    else:
        model = build_timm_student(name, teachers=teachers, **overrides)
    model.name, model.overrides = name, dict(overrides)
    return model
