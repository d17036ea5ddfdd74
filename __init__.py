"""radio-distill: AM-RADIO style multi-teacher distillation from a cached Zarr store.

The public surface, imported on first use so that `import radio_distill` loads no teacher library:
`build_cache` + `CacheConfig` (radio-cache build), `train` + `TrainConfig` (radio-train),
`create_student` / `load_student`, and `evaluate` + `EvalConfig` (radio-eval).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "build_cache": "cache.build", "CacheConfig": "cache.build",
    "train": "train.loop", "TrainConfig": "train.config",
    "create_student": "student", "load_student": "student",
    "evaluate": "evaluate", "EvalConfig": "evaluate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'radio_distill' has no attribute '{name}'")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
