"""The student as SAM's image encoder: a segment_anything `Sam` that `SamPredictor` uses unchanged.

The prompt encoder and mask decoder come from the SAM teacher's own checkpoint file (checked by
sha256 against the store's record); the image encoder is the student plus its adaptor for that
teacher, resized to SAM's embedding grid (none when its head draws that grid: `--upsample`). Only the
neck target (256 channels, the decoder's input) can feed the decoder; stores built with `--sam-spatial
preneck` are refused. SAM 2 (`sam2_predictor`) and SAM 3 (`sam3_model`) likewise, their decoders also
fed the student's maps of the s0, s1 levels; `PromptSide` puts their prompt side behind `Sam`'s interface
for the metric.

Letters: B batch, S SAM's input side (1024), R the student's side, C SAM's embedding channels,
g x g SAM's embedding grid (64 x 64 for the released models).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EvaluationError
from ..student import load_student
from ..student.model import Student
from .features import load_run


class StudentImageEncoder(nn.Module):
    """SAM-preprocessed pixels (B, 3, S, S) -> (B, C, g, g) from the student's adaptor for one teacher.

    SAM normalises 0-255 pixels by its own mean/std and zero-pads to S x S; this undoes that
    normalisation, applies the student's, resizes to the student's training side R (the view the
    SAM teacher saw at S, the student saw at R) and resizes the adaptor map to SAM's grid.
    """

    def __init__(self, student: Student, teacher: str, *, resolution: int, img_size: int, grid: tuple[int, int],
                 sam_mean: torch.Tensor, sam_std: torch.Tensor):
        super().__init__()
        self.student, self.teacher, self.resolution, self.grid = student, teacher, resolution, tuple(grid)
        self.img_size = img_size  # read by SamPredictor and Sam.preprocess
        self.register_buffer("sam_mean", sam_mean.view(1, 3, 1, 1).float(), persistent=False)
        self.register_buffer("sam_std", sam_std.view(1, 3, 1, 1).float(), persistent=False)
        self.register_buffer("mean", torch.tensor(student.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(student.std).view(1, 3, 1, 1) * 255, persistent=False)

    def adaptors(self, x: torch.Tensor) -> dict:
        """SAM-preprocessed pixels -> the student's output per teacher (adaptor maps at the student grid)."""
        x = (x * self.sam_std + self.sam_mean - self.mean) / self.std
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                          align_corners=False)
        return self.student(x).teachers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_sam_grid(self.adaptors(x)[self.teacher].spatial, self.grid)


