"""ViTDet students: a plain ViT whose blocks attend inside windows, with a few global blocks (arXiv 2203.16527).

Built entirely from timm: its ``VisionTransformerSAM`` (SAM's image encoder, which is ViTDet's backbone)
through the ``samvit_base_patch16`` entry point with every size keyword given, run as a feature-map
student (``TimmMap``): the summary is the mean of the map, shared by all summary teachers.

Shapes: B batch, H, W input pixels, h, w = H / 16, W / 16 the patch grid, D width.

Layout: patch embedding (16 px) + a learned absolute position grid of an ``img_size`` image (resized to
the input grid, as timm's ViTs do) -> ``depth`` pre-norm blocks on (B, h, w, D); blocks not in
``global_attn_indexes`` attend inside ``window_size`` x ``window_size`` token windows, the others over the
whole grid -> a channel LayerNorm -> (B, D, h, w).

No relative position bias (``use_rel_pos=False``), as in RADIO's ViTDet mode: positions come from the
absolute grid alone. SAM's decomposed bias (``use_rel_pos=True`` as an override) cost more than the
windows saved in a CPU measurement at 1024 px (BENCHMARKS §6).

Input sides: any multiple of 16. A grid side that is not a multiple of the window is zero-padded to
whole windows inside each windowed block, as ViTDet and SAM do (padded tokens are attended to, not
masked, and dropped after the block). With windows of 16 tokens, sides that are multiples of 256 px
(512, 768, 1024...) need no padding; 224 pads its 14x14 grid to one 16x16 window.
"""

from __future__ import annotations

from ..errors import RadioDistillError
from ._registry import register_student
from .backbones import TimmMap
from .model import Student, TeacherDims, make_student

TIMM_MODEL = "samvit_base_patch16"  # timm's ViTDet / SAM encoder; the keywords below replace its SAM-B sizes
# window 16 (not SAM's 14): a 1024 px image's 64x64 grid is 4x4 whole windows; neck_chans=0: no SAM neck,
# the map keeps width D under a LayerNorm as a ViT's final norm
COMMON = dict(patch_size=16, window_size=16, img_size=1024, use_rel_pos=False, neck_chans=0)
EVERY_THIRD = (2, 5, 8, 11)  # ViTDet-B's and SAM-B's global blocks in 12


def _vitdet(label: str, size: dict, teachers: dict[str, TeacherDims], **overrides) -> Student:
    """A ViTDet student of ``size`` (timm keywords) with ``overrides`` (timm keywords, head options) on top."""
    kwargs = {**COMMON, **size, **overrides}
    depth, blocks, window = kwargs["depth"], kwargs["global_attn_indexes"], kwargs["window_size"]
    if kwargs.pop("pretrained", False):
        raise RadioDistillError(f"student '{label}' has no pretrained weights (its sizes are not SAM's); "
                                "train it from a cache, or start from a run with --init")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise RadioDistillError(f"student override window_size={window!r}: must be a whole number of tokens >= 1")
    if not isinstance(blocks, (list, tuple)):
        raise RadioDistillError(f"student override global_attn_indexes={blocks!r}: must be a list of block indexes")
    bad = [i for i in blocks if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if bad:
        raise RadioDistillError(f"student override global_attn_indexes: {bad[0]!r} is not a block of '{label}' "
                                f"(0 to {depth - 1})")
    return make_student(TimmMap, teachers, name=TIMM_MODEL, label=label, **kwargs)


@register_student
def test_vitdet(*, teachers: dict[str, TeacherDims], **overrides) -> Student:
    """Tiny ViTDet for CPU tests: 4 blocks, 2 and 4 global, windows of 2x2 tokens (32 px)."""
    size = dict(embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(1, 3), window_size=2, img_size=128)
    return _vitdet("test_vitdet", size, teachers, **overrides)


@register_student
def vitdet_tiny(*, teachers: dict[str, TeacherDims], **overrides) -> Student:
    """ViT-Ti/16 widths (192, 12 blocks, 3 heads); blocks 3, 6, 9 and 12 global."""
    size = dict(embed_dim=192, depth=12, num_heads=3, global_attn_indexes=EVERY_THIRD)
    return _vitdet("vitdet_tiny", size, teachers, **overrides)


@register_student
def vitdet_small(*, teachers: dict[str, TeacherDims], **overrides) -> Student:
    """ViT-S/16 widths (384, 12 blocks, 6 heads); blocks 3, 6, 9 and 12 global."""
    size = dict(embed_dim=384, depth=12, num_heads=6, global_attn_indexes=EVERY_THIRD)
    return _vitdet("vitdet_small", size, teachers, **overrides)


@register_student
def vitdet_base(*, teachers: dict[str, TeacherDims], **overrides) -> Student:
    """ViT-B/16 widths (768, 12 blocks, 12 heads); blocks 3, 6, 9 and 12 global, as ViTDet-B."""
    size = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=EVERY_THIRD)
    return _vitdet("vitdet_base", size, teachers, **overrides)
