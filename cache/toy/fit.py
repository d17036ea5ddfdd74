"""Training the toy teachers on generated scenes: one function per family, each seeded.

- CLIP (open_clip `radio-toy-clip`, a timm image tower with a conv stem): image and text towers trained
  together with the contrastive loss on the scenes' captions and on shorter phrasings of the main
  object ("a photo of a red star."); every text in the batch that is true of an image is its positive
  (`true_of`). Beside it, supervised heads, dropped afterwards: shape and colour of the main object
  from the image embedding, and each patch token's shape class (background included).
- DINOv2 (timm `vit_toy_reg4_dinov2`, DINOv2's ViT with a conv stem): supervised heads, not
  self-distillation. Linear heads on the normed CLS token predict the shape, colour, size and centre
  of the largest object in the view; linear heads on the normed patch tokens predict each patch's
  shape class (background included) and colour. The heads are dropped; the backbone is the teacher.
- SAM (segment_anything at toy sizes with a conv stem, `build_toy_sam`): image encoder, prompt encoder and mask
  decoder trained together on one positive point per object against its instance mask: BCE + dice on
  the low-res masks (the single-mask output, and the best of the three multimask outputs), plus the
  IoU head on the IoU each mask reached.

Letters: B batch, P prompts per image, R side, g the SAM grid, D width, K classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...ops import normalise
from ..world import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene
from .data import Views, flip

PREFIXES = ("a photo of", "a picture of", "a drawing of", "a rendering of", "a cropped photo of", "")


def lr_at(step: int, steps: int, *, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 5 % of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def phrasings(scene: Scene, rng: np.random.Generator, n: int = 6) -> list[tuple[str, tuple | None]]:
    """The caption, then `n - 1` shorter texts about the main object, some with a prefix
    ('a photo of a large red star.', 'a blue circle', 'a drawing of a cross on sand.', 'a photo of a red.'),
    each with what it claims: (shape, colour, size, background), None where unsaid; None for the caption.
    A quarter name the colour without the shape: without them a tower that knows shapes well reads
    'a photo of a red.' as no colour at all (zero-shot by colour at chance)."""
    main = scene.things[scene.main]
    out = [(scene.caption, None)]
    for _ in range(n - 1):
        shape = None if rng.random() < 0.25 else main.shape
        colour, size, ground = (v if rng.random() < p else None
                                for v, p in ((main.colour, 0.5 if shape else 1.0), (main.size, 0.5), (scene.background, 0.3)))
        phrase = "a " + " ".join(w for w in (size, colour, shape) if w) + (f" on {ground}" if ground else "")
        prefix = str(rng.choice(PREFIXES))
        out.append((f"{prefix} {phrase}." if prefix else phrase, (shape, colour, size, ground)))
    return out


def _claims(texts: list[list[tuple[str, tuple | None]]], scenes: list[Scene], index) -> tuple:
    """Text ids, a table of what each distinct text claims and each view's own attributes.

    Returns:
        text_id (N, T) long, vocab {text: id}, claim (U, 4) long (value index, -1 unsaid; all -2 for a
        caption), truth (N, 4) long (the attributes of view n's main object), caption_id (N,) long.
    """
    values = [SHAPES, tuple(COLOURS), tuple(SIZES), BACKGROUNDS]
    vocab, claim = {}, []
    for row in texts:
        for text, said in row:
            code = [-2] * 4 if said is None else [-1 if v is None else values[a].index(v) for a, v in enumerate(said)]
            if text not in vocab:
                vocab[text] = len(vocab)
                claim.append(code)
            elif said is not None:  # a caption that reads as a phrasing ('a large red star on grass') claims as one
                claim[vocab[text]] = code
    truth = [[values[a].index(v) for a, v in enumerate(_attributes(scenes[k]))] for k in index]
    text_id = torch.tensor([[vocab[t] for t, _ in row] for row in texts])
    return text_id, vocab, torch.tensor(claim), torch.tensor(truth), text_id[:, 0]


def _attributes(scene: Scene) -> tuple:
    main = scene.things[scene.main]
    return main.shape, main.colour, main.size, scene.background


def true_of(claim: torch.Tensor, ids: torch.Tensor, truth: torch.Tensor, caption_id: torch.Tensor) -> torch.Tensor:
    """(B images, T texts) bool: text `ids[j]` is true of image i. A phrasing is true of every image whose main object
    (and background) has all it says; a caption only of the images whose caption it is.

    Args:
        claim: (U, 4) per text id (see `_claims`); ids (T,) the batch's text ids; truth (B, 4) and
        caption_id (B,) the batch images' attributes and caption ids.
    """
    said = claim[ids]  # (T, 4)
    match = ((said[None] == -1) | (said[None] == truth[:, None])).all(-1)  # (B, T)
    is_caption = said[:, 0] == -2
    return torch.where(is_caption[None], caption_id[:, None] == ids[None], match)


def fit_clip(model, tokenizer, views: Views, scenes: list[Scene], *, steps: int, batch: int = 128, lr: float = 2e-3,
             seed: int = 0, log=None):
    """Contrastive training of an open_clip model (and its `tokenizer`) on `views` of `scenes` (centred
    squares: their main object is the scene's) and their texts, in place. Every text in the batch that is
    true of an image is a positive of it (`true_of`), so 'a photo of a star.' pulls every star."""
    import open_clip

    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    text_id, vocab, claim, truth, caption_id = _claims([phrasings(scenes[k], rng) for k in views.scene], scenes,
                                                       views.scene)
    tokens = tokenizer(sorted(vocab, key=vocab.get))  # (U, L), by text id
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean, std = cfg["mean"], cfg["std"]
    trunk = model.visual.trunk  # the toy CLIP's timm tower: its tokens get the dense head
    heads = nn.ModuleList([nn.Linear(model.visual.head.proj.out_features, len(SHAPES)),
                           nn.Linear(model.visual.head.proj.out_features, len(COLOURS)),
                           nn.Linear(trunk.embed_dim, len(SHAPES) + 1)])
    patch = trunk.patch_embed.patch_size[0]
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.05)
    model.train()
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, peak=lr, warmup=min(50, steps // 10 + 1)))
        idx = torch.randint(len(views), (batch,), generator=gen)
        ids = text_id[idx, torch.randint(text_id.shape[1], (batch,), generator=gen)]  # (B,)
        pixels, classes = flip(views.pixels[idx], views.classes[idx], which=torch.rand(batch, generator=gen) < 0.5)
        grid = trunk.forward_features(normalise(pixels, mean, std))  # (B, 1 + h * w, C)
        image = F.normalize(model.visual.head(trunk.forward_head(grid)), dim=-1)  # (B, D): encode_image's
        text = model.encode_text(tokens[ids], normalize=True)  # (B, D)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T  # (B, B)
        same = true_of(claim, ids, truth[idx], caption_id[idx]).float()  # the diagonal is always true
        loss = (F.cross_entropy(logits, same / same.sum(1, keepdim=True))
                + F.cross_entropy(logits.T, same.T / same.T.sum(1, keepdim=True))) / 2
        # the shape head weighs 3: held-out zero-shot by shape 0.905 (0.888 at 5; 0.855 at 1, the third set; BENCHMARKS §18)
        loss = loss + 3 * F.cross_entropy(heads[0](image), truth[idx, 0]) + 0.5 * F.cross_entropy(heads[1](image), truth[idx, 1])
        loss = loss + F.cross_entropy(heads[2](grid[:, trunk.num_prefix_tokens:]).flatten(0, 1),
                                      patch_labels(classes, patch).flatten().long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % 50 == 0 or step == steps - 1):
            hit = same[torch.arange(batch), logits.argmax(1)].mean().item()
            log(f"clip step {step}/{steps} loss {loss.item():.3f} batch image->text top-1 {hit:.2f}")
    return model.eval()


class DinoHeads(nn.Module):
    """Supervised heads on a ViT's normed tokens: CLS -> shape, colour, size, centre (x, y) of the largest
    object; patch -> shape class (0 background) and colour class (0 background)."""

    def __init__(self, dim: int):
        super().__init__()
        self.shape, self.colour, self.size = nn.Linear(dim, len(SHAPES)), nn.Linear(dim, len(COLOURS)), nn.Linear(dim, len(SIZES))
        self.centre = nn.Linear(dim, 2)
        self.patch_shape, self.patch_colour = nn.Linear(dim, len(SHAPES) + 1), nn.Linear(dim, len(COLOURS) + 1)


def patch_labels(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, R, R) label maps -> (B, R/patch, R/patch): the label at each patch's centre pixel (nearest resize)."""
    return maps[:, patch // 2::patch, patch // 2::patch]


def fit_dinov2(model, views: Views, scenes: list[Scene], *, steps: int, batch: int = 64, lr: float = 1e-3,
               seed: int = 0, log=None):
    """Train a timm ViT's tokens through `DinoHeads` on `views` (centred squares and crops), in place."""
    gen = torch.Generator().manual_seed(seed)
    heads = DinoHeads(model.embed_dim)
    colour_of = _colour_maps(views, scenes)  # (N, R, R) colour index + 1, 0 background
    patch, prefix = model.patch_embed.patch_size[0], model.num_prefix_tokens
    cfg = model.pretrained_cfg
    with torch.no_grad():  # timm's DINOv2 starts its layer scales at 1e-5, slow from scratch
        for blk in model.blocks:
            for ls in (blk.ls1, blk.ls2):
                if hasattr(ls, "gamma"):
                    ls.gamma.fill_(1.0)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    model.train()
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, peak=lr, warmup=min(50, steps // 10 + 1)))
        idx = torch.randint(len(views), (batch,), generator=gen)
        flipped = torch.rand(batch, generator=gen) < 0.5
        pixels, classes, colours = flip(views.pixels[idx], views.classes[idx], colour_of[idx], which=flipped)
        tokens = model.forward_features(normalise(pixels, cfg["mean"], cfg["std"]))  # (B, prefix + h * w, D)
        cls, patches = tokens[:, 0], tokens[:, prefix:]
        main, has = views.main[idx], views.main[idx] >= 0
        centre = views.centre[idx].clone()
        centre[:, 0] = torch.where(flipped, 1 - centre[:, 0], centre[:, 0])
        loss = F.cross_entropy(heads.patch_shape(patches).flatten(0, 1), patch_labels(classes, patch).flatten().long())
        loss = loss + 0.5 * F.cross_entropy(heads.patch_colour(patches).flatten(0, 1),
                                            patch_labels(colours, patch).flatten().long())
        if has.any():
            c = cls[has]
            loss = loss + F.cross_entropy(heads.shape(c), main[has]) + 0.5 * F.cross_entropy(heads.colour(c), views.colour[idx][has])
            loss = loss + 0.3 * F.cross_entropy(heads.size(c), views.size[idx][has])
            loss = loss + 2 * F.smooth_l1_loss(heads.centre(c), centre[has], beta=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % 50 == 0 or step == steps - 1):
            acc = (heads.shape(cls[has]).argmax(1) == main[has]).float().mean().item() if has.any() else float("nan")
            log(f"dinov2 step {step}/{steps} loss {loss.item():.3f} batch shape accuracy {acc:.2f}")
    return model.eval()


def _colour_maps(views: Views, scenes: list[Scene]) -> torch.Tensor:
    """(N, R, R) uint8 colour index + 1 of the object at each pixel, 0 background."""
    out = torch.zeros_like(views.instances)
    for n, k in enumerate(views.scene):
        lut = torch.tensor([0] + [list(COLOURS).index(t.colour) + 1 for t in scenes[k].things], dtype=torch.uint8)
        out[n] = lut[views.instances[n].long()]
    return out


def sample_points(instances: torch.Tensor, prompts: int, gen: torch.Generator, *, min_pixels: int = 8):
    """For each view, `prompts` objects (with replacement) and a random pixel inside each.

    Args:
        instances: (B, R, R) instance maps.

    Returns:
        points (B, P, 2) float (x, y) pixel centres, targets (B, P, R, R) bool, or None where a view shows
        no object of at least `min_pixels` pixels (its rows are dropped: `keep` (B,) bool).
    """
    points, targets, keep = [], [], []
    for inst in instances:
        ids, counts = inst.unique(return_counts=True)
        ids = ids[(ids > 0) & (counts >= min_pixels)]
        if len(ids) == 0:
            keep.append(False)
            continue
        keep.append(True)
        chosen = ids[torch.randint(len(ids), (prompts,), generator=gen)]
        masks = inst[None] == chosen[:, None, None]  # (P, R, R)
        pts = []
        for m in masks:
            ys, xs = torch.nonzero(m, as_tuple=True)
            j = torch.randint(len(ys), (1,), generator=gen)
            pts.append(torch.stack([xs[j], ys[j]], -1).float() + 0.5)
        points.append(torch.cat(pts))
        targets.append(masks)
    return torch.stack(points), torch.stack(targets), torch.tensor(keep)


def mask_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + dice per mask: logits (..., r, r), soft target (..., r, r) -> (...)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(-2).mean(-1)
    prob = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    dice = 1 - (2 * (prob * t).sum(-1) + 1) / (prob.sum(-1) + t.sum(-1) + 1)
    return bce + dice


def decode(sam, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
    """segment_anything's `MaskDecoder.predict_masks` for a batch of images with one prompt each (the
    library's takes one image and repeats it per prompt): the same maths, batched.

    Args:
        embeddings: (B, C, g, g) image embeddings, one per prompt.
        sparse, dense: the prompt encoder's outputs for those B prompts.

    Returns:
        low-res mask logits (B, 4, 4g, 4g) and IoU predictions (B, 4).
    """
    dec = sam.mask_decoder
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(len(sparse), -1, -1), sparse), dim=1)
    src = embeddings + dense
    pos = sam.prompt_encoder.get_dense_pe().expand(len(src), -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = dec.transformer(src, pos, tokens)
    iou_out, mask_out = hs[:, 0, :], hs[:, 1:1 + dec.num_mask_tokens, :]
    up = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
    b, c, h, w = up.shape
    masks = (hyper @ up.view(b, c, h * w)).view(b, -1, h, w)
    return masks, dec.iou_prediction_head(iou_out)


def fit_sam(sam, views: Views, *, steps: int, batch: int = 16, prompts: int = 4, lr: float = 2e-3, seed: int = 0,
            log=None):
    """Train a segment_anything `Sam` on point prompts against instance masks, in place."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(sam.parameters(), lr=lr, weight_decay=0.05)
    mean, std = (sam.pixel_mean / 255).flatten().tolist(), (sam.pixel_std / 255).flatten().tolist()
    sam.train()
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, peak=lr, warmup=min(50, steps // 10 + 1)))
        idx = torch.randint(len(views), (batch,), generator=gen)
        pixels, instances = flip(views.pixels[idx], views.instances[idx], which=torch.rand(batch, generator=gen) < 0.5)
        points, targets, keep = sample_points(instances, prompts, gen)
        emb = sam.image_encoder(normalise(pixels[keep], mean, std))  # (B, C, g, g)
        B, P = points.shape[:2]
        sparse, dense = sam.prompt_encoder(points=(points.flatten(0, 1)[:, None], torch.ones(B * P, 1, dtype=torch.int)),
                                           boxes=None, masks=None)
        low, iou_pred = decode(sam, emb.repeat_interleave(P, 0), sparse, dense)  # (B * P, 4, r, r), (B * P, 4)
        soft = F.adaptive_avg_pool2d(targets.flatten(0, 1).float(), low.shape[-2:])[:, None]  # (B * P, 1, r, r)
        per = mask_losses(low, soft.expand_as(low))  # (B * P, 4)
        with torch.no_grad():
            hard, pred = soft > 0.5, low > 0
            got = (pred & hard).flatten(-2).sum(-1) / (pred | hard).flatten(-2).sum(-1).clamp(min=1)  # (B * P, 4)
        # the single mask, the best of the multimask three, and the IoU head on the IoU each mask reached
        loss = (per[:, 0] + per[:, 1:].min(1).values).mean() + F.mse_loss(iou_pred, got)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"sam step {step}/{steps} loss {loss.item():.3f} train IoU {got[:, 0].mean().item():.3f}")
    return sam.eval()