class StudentLevels(StudentImageEncoder):
    """The FPN levels SAM 2's and SAM 3's decoders read, from the student's adaptors: SAM-normalised pixels
    (B, 3, S, S) -> [s0 (B, C0, 4g, 4g), s1 (B, C1, 2g, 2g), embedding (B, C, g, g)], as their image encoders
    hand them on: the embedding's teacher's map less the no-memory embedding (which the predictor adds back)
    and the s0, s1 teachers' maps, already as the decoder's conv_s0, conv_s1 make them (the drop-in turns those
    into identities). Levels a decoder does not read are zeros."""

    def __init__(self, student: Student, levels: tuple, *, grid: int, no_mem: torch.Tensor, **kwargs):
        super().__init__(student, levels[-1], grid=(grid, grid), **kwargs)
        self.levels = levels  # (s0 teacher | None, s1 teacher | None, embedding teacher)
        self.grids = ((4 * grid, 4 * grid), (2 * grid, 2 * grid), (grid, grid))
        self.register_buffer("no_mem", no_mem.detach().reshape(1, -1, 1, 1).clone(), persistent=False)

    def fpn(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.adaptors(x)
        maps = [x.new_zeros(len(x), 1, *grid) if t is None else to_sam_grid(out[t].spatial, grid)
                for t, grid in zip(self.levels, self.grids)]
        maps[-1] = maps[-1] - self.no_mem
        return maps


class StudentSam2Backbone(StudentLevels):
    """SAM 2's image encoder replaced by the student: the dict `SAM2Base.forward_image` reads."""

    def __init__(self, student: Student, levels: tuple, *, model, **kwargs):
        no_mem = model.no_mem_embed if model.directly_add_no_mem_embed else torch.zeros(1)
        super().__init__(student, levels, img_size=model.image_size, grid=model.image_size // model.backbone_stride,
                         no_mem=no_mem, **kwargs)
        self.position_encoding = model.image_encoder.neck.position_encoding

    def forward(self, x: torch.Tensor) -> dict:
        fpn = self.fpn(x)
        return {"vision_features": fpn[-1], "backbone_fpn": fpn,
                "vision_pos_enc": [self.position_encoding(f).to(f.dtype) for f in fpn]}


class StudentSam3Backbone(StudentLevels):
    """SAM 3's (transformers' `Sam3TrackerModel`) vision encoder replaced by the student: the output
    `get_image_features` reads."""

    def __init__(self, student: Student, levels: tuple, *, model, **kwargs):
        side = model.prompt_encoder.input_image_size
        super().__init__(student, levels, img_size=side, grid=model.prompt_encoder.image_embedding_size[0],
                         no_mem=model.no_memory_embedding, **kwargs)
        self.position_encoding = model.vision_encoder.neck.position_encoding

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        from transformers.models.sam3_tracker.modeling_sam3_tracker import Sam3TrackerVisionEncoderOutput

        fpn = self.fpn(pixel_values)
        return Sam3TrackerVisionEncoderOutput(
            fpn_hidden_states=tuple(fpn),
            fpn_position_encoding=tuple(self.position_encoding(f.shape, f.device, f.dtype) for f in fpn))


class PromptSideOnly(nn.Module):
    """Stands in for SAM's image encoder where only the prompt side runs (on cached or student
    embeddings): keeps `img_size`, which `Sam.postprocess_masks` reads, and refuses to encode."""

    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise EvaluationError("SAM's image encoder is not loaded here: decode cached or student embeddings")


class Sam3Prompts(nn.Module):
    """transformers' `Sam3TrackerPromptEncoder` behind segment_anything's `PromptEncoder` interface: P prompts
    of one image as its point batch, positional encoding from the model's `get_image_wide_positional_embeddings`."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.input_image_size = (model.prompt_encoder.input_image_size,) * 2
        self.image_embedding_size = tuple(model.prompt_encoder.image_embedding_size)

    def get_dense_pe(self) -> torch.Tensor:
        return self.model.get_image_wide_positional_embeddings()

    def forward(self, points, boxes=None, masks=None):
        """points: ((P, N, 2) x, y in the input frame, (P, N) labels) -> (1, P, N + 1, C), (1, C, g, g)."""
        coords, labels = points
        return self.model.prompt_encoder(input_points=coords[None], input_labels=labels[None], input_boxes=None,
                                         input_masks=None)


class PromptSide(nn.Module):
    """SAM 2's (Meta's `sam2`) or SAM 3's (transformers' `Sam3TrackerModel`) prompt encoder and mask decoder
    behind the part of segment_anything's `Sam` this module calls (`prompt_encoder`, `mask_decoder`,
    `postprocess_masks`, `mask_threshold`, `image_encoder.img_size`), so the metric runs on them unchanged.

    The decoder is called as `SAM2ImagePredictor._predict` and `Sam3TrackerModel.forward` call it, and masks
    are resized straight to the output size as both libraries' post-processing does (their input frame is the
    whole image, squashed, not padded). A decoder that reads the high-resolution levels s0, s1 beside the
    image embedding (the released SAM 2 and SAM 3 models all do) takes each image's three levels packed into
    one (C + 4 C1 + 16 C0, g, g) map (`pack`), so that every per-image loop here passes them along.
    `levels`: the store's teachers of s0 and s1 (None where they are not read).
    """

    mask_threshold = 0.0

    def __init__(self, model, levels: tuple[str, str] | None = None):
        super().__init__()
        self.model, self.sam3, self.levels = model, not hasattr(model, "sam_prompt_encoder"), levels
        self.prompt_encoder = Sam3Prompts(model) if self.sam3 else model.sam_prompt_encoder
        self.reads_high_res = self.sam3 or bool(model.use_high_res_features_in_sam)
        self.image_encoder = PromptSideOnly(self.prompt_encoder.input_image_size[0])
        self.dims = (model.hidden_dim, model.hidden_dim // 4, model.hidden_dim // 8)  # embedding, s1, s0 channels

    @staticmethod
    def pack(embedding: torch.Tensor, s1: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g), (B, C1, 2g, 2g), (B, C0, 4g, 4g) -> (B, C + 4 C1 + 16 C0, g, g), losslessly."""
        return torch.cat([embedding, F.pixel_unshuffle(s1, 2), F.pixel_unshuffle(s0, 4)], 1)

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`pack`'s inverse: the embedding and [s0, s1], as the decoder takes them."""
        c, c1, c0 = self.dims
        if packed.shape[1] != c + 4 * c1 + 16 * c0:
            raise EvaluationError(f"this SAM 2/3 mask decoder reads the high-resolution levels s0, s1 beside the "
                                  f"image embedding: give the three packed by PromptSide.pack ({c + 4 * c1 + 16 * c0} "
                                  f"channels), not {packed.shape[1]} channels")
        emb, s1, s0 = packed.split([c, 4 * c1, 16 * c0], 1)
        return emb, [F.pixel_shuffle(s0, 4), F.pixel_shuffle(s1, 2)]

    def mask_decoder(self, *, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                     multimask_output):
        """(1, C, g, g) embedding (packed with s0, s1 where read), P prompts -> (P, M, 4g, 4g) mask logits, (P, M)
        predicted IoUs."""
        high_res = None
        if self.reads_high_res:
            image_embeddings, high_res = self.unpack(image_embeddings)
        if self.sam3:
            masks, iou, _, _ = self.model.mask_decoder(
                image_embeddings=image_embeddings, image_positional_embeddings=image_pe,
                sparse_prompt_embeddings=sparse_prompt_embeddings, dense_prompt_embeddings=dense_prompt_embeddings,
                multimask_output=multimask_output, high_resolution_features=high_res)
            return masks[0], iou[0]
        masks, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=image_embeddings, image_pe=image_pe, sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings, multimask_output=multimask_output,
            repeat_image=len(sparse_prompt_embeddings) > 1, high_res_features=high_res)
        return masks, iou

    def postprocess_masks(self, masks: torch.Tensor, input_size, original_size) -> torch.Tensor:
        return F.interpolate(masks.float(), tuple(original_size), mode="bilinear", align_corners=False)


