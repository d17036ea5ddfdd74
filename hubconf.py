"""torch.hub entry point: a trained student behind RADIO's interface, from a clone of this repository.

    model = torch.hub.load("path/to/radio-distill", "student", source="local", run="runs/vit_b")
    out = model(x)   # x: (B, 3, H, W) in [0, 1]; out["clip"].summary, out["clip"].features, out["backbone"]

The clone's folder is the `radio_distill` package itself; it is imported from here unless a
`radio_distill` is imported already (then that one serves). Nothing is downloaded: the weights are the run's.
"""

import importlib.util
import sys
from pathlib import Path

dependencies = ["torch", "timm", "safetensors"]


def _package():
    """radio_distill: the one already imported, else this clone's."""
    if "radio_distill" not in sys.modules:
        root = Path(__file__).resolve().parent
        spec = importlib.util.spec_from_file_location("radio_distill", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["radio_distill"] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules["radio_distill"]
            raise
    return sys.modules["radio_distill"]


def student(run, *, device="cpu", feature_fmt="NLC"):
    """A trained student behind RADIO's interface (``RadioStudent``), in eval mode.

    Args:
        run: a `radio-train` run folder, a saved student folder or a `radio-export --format hf` folder.
        device: where the model goes.
        feature_fmt: the default layout of the spatial features, 'NLC' (RADIO's) or 'NCHW'.

    Returns:
        the model: ``model(x)`` with pixels ``x`` (B, 3, H, W) in [0, 1] gives ``{'backbone' | teacher:
        (summary, features)}``; ``patch_size``, ``min_resolution_step``, ``preferred_resolution``,
        ``get_nearest_supported_resolution``, ``make_preprocessor_external`` as in RADIO.
    """
    _package()
    from radio_distill.student import load_student
    from radio_distill.student.radio import FEATURE_FMTS

    if feature_fmt not in FEATURE_FMTS:
        raise ValueError(f"feature_fmt {feature_fmt!r}: choose from {', '.join(FEATURE_FMTS)}")
    model = load_student(run, device=device, radio=True)
    model.feature_fmt = feature_fmt
    return model
