"""radio-distill: AM-RADIO style multi-teacher distillation from a cached Zarr store.

The public surface, imported on first use so that `import radio_distill` loads no teacher library:
`build_cache` + `CacheConfig` (radio-cache build), `create_student` / `load_student`, and the
configs of `radio_distill.train.loop.train(TrainConfig)` and `radio_distill.evaluate.evaluate(EvalConfig)`
(the functions share their sub-package's name, so they are reached through it).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "build_cache": "cache.build", "CacheConfig": "cache.config",
    "TrainConfig": "train.config", "EvalConfig": "evaluate",
    "create_student": "student", "load_student": "student",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'radio_distill' has no attribute '{name}'")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