def to_sam_grid(spatial: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, g, g) float32, bilinear: the drop-in's resize, shared by `radio-eval`'s SAM metric."""
    if tuple(spatial.shape[-2:]) == tuple(grid):
        return spatial.float()
    return F.interpolate(spatial.float(), size=tuple(grid), mode="bilinear", align_corners=False)


def sam_model(run: str | Path, checkpoint: str | Path | None = None, *, teacher: str | None = None,
              device: str | torch.device = "cpu"):
    """A segment_anything `Sam` whose image encoder is the run's student (see the module docstring).

    Args:
        run: a `radio-train` run folder whose store has a SAM teacher.
        checkpoint: the SAM teacher's checkpoint file; None for the tiny preset (seeded weights), and for a
            teacher whose weight file is still where the build found it (or, for the toy preset, in
            `cache/toy/`) with the recorded sha256.
        teacher: which SAM teacher of the store, when it has several.
        device: where the model goes.

    Returns:
        the `Sam`, in eval mode.
    """
    info = load_run(run)
    sams = {n: i for n, i in info.store_settings["teachers"].items() if i["family"] == "sam"}
    if not sams:
        raise EvaluationError(f"run '{info.path}' was trained from a store without a SAM teacher")
    if teacher is None and len(sams) > 1:
        raise EvaluationError(f"run '{info.path}' has SAM teachers {sorted(sams)}; pick one with teacher=")
    name = teacher or next(iter(sams))
    if name not in sams:
        raise EvaluationError(f"'{name}' is not a SAM teacher of run '{info.path}'; its SAM teachers: {sorted(sams)}")
    ident = sams[name]
    if ident.get("spatial", "neck") != "neck":
        raise EvaluationError(f"SAM teacher '{name}' was cached pre-neck; SAM's mask decoder needs the neck target "
                              "(build the store with --sam-spatial neck)")
    sam = load_sam(ident, checkpoint, name, recorded=_recorded_weight_file(info.store, name))
    student = load_student(info.path)
    sam.image_encoder = StudentImageEncoder(
        student, name, resolution=info.resolution, img_size=sam.image_encoder.img_size,
        grid=sam.prompt_encoder.image_embedding_size, sam_mean=sam.pixel_mean, sam_std=sam.pixel_std)
    return sam.to(device).eval()


def sam_predictor(run: str | Path, checkpoint: str | Path | None = None, *, teacher: str | None = None,
                  device: str | torch.device = "cpu"):
    """`segment_anything.SamPredictor` over `sam_model(run, checkpoint)`: set_image, then predict as usual."""
    from segment_anything import SamPredictor

    return SamPredictor(sam_model(run, checkpoint, teacher=teacher, device=device))


def _embedding_teacher(info, family: str, teacher: str | None) -> tuple[str, dict]:
    """The run's `family` teacher of the image embedding (sam_spatial neck) and {name: identity} of that family."""
    label = "SAM 2" if family == "sam2" else "SAM 3"
    mine = {n: i for n, i in info.store_settings["teachers"].items() if i["family"] == family}
    embeds = [n for n, i in mine.items() if i.get("spatial", "neck") == "neck"]
    if not embeds:
        raise EvaluationError(f"run '{info.path}' was trained from a store without a {label} teacher of the image "
                              "embedding (sam_spatial neck)")
    if teacher is None and len(embeds) > 1:
        raise EvaluationError(f"run '{info.path}' has {label} teachers {sorted(embeds)}; pick one with teacher=")
    name = teacher or embeds[0]
    if name not in embeds:
        raise EvaluationError(f"'{name}' is not a {label} image-embedding teacher of run '{info.path}'; "
                              f"those are: {sorted(embeds)}")
    return name, mine


