"""Evaluation of a trained student against its teachers, from the store alone (no teacher is loaded)."""

from .config import EvalConfig
from .report import evaluate

__all__ = ["EvalConfig", "evaluate"]
