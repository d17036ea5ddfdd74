"""`radio-cache text`: run a CLIP teacher's text tower once and store class embeddings for zero-shot.

The teacher is rebuilt from the identity recorded in the store (family, model, weights, resolution,
preset...), so the text tower is the one whose image tower made the cached summaries. Each class
embedding is the normalised mean of its normalised prompt embeddings (CLIP's prompt ensembling).
`radio-eval` then scores zero-shot classification without loading any teacher.

Letters: M classes, P templates, D the CLIP embedding width.
"""

from __future__ import annotations

import re
import string
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import RadioDistillError, TeacherSpecError
from ..ops import autocast, check_device
from ..store import layout as L
from ..store.group import open_store, teacher_names, write_whole
from ..store.location import location

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a cropped photo of a {}.",
)


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty, non-comment (#) lines of a text file, stripped."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as e:
        raise RadioDistillError(f"{what} file '{path}': {e.strerror or e}") from None
    out = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not out:
        raise RadioDistillError(f"{what} file '{path}' holds no lines")
    return out


def _check_template(template: str) -> None:
    """One line unless `template` holds one `{}` and no other field ('{} {}' and '{x}' fail in str.format)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:  # a single '{' or '}'
        names = None
    if names != [""]:
        raise RadioDistillError(f"template {template!r}: expected one '{{}}' for the class name and no other field "
                                "(a brace itself is '{{' or '}}'), e.g. 'a photo of a {}.'")


def spec_from_identity(name: str, ident: dict, *, weights: str | Path | None = None, recorded: str | None = None):
    """The `TeacherSpec` that rebuilds a stored teacher; a weight file recorded by name + sha256 is
    located with `weights` and checked against the sha256. Without `weights` it is looked for where the
    build found it (`recorded`, the store's `weight_files` entry) and, for the toy preset, in
    `cache/toy/`, and used when its sha256 is still the recorded one."""
    from .teachers import TeacherSpec, locate_weights, sha256_file

    known = {f.name for f in fields(TeacherSpec)} - {"name", "family", "model_kwargs", "sam_spatial"}
    kwargs = {k: v for k, v in ident.items() if k in known}
    kwargs["model_kwargs"] = tuple((ident.get("model_kwargs") or {}).items())
    if "spatial" in ident:
        kwargs["sam_spatial"] = ident["spatial"]
    if ident.get("sha256") and weights is None:
        found, tried = locate_weights(ident, recorded)  # checked by sha256 there
        if found is None:
            looked = f"; not at {', '.join(tried)}" if tried else ""
            raise TeacherSpecError(f"teacher '{name}' was built from weight file '{ident['weights']}' "
                                   f"(sha256 {ident['sha256'][:12]}...){looked}; pass --weights PATH to that file")
        kwargs["weights"] = str(found)
    elif ident.get("sha256"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TeacherSpecError(f"teacher '{name}': --weights '{weights}' is not a file")
        digest = sha256_file(path)
        if digest != ident["sha256"]:
            raise TeacherSpecError(f"teacher '{name}': --weights '{weights}' has sha256 {digest[:12]}..., "
                                   f"the store was built from '{ident['weights']}' with sha256 {ident['sha256'][:12]}...")
        kwargs["weights"] = str(path)
    elif weights is not None:
        raise TeacherSpecError(f"teacher '{name}' uses weights {ident.get('weights')!r}, not a file; "
                               "drop --weights")
    return TeacherSpec(name=name, family=ident["family"], **kwargs)


def class_embeddings(model, tokenizer, classes: list[str], templates: list[str] | tuple[str, ...], *,
                     device: torch.device, batch_size: int = 256) -> np.ndarray:
    """(M, D) float32 unit class embeddings of an open_clip model: the normalised mean of each class's
    normalised prompt embeddings (`_` in a class name reads as a space)."""
    prompts = [t.format(c.replace("_", " ")) for c in classes for t in templates]  # (M * P,)
    chunks = []
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size]).to(device)
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(chunks).reshape(len(classes), len(templates), -1)  # (M, P, D)
    return F.normalize(per_prompt.mean(1), dim=-1).cpu().numpy().astype(np.float32)  # (M, D)


def write_text_embeddings(store: str | Path, *, teacher: str = "clip", classes: list[str] | None = None,
                          templates: list[str] | None = None, weights: str | Path | None = None,
                          device: str | None = None, batch_size: int = 256) -> dict:
    """Embed every class prompt with the CLIP teacher's text tower and store (M, D) unit vectors.

    Args:
        store: a store made by `radio-cache build`.
        teacher: name of a CLIP-family teacher in the store.
        classes: class names in label order (default: the store's classes); `_` reads as a space.
        templates: prompts holding `{}` (default: `DEFAULT_TEMPLATES`).
        weights: local weight file, when the teacher was built from one (checked by sha256); default the
            file where the build found it (or the toy preset's in `cache/toy/`), if unchanged.
        device: default cuda when available, else cpu.
        batch_size: prompts per text-tower forward.

    Returns:
        {'store', 'teacher', 'array', 'classes', 'templates', 'dim'}.
    """
    import open_clip

    from .teachers import build_teacher

    check_device(device)
    templates = list(templates or DEFAULT_TEMPLATES)
    for template in templates:
        _check_template(template)
    path = location(store)
    root = open_store(path, mode="r+")
    names = teacher_names(root)
    if teacher not in names:
        raise TeacherSpecError(f"store '{path}' has no teacher '{teacher}'; it has {', '.join(names)}")
    ident = root[L.teacher_group(teacher)].attrs["identity"]
    if ident["family"] != "clip":
        clips = [n for n in names if root[L.teacher_group(n)].attrs["identity"]["family"] == "clip"]
        raise TeacherSpecError(f"teacher '{teacher}' is a {ident['family']} teacher without a text tower; "
                               f"CLIP teachers in the store: {', '.join(clips) or 'none'}")
    store_classes = list(root.attrs["dataset"]["classes"])
    if classes is None:
        if not store_classes:
            raise RadioDistillError(f"store '{path}' is unlabelled (no classes); pass --classes FILE")
        if all(re.fullmatch(r"n\d{8}", c) for c in store_classes):  # ImageNet folders are WordNet ids
            raise RadioDistillError(f"store '{path}' names its classes by WordNet id ({store_classes[0]}, ...): "
                                    "prompts need words; pass --classes FILE with one name per class")
        if all(c.isdigit() for c in store_classes):  # integer labels (tar cls, Parquet, a list of numbers)
            raise RadioDistillError(f"store '{path}' names its classes by number (0, 1, ...): prompts need words; "
                                    "pass --classes FILE with one name per class, in label order")
        classes = store_classes
    elif store_classes and len(classes) != len(store_classes):
        raise RadioDistillError(f"{len(classes)} class names given, the store has {len(store_classes)} classes "
                                f"({', '.join(store_classes[:5])}...); give one name per class, in label order")

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recorded = (root.attrs.get("weight_files") or {}).get(teacher)
    model = build_teacher(spec_from_identity(teacher, ident, weights=weights, recorded=recorded), device=device).model
    embeddings = class_embeddings(model, open_clip.get_tokenizer(ident["model"]), classes, templates,
                                  device=device, batch_size=batch_size)

    group = root.require_group(L.text_group(teacher))
    write_whole(root, L.text_array(teacher), embeddings, overwrite=True)
    group.attrs.update({"classes": list(classes), "templates": templates, "identity": ident,
                        "created_by": f"radio-distill {__version__}"})
    return {"store": str(path), "teacher": teacher, "array": L.text_array(teacher), "classes": len(classes),
            "templates": len(templates), "dim": int(embeddings.shape[1])}