def _levels(teachers: dict, name: str, decoder) -> tuple:
    """(s0 teacher, s1 teacher, `name`) for a decoder that reads the high-resolution levels, whose conv_s0,
    conv_s1 become identities (the cached levels are already projected); else (None, None, name)."""
    levels, why = high_res_teachers(teachers, name)
    if levels is None:
        raise EvaluationError(why)
    decoder.conv_s0, decoder.conv_s1 = nn.Identity(), nn.Identity()
    return (*levels, name)


def sam2_model(run: str | Path, checkpoint: str | Path | None = None, *, teacher: str | None = None,
               device: str | torch.device = "cpu"):
    """A `sam2` `SAM2Base` whose image encoder is the run's student (see `StudentSam2Backbone`).

    The store's SAM 2 teacher `teacher` (its image embedding, `sam_spatial` neck) gives the embedding; a model
    whose mask decoder reads the high-resolution levels too (the released ones) needs them from teachers of
    the same model cached with `sam_spatial` s0 and s1. The prompt encoder and mask decoder are the
    teacher's, from its checkpoint file (found and checked as `sam_model` does).
    """
    from sam2.utils.transforms import SAM2Transforms

    info = load_run(run)
    name, sam2s = _embedding_teacher(info, "sam2", teacher)
    model = load_sam(sam2s[name], checkpoint, name, recorded=_recorded_weight_file(info.store, name))
    levels = _levels(sam2s, name, model.sam_mask_decoder) if model.use_high_res_features_in_sam else (None, None, name)
    norm = SAM2Transforms(model.image_size, mask_threshold=0.0)  # SAM2ImagePredictor's: 0-1 pixels, ImageNet's
    model.image_encoder = StudentSam2Backbone(load_student(info.path), levels, model=model,
                                              resolution=info.resolution, sam_mean=torch.tensor(norm.mean) * 255,
                                              sam_std=torch.tensor(norm.std) * 255)
    return model.to(device).eval()


def sam3_model(run: str | Path, *, teacher: str | None = None, device: str | torch.device = "cpu"):
    """A transformers `Sam3TrackerModel` whose vision encoder is the run's student (see `StudentSam3Backbone`),
    with the store's SAM 3 teacher's prompt encoder and mask decoder: run it on `Sam3TrackerProcessor`'s inputs
    as usual. Its decoder reads the s0, s1 levels too: the store needs teachers of the same model for them."""
    info = load_run(run)
    name, sam3s = _embedding_teacher(info, "sam3", teacher)
    model = load_sam3(sam3s[name], name)
    levels = _levels(sam3s, name, model.mask_decoder)
    half = torch.full((3,), 0.5 * 255)  # Sam3ImageProcessor's mean and std
    model.vision_encoder = StudentSam3Backbone(load_student(info.path), levels, model=model,
                                               resolution=info.resolution, sam_mean=half, sam_std=half)
    return model.to(device).eval()


def load_sam3(ident: dict, name: str):
    """SAM 3 teacher `name` as transformers loads it: from its hub id, or its folder if that still holds the
    weights it was cached from (sha256)."""
    from ..cache.teachers import TeacherSpec, build_teacher, identity

    spec = TeacherSpec(name, "sam3", ident["model"], resolution=ident.get("resolution"))
    if ident.get("sha256") and identity(spec).get("sha256") != ident["sha256"]:
        raise EvaluationError(f"SAM 3 teacher '{name}': the folder '{ident['model']}' no longer holds the weights it "
                              f"was cached from (sha256 {ident['sha256'][:12]}...)")
    return build_teacher(spec).model.requires_grad_(False)


def high_res_teachers(teachers: dict, name: str) -> tuple[tuple[str, str] | None, str]:
    """The store's teachers of SAM 2 teacher `name`'s s0 and s1 levels (same identity, but `spatial`), else None
    and one line saying which are missing. `teachers`: {name: identity}."""
    same = {k: v for k, v in teachers[name].items() if k != "spatial"}
    found = {i.get("spatial"): n for n, i in teachers.items() if {k: v for k, v in i.items() if k != "spatial"} == same}
    missing = [level for level in ("s0", "s1") if level not in found]
    if missing:
        return None, (f"{name} ({teachers[name]['model']}): its mask decoder reads the high-resolution levels s0, s1 "
                      f"beside the image embedding; the store has no teacher of the same model for "
                      f"{', '.join(missing)} (cache them with sam_spatial {', '.join(missing)})")
    return (found["s0"], found["s1"]), ""


def sam2_predictor(run: str | Path, checkpoint: str | Path | None = None, *, teacher: str | None = None,
                   device: str | torch.device = "cpu"):
    """`sam2.sam2_image_predictor.SAM2ImagePredictor` over `sam2_model(run, checkpoint)`: set_image, then
    predict as usual; its feature sizes follow the model's input side (the predictor assumes 1024 px)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = sam2_model(run, checkpoint, teacher=teacher, device=device)
    predictor = SAM2ImagePredictor(model)
    g = model.image_size // model.backbone_stride
    predictor._bb_feat_sizes = [(4 * g, 4 * g), (2 * g, 2 * g), (g, g)]
    return predictor


def _recorded_weight_file(store: str | None, name: str) -> str | None:
    """Where the build of `store` found teacher `name`'s weight file (root attrs `weight_files`); None
    when the store records none or cannot be opened (then only the toy preset's folder is looked in)."""
    if not store:
        return None
    from ..store.group import open_store
    from ..store.location import location

    try:
        return (open_store(location(store)).attrs.get("weight_files") or {}).get(name)
    except Exception:  # a moved or unreachable store: only a hint is lost, the sha256 check still decides
        return None


def find_sam_checkpoint(ident: dict, name: str, recorded: str | None = None,
                        fix: str = "pass its checkpoint with --sam-checkpoint FILE") -> tuple[Path | None, str]:
    """The SAM (or SAM 2) teacher's checkpoint found without asking (see `cache.teachers.locate_weights`), else
    None and one line saying what to do (`fix`)."""
    from ..cache.teachers import locate_weights

    found, tried = locate_weights(ident, recorded)
    if found is not None:
        return found, ""
    if tried:
        return None, (f"{name} ({ident['model']}): its weight file '{ident.get('weights')}' (sha256 "
                      f"{ident['sha256'][:12]}...) is not where it was: {', '.join(tried)}; {fix}")
    return None, f"{name} ({ident['model']}): {fix}"


def load_sam(ident: dict, checkpoint: str | Path | None, name: str, *, recorded: str | None = None):
    """The SAM teacher `name` (its store identity `ident`) as its library loads it, after checking the
    file is the one cached from; the tiny preset needs no file (seeded), and without `checkpoint` a file
    still at the path its build recorded (`recorded`), or a toy preset's in `cache/toy/`, with the
    recorded sha256 is used."""
    from ..cache.teachers import build_teacher, sha256_file, tiny_teachers

    if ident.get("preset") == "tiny":
        if checkpoint is not None:
            raise EvaluationError(f"SAM teacher '{name}' is the tiny preset (seeded weights): it takes no checkpoint "
                                  f"file, got '{checkpoint}'")
        spec = next(s for s in tiny_teachers() if s.family == "sam")
        return build_teacher(spec).model  # seeded: the decoder the store's targets were made beside
    if checkpoint is None:
        checkpoint, why = find_sam_checkpoint(ident, name, recorded)  # sha256 checked there
        if checkpoint is None:
            raise EvaluationError(f"SAM teacher {why.replace(' with --sam-checkpoint FILE', ' file')}")
    else:
        checkpoint = Path(checkpoint).expanduser()
        if not checkpoint.is_file():
            raise EvaluationError(f"SAM checkpoint '{checkpoint}' is not a file")
        if ident.get("sha256") and sha256_file(checkpoint) != ident["sha256"]:
            raise EvaluationError(f"SAM checkpoint '{checkpoint}' is not the file teacher '{name}' was cached from "
                                  f"({ident.get('weights')}, sha256 {ident['sha256'][:12]}...)")
    return sam_from_file(ident, checkpoint, name)


def sam_from_file(ident: dict, checkpoint: Path, name: str):
    """SAM (or SAM 2) teacher `name` built by its library from `checkpoint`, a file already checked to be its own."""
    from ..cache.teachers import TeacherSpec, build_teacher

    spec = TeacherSpec(name, ident["family"], ident["model"], weights=str(checkpoint),
                       resolution=ident.get("resolution"))
    sam = build_teacher(spec).model
    return sam.requires_grad_(False)


@torch.no_grad()
def prompt_masks(sam, embeddings: torch.Tensor, *, points: int = 4, seed: int = 0) -> torch.Tensor:
    """Masks SAM's decoder draws from `embeddings` (B, C, g, g) for a seeded grid of point prompts.

    Each image gets `points` x `points` single positive points: the centres of a regular grid over
    SAM's input frame, each moved by a seeded jitter of up to a quarter cell.

    Returns:
        (B, points**2, 4g, 4g) bool masks at the decoder's output size.
    """
    S = sam.prompt_encoder.input_image_size[0]
    rng = torch.Generator().manual_seed(seed)
    centres = (torch.arange(points) + 0.5) * S / points
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(-1, 1, 2)  # (P, 1, 2) x, y
    pe = sam.prompt_encoder.get_dense_pe()
    out = []
    for b, emb in enumerate(embeddings):
        coords = grid + (torch.rand(grid.shape, generator=rng) - 0.5) * S / points / 2
        coords, labels = coords.to(emb.device), torch.ones(len(coords), 1, dtype=torch.int, device=emb.device)
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        logits, _ = sam.mask_decoder(image_embeddings=emb[None], image_pe=pe, sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense, multimask_output=False)
        out.append(logits[:, 0] > sam.mask_threshold)
    return torch.stack(out)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks (..., H, W) -> (...); two empty masks agree fully (IoU 1)."""
    inter, union = (a & b).flatten(-2).sum(-1), (a | b).flatten(-2).sum(-1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float))


@torch.no_grad()
def mask_agreement(sam, reference: torch.Tensor, candidates: dict[str, torch.Tensor], *, points: int = 4,
                   seed: int = 0, batch: int = 16) -> dict[str, torch.Tensor]:
    """Per-prompt IoU of the masks each candidate's embeddings give vs those of `reference`, same prompts.

    Args:
        sam: a segment_anything `Sam` (its prompt encoder and mask decoder are used).
        reference: (M, C, g, g) embeddings, e.g. the cached SAM teacher features.
        candidates: name -> (M, C, g, g) embeddings.
        batch: images decoded at a time (the masks of a batch are (batch, points**2, 4g, 4g) bools).

    Returns:
        name -> (M, points**2) float IoUs, on the CPU.
    """
    device = sam.prompt_encoder.get_dense_pe().device
    out = {name: [] for name in candidates}
    for start in range(0, len(reference), batch):
        part = slice(start, start + batch)
        ref = prompt_masks(sam, reference[part].to(device), points=points, seed=seed + start)
        for name, emb in candidates.items():
            masks = prompt_masks(sam, emb[part].to(device), points=points, seed=seed + start)
            out[name].append(mask_iou(ref, masks).cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


# Point-prompt mask IoU against ground truth: one positive point per object, at its deepest pixel.
# The one implementation: `radio-eval` (teacher and student embeddings) and the toy SAM's own score
# (`cache/toy/score.py`) both call `point_prompt_iou`.

MIN_PIXELS = 64  # objects showing fewer pixels in a view (at its own side) are not prompted


def deepest_points(masks: torch.Tensor) -> torch.Tensor:
    """(K, R, R) bool masks -> (K, 2) float (x, y) pixel centre of each mask's pixel farthest (in
    chessboard distance) from its edge; the first in raster order among equals."""
    m = masks[:, None].float()  # (K, 1, R, R)
    depth = torch.zeros_like(m)
    while m.any():
        depth += m
        m = -F.max_pool2d(-m, 3, stride=1, padding=1)  # erosion; outside the view counts as background
    flat = depth.flatten(1).argmax(1)
    R = masks.shape[-1]
    return torch.stack([flat % R, flat // R], -1).float() + 0.5


def object_points(instances: torch.Tensor, native: torch.Tensor, *, min_pixels: int = MIN_PIXELS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The objects to prompt in a view and one point each.

    Args:
        instances: (S, S) instance ids (0 background) of the view at SAM's input side S.
        native: (n, n) the same view's instance ids at its own side in source pixels.
        min_pixels: objects with fewer pixels in `native` (or none in `instances`) are left out.

    Returns:
        ids (K,) and points (K, 2) float (x, y) in SAM's input frame: each object's deepest pixel at S.
    """
    ids, counts = native.unique(return_counts=True)
    ids = ids[(ids > 0) & (counts >= min_pixels)]
    ids = ids[torch.isin(ids, instances.unique())]  # shows at SAM's side too
    if len(ids) == 0:
        return ids, torch.zeros(0, 2)
    return ids, deepest_points(instances[None] == ids[:, None, None])


def point_masks(sam, embedding: torch.Tensor, points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) bool masks SAM's decoder draws from one image's `embedding` (C, g, g) for K single
    positive `points` (K, 2) (x, y in its input frame), single-mask output, upsampled by
    `Sam.postprocess_masks` from its (unpadded, square) input frame to `size` (h, w)."""
    device = embedding.device
    sparse, dense = sam.prompt_encoder(points=(points[:, None].to(device),
                                               torch.ones(len(points), 1, dtype=torch.int, device=device)),
                                       boxes=None, masks=None)
    low, _ = sam.mask_decoder(image_embeddings=embedding[None], image_pe=sam.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=False)  # (K, 1, r, r)
    return sam.postprocess_masks(low, tuple(sam.prompt_encoder.input_image_size), tuple(size))[:, 0] > sam.mask_threshold


@torch.no_grad()
def point_prompt_iou(sam, embedding: torch.Tensor, instances: torch.Tensor, native: torch.Tensor, *,
                     min_pixels: int = MIN_PIXELS, points: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """(K,) IoU of each object's point-prompt mask with its ground-truth instance mask, on the CPU.

    Args:
        sam: a segment_anything `Sam` (prompt encoder and mask decoder used; its image encoder only
            for its `img_size`).
        embedding: (C, g, g) the image's embedding (SAM's own, a cached target, or a student's).
        instances: (S, S) instance ids of the view at SAM's input side (the prompts' frame).
        native: (n, n) instance ids of the view at its own side: masks are compared there.
        min_pixels: see `object_points`.
        points: (ids, points) from `object_points`, when already computed (e.g. for several embeddings).
    """
    ids, xy = points if points is not None else object_points(instances, native, min_pixels=min_pixels)
    if len(ids) == 0:
        return torch.zeros(0)
    masks = point_masks(sam, embedding, xy, tuple(native.shape)).cpu()  # (K, n, n)
    return mask_iou(masks, native[None] == ids[:, None, None])
