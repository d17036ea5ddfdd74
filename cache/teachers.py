"""Teachers: CLIP (open_clip), DINOv2 (timm), SAM (segment_anything), SAM 2 (Meta's `sam2`), SAM 3
(transformers' `Sam3TrackerModel`) and any timm image model with patch tokens (DINOv3, SigLIP/SigLIP2,
EVA...) behind one interface.

A teacher maps normalised pixels to a summary vector (none for SAM) and a spatial feature map.
Each is loaded by its own library exactly as users load it: a pretrained tag or a local file.
The `tiny` preset builds the same three architectures at toy sizes with seeded random weights,
for tests and the offline demo; the `toy` preset loads small ones trained on the generated world
(`cache/world.py`) from the safetensors files in `cache/toy/`, through the ordinary weight-file specs.

Letters: B batch, R input side, h, w grid, C spatial channels, D summary channels.
"""

import hashlib
import logging
import os
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TeacherSpecError
from ..store.layout import TeacherInfo

FAMILIES = ("clip", "dinov2", "sam", "sam2", "sam3", "timm")
SAM_SPATIAL = ("neck", "preneck")
# SAM 2's and SAM 3's targets: the image embedding their mask decoder reads, or a high-resolution level it also
# reads (s1 at half, s0 at a quarter of its stride), as their predictors keep them; value: the FPN level
SAM_LEVELS = {"neck": 2, "s1": 1, "s0": 0}
TINY_CLIP = "radio-tiny-clip"
TOY_CLIP = "radio-toy-clip"
TOY_DIR = Path(__file__).parent / "toy"  # the toy teachers' trainer, weights and scores
_MODEL_CONFIGS = Path(__file__).parent / "model_configs"


@dataclass(frozen=True)
class TeacherSpec:
    """What to load: `[name=]family:model[:weights][@resolution[xK]]` on the command line.

    `weights` is a pretrained tag (open_clip) or a local file; DINOv2 and timm tags live in the timm
    model name. `@384x2` also caches a K x K-tiled high-resolution map (`tiled_specs`): `tiles` > 1 marks
    that entry. `random_init` builds the architecture with seeded random weights instead (the tiny
    preset, architecture benchmarks); `model_kwargs` (timm `create_model` kwargs, not on the command
    line) only serves toy sizes of the dinov2 and timm families.
    """

    name: str
    family: str
    model: str
    weights: str | None = None
    resolution: int | None = None
    sam_spatial: str = "neck"
    random_init: bool = False
    preset: str | None = None  # 'tiny' or 'toy' for the offline presets, recorded so stores say so
    model_kwargs: tuple[tuple[str, object], ...] = ()
    tiles: int = 1


_SPEC = re.compile(r"^(?:(?P<name>[A-Za-z0-9_-]+)=)?(?P<family>[a-z0-9]+):(?P<model>[^:@]+)"
                   r"(?::(?P<weights>[^@]+))?(?:@(?P<res>\d+)(?:x(?P<tiles>\d+))?)?$")
MAX_TILES = 8  # K x K forwards per view: 64 at 8


def parse_teacher(text: str) -> TeacherSpec:
    """Parse `[name=]family:model[:weights][@resolution[xK]]`, e.g. `clip:ViT-L-14:openai@224`, or
    `siglip=timm:vit_so400m_patch14_siglip_384@384x2` for a 2 x 2-tiled map beside the global one."""
    m = _SPEC.match(text.strip())
    if not m:
        raise TeacherSpecError(f"bad teacher spec '{text}'; expected [name=]family:model[:weights][@resolution[xK]], "
                               "e.g. clip:ViT-L-14:openai@224, dinov2:vit_large_patch14_reg4_dinov2.lvd142m@448, "
                               "sam:vit_h:/path/sam_vit_h_4b8939.pth@1024")
    family = m["family"]
    if family not in FAMILIES:
        raise TeacherSpecError(f"unknown teacher family '{family}' in '{text}'; available: {', '.join(FAMILIES)}")
    res = int(m["res"]) if m["res"] else None
    if res == 0:
        raise TeacherSpecError(f"teacher spec '{text}': resolution must be >= 1, got @0")
    tiles = int(m["tiles"]) if m["tiles"] else 1
    if m["tiles"] and not 2 <= tiles <= MAX_TILES:
        raise TeacherSpecError(f"teacher spec '{text}': tiles x{tiles} must be 2 to {MAX_TILES} (K x K tiles of "
                               f"{res} px per view; without xK the global map alone is cached)")
    return TeacherSpec(name=m["name"] or family, family=family, model=m["model"], weights=m["weights"], resolution=res,
                       tiles=tiles)


def tiled_specs(spec: TeacherSpec) -> list[TeacherSpec]:
    """The entries a spec caches: itself; with `tiles` K > 1, the global map (`name`, tiles 1) and the K x K-tiled
    one (`name_xK`). Both are entries of one model at two sides, so training pairs each student side with the
    closer one (`train.step.pair_teachers`)."""
    if spec.tiles == 1:
        return [spec]
    return [replace(spec, tiles=1), replace(spec, name=f"{spec.name}_x{spec.tiles}")]


def tiny_teachers() -> list[TeacherSpec]:
    """The offline preset: real CLIP, DINOv2 and SAM architectures at toy sizes, seeded random weights."""
    return [
        TeacherSpec("clip", "clip", TINY_CLIP, resolution=64, random_init=True, preset="tiny"),
        TeacherSpec("dinov2", "dinov2", "vit_small_patch14_reg4_dinov2", resolution=112, random_init=True,
                    preset="tiny", model_kwargs=(("depth", 2), ("embed_dim", 48), ("num_heads", 2))),
        TeacherSpec("sam", "sam", "tiny", resolution=64, random_init=True, preset="tiny"),
    ]


TOY_DINOV2 = "vit_toy_reg4_dinov2"  # registered with timm by cache/toy/models.py
TOY_SIDES = {"clip": 64, "dinov2": 64, "sam": 128}


def toy_teachers(folder: str | Path = TOY_DIR) -> list[TeacherSpec]:
    """The trained offline preset: small CLIP, DINOv2 and SAM trained on generated scenes, loaded from
    `clip.safetensors`, `dinov2.safetensors` and `sam.safetensors` in `folder` (what
    `cache/toy/train_toy_teachers.py` writes) as the specs `clip:radio-toy-clip:FILE@64`,
    `dinov2:vit_toy_reg4_dinov2:FILE@64` and `sam:toy:FILE@128` would. Their image towers have a conv
    stem in place of the linear patch embedding (`cache/toy/models.py`)."""
    folder = Path(folder)
    missing = [f for f in ("clip", "dinov2", "sam") if not (folder / f"{f}.safetensors").is_file()]
    if missing:
        raise TeacherSpecError(f"toy teachers: {', '.join(f + '.safetensors' for f in missing)} missing in '{folder}'; "
                               "make them with `python -m radio_distill.cache.toy.train_toy_teachers`")
    return [
        TeacherSpec("clip", "clip", TOY_CLIP, weights=str(folder / "clip.safetensors"), resolution=TOY_SIDES["clip"], preset="toy"),
        TeacherSpec("dinov2", "dinov2", TOY_DINOV2, weights=str(folder / "dinov2.safetensors"),
                    resolution=TOY_SIDES["dinov2"], preset="toy"),
        TeacherSpec("sam", "sam", "toy", weights=str(folder / "sam.safetensors"), resolution=TOY_SIDES["sam"],
                    preset="toy"),
    ]


PRESETS = {"tiny": tiny_teachers, "toy": toy_teachers}  # `--teachers NAME`: whole teacher sets by name


def _is_file(weights: str | None) -> bool:
    return weights is not None and (Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in weights)


def _check_sam_files(spec: TeacherSpec, what: str, example: str, targets) -> None:
    """A SAM or SAM 2 spec's checkpoint (a file unless seeded) and spatial target, each a one-line error."""
    if spec.weights is None and not spec.random_init:
        raise TeacherSpecError(f"teacher '{spec.name}': {what} needs a checkpoint file, e.g. {example}")
    if spec.weights is not None and not Path(spec.weights).expanduser().is_file():
        raise TeacherSpecError(f"teacher '{spec.name}': {what} checkpoint '{spec.weights}' is not a file; "
                               f"e.g. {example}")
    if spec.sam_spatial not in targets:
        raise TeacherSpecError(f"teacher '{spec.name}': {what} spatial target '{spec.sam_spatial}' "
                               f"is not one of {', '.join(targets)}")


def check_spec(spec: TeacherSpec) -> None:
    """Fail fast, before any work, on unknown models, tags or missing weight files."""
    if spec.weights is not None and _is_file(spec.weights) and not Path(spec.weights).expanduser().is_file():
        raise TeacherSpecError(f"teacher '{spec.name}': weight file '{spec.weights}' does not exist")
    if spec.family == "clip":
        import open_clip
        register_model_configs()
        if spec.model not in open_clip.list_models():
            raise TeacherSpecError(f"teacher '{spec.name}': unknown open_clip model '{spec.model}'; "
                                   "see open_clip.list_models()")
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        if spec.weights is None and not spec.random_init:
            raise TeacherSpecError(f"teacher '{spec.name}': open_clip model '{spec.model}' needs weights: "
                                   f"a pretrained tag ({', '.join(tags) or 'none known'}) or a local file")
        if spec.weights is not None and not _is_file(spec.weights) and spec.weights not in tags:
            raise TeacherSpecError(f"teacher '{spec.name}': unknown pretrained tag '{spec.weights}' for "
                                   f"'{spec.model}'; available: {', '.join(tags) or 'none'}")
    elif spec.family in ("dinov2", "timm"):
        import timm
        register_toy_models()
        if not timm.is_model(spec.model):
            raise TeacherSpecError(f"teacher '{spec.name}': unknown timm model '{spec.model}'; see timm.list_models("
                                   + ("'*dinov2*')" if spec.family == "dinov2" else "'*siglip*'), '*dinov3*', '*eva*'"))
        arch, _, tag = spec.model.partition(".")
        if tag and spec.model not in timm.list_pretrained(spec.model):
            raise TeacherSpecError(f"teacher '{spec.name}': unknown pretrained tag '{tag}' for timm model '{arch}'; "
                                   f"available: {', '.join(timm.list_pretrained(arch + '.*')) or 'none'}")
        if spec.weights is not None and not _is_file(spec.weights):
            label, example = (("DINOv2", "vit_large_patch14_reg4_dinov2.lvd142m") if spec.family == "dinov2"
                              else ("timm", "vit_so400m_patch14_siglip_384.webli"))
            raise TeacherSpecError(f"teacher '{spec.name}': {label} weights '{spec.weights}' must be a local file "
                                   f"(.pth, .safetensors); pretrained tags go in the timm model name, e.g. {example}")
        if spec.family == "timm":
            with torch.device("meta"):  # the architecture only: no memory, no weights
                model = timm.create_model(spec.model, pretrained=False, **dict(spec.model_kwargs))
            if not hasattr(model, "num_prefix_tokens") or not getattr(model, "global_pool", None):
                raise TeacherSpecError(f"teacher '{spec.name}': timm model '{spec.model}' has no patch tokens and "
                                       "pooled feature (a ViT-like model with num_prefix_tokens and a global_pool); "
                                       "e.g. vit_base_patch16_siglip_224, vit_large_patch16_dinov3, eva02_base_patch14_224")
    elif spec.family == "sam":
        if spec.model not in _sam_builders():
            raise TeacherSpecError(f"teacher '{spec.name}': unknown SAM model '{spec.model}'; "
                                   f"available: {', '.join(_sam_builders())}")
        _check_sam_files(spec, "SAM", f"sam:{spec.model}:/path/sam_{spec.model}.pth@1024", SAM_SPATIAL)
    elif spec.family == "sam2":
        _require("sam2", spec, "Meta's sam2: SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2 (scripts/setup.sh "
                 "does this)")
        example = f"sam2:{SAM2_EXAMPLE}:/path/sam2.1_hiera_large.pt@1024"
        if spec.model not in _sam2_configs():
            raise TeacherSpecError(f"teacher '{spec.name}': unknown SAM 2 config '{spec.model}'; available: "
                                   f"{', '.join(c for c in _sam2_configs() if 'sam2.1/' in c or c == 'tiny')} "
                                   f"(and the other configs of the sam2 package), e.g. {example}")
        _check_sam_files(spec, "SAM 2", example, SAM_LEVELS)
    elif spec.family == "sam3":
        _require("transformers", spec, "transformers: pip install 'radio-distill[sam3]'")
        example = "sam3:facebook/sam3@1008 or sam3:/path/to/a/save_pretrained/folder"
        if spec.weights is not None:
            raise TeacherSpecError(f"teacher '{spec.name}': SAM 3 loads its weights with its model "
                                   f"(transformers' from_pretrained of a hub id or folder), not from '{spec.weights}'; "
                                   f"e.g. {example}")
        if spec.model == "tiny" and not spec.random_init:
            raise TeacherSpecError(f"teacher '{spec.name}': sam3:tiny is the seeded test configuration; "
                                   f"give a model, e.g. {example}")
        local = Path(spec.model).expanduser()
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", spec.model) and not local.exists()
        if spec.model != "tiny" and not hub_id and not (local / "config.json").is_file():
            raise TeacherSpecError(f"teacher '{spec.name}': SAM 3 model '{spec.model}' is neither a hub id nor a "
                                   f"folder with a config.json; e.g. {example}")
        if spec.sam_spatial not in SAM_LEVELS:
            raise TeacherSpecError(f"teacher '{spec.name}': SAM 3 spatial target '{spec.sam_spatial}' "
                                   f"is not one of {', '.join(SAM_LEVELS)}")


def _require(module: str, spec: TeacherSpec, install: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise TeacherSpecError(f"teacher '{spec.name}': the {spec.family} family needs {install}")


PROBE_TIMEOUT = 8.0  # seconds the hub gets to answer one HEAD request, in the driver before Ray starts


def _spec_text(spec: TeacherSpec) -> str:
    return (f"{spec.family}:{spec.model}" + (f":{spec.weights}" if spec.weights else "")
            + (f"@{spec.resolution}" if spec.resolution else ""))


def _safe_first(filename: str, default: str, default_safe: str) -> list[str]:
    """The files a library asks the hub for, in its order: the safetensors twin of a .bin first."""
    if filename == default:
        return [default_safe, filename]
    return [filename[:-4] + ".safetensors", filename] if filename.endswith(".bin") else [filename]


def weight_sources(spec: TeacherSpec) -> list[tuple]:
    """Where the library fetches a pretrained tag's weights, in the order it tries them:
    `('hf', repo, revision, filename)` or `('url', url, path it is cached at)`; empty when nothing is downloaded
    (a local file, random weights)."""
    if spec.family == "clip" and spec.weights and not _is_file(spec.weights):
        import open_clip
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
        cfg = open_clip.get_pretrained_cfg(spec.model, spec.weights)
        if cfg.get("hf_hub"):  # open_clip prefers the hub: 'org/model/' (its default file) or 'org/model/file'
            repo, filename = cfg["hf_hub"].rsplit("/", 1)
            return [("hf", repo, None, f) for f in _safe_first(filename or HF_WEIGHTS_NAME, HF_WEIGHTS_NAME,
                                                                HF_SAFE_WEIGHTS_NAME)]
        if cfg.get("url"):  # open_clip's own cache for URL downloads
            return [("url", cfg["url"], str(Path("~/.cache/clip").expanduser() / Path(cfg["url"]).name))]
    elif spec.family in ("dinov2", "timm") and spec.weights is None and not spec.random_init:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(spec.model)  # the default tag's when the name has none
        if cfg is not None and cfg.hf_hub_id:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            return [("hf", repo, revision or None, f) for f in _safe_first(cfg.hf_hub_filename or "pytorch_model.bin",
                                                                           "pytorch_model.bin", "model.safetensors")]
        if cfg is not None and cfg.url:  # torch.hub's cache, where timm puts URL downloads
            return [("url", cfg.url, str(Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name))]
    elif spec.family == "sam3" and not spec.random_init and not Path(spec.model).expanduser().is_dir():
        return [("hf", spec.model, None, "model.safetensors")]  # a hub id (sam3:tiny is random-init only)
    return []


def _cached(source: tuple) -> bool:
    if source[0] == "url":
        return Path(source[2]).is_file()
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(source[1], source[3], revision=source[2]), str)


def _hub_offline() -> bool:
    import huggingface_hub.constants as hub
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return hub.HF_HUB_OFFLINE or env in ("1", "ON", "YES", "TRUE")


def probe(source: tuple, timeout: float) -> bool:
    """One HEAD request: True if the server has the file, False if it answers that it has not; raises when it
    cannot be reached or refuses (a gated or private repository without a token)."""
    if source[0] == "url":
        import urllib.error
        import urllib.request
        try:
            urllib.request.urlopen(urllib.request.Request(source[1], method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise
        return True
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError
    try:
        get_hf_file_metadata(hf_hub_url(source[1], source[3], revision=source[2]), timeout=timeout)
    except RemoteEntryNotFoundError:
        return False
    return True


def check_weights_reachable(spec: TeacherSpec, *, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail fast, in the driver before Ray starts, when a pretrained tag's weights are neither in the library's
    cache nor downloadable (offline, or the hub does not answer in `timeout` seconds): every worker would fail
    on them later, after the store was created. A cached file costs no request."""
    sources = weight_sources(spec)
    if not sources or any(_cached(s) for s in sources):
        return
    import huggingface_hub.constants as hub
    hf = sources[0][0] == "hf"
    name = (f"{sources[0][1]}/{sources[0][3]}" + "".join(f" (or {s[3]})" for s in sources[1:])) if hf else sources[0][1]
    where = f"the Hugging Face cache ({hub.HF_HUB_CACHE})" if hf else f"its cache ({sources[0][2]})"
    fix = ("download them on a machine with network"
           + (f" (`hf download {sources[0][1]} {sources[0][3]}`) and copy that Hugging Face cache here" if hf
              else f" to {sources[0][2]}")
           + f", or pass a local weight file: {spec.family}:{spec.model}:FILE")
    head = f"teacher '{spec.name}' ({_spec_text(spec)}): its weights {name} are not in {where}"
    if hf and _hub_offline():
        raise TeacherSpecError(f"{head} and HF_HUB_OFFLINE is set; {fix}")
    for source in sources:
        try:
            if probe(source, timeout):
                return
        except Exception as e:  # noqa: BLE001 - unreachable, timed out or refused (gated, private): one line
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            host = "the Hugging Face hub" if hf else "its server"
            answered = getattr(e, "response", None) is not None or hasattr(e, "code")  # an HTTP error status
            raise TeacherSpecError(f"{head} and {host} {'refuses them' if answered else 'cannot be reached'} "
                                   f"({reason}); {fix}") from None
    raise TeacherSpecError(f"{head} and {'the hub' if hf else 'its server'} does not have them either; {fix}")


def identity(spec: TeacherSpec) -> dict:
    """Stable identity of a teacher: what must match for two stores to hold the same targets."""
    ident = {"family": spec.family, "model": spec.model, "weights": spec.weights,
             "resolution": spec.resolution, "random_init": spec.random_init, "preset": spec.preset, "model_kwargs": dict(spec.model_kwargs)}
    if spec.family in ("sam", "sam2", "sam3"):
        ident["spatial"] = spec.sam_spatial
    if spec.tiles > 1:  # absent otherwise: untiled stores keep their identity
        ident["tiles"] = spec.tiles
    if _is_file(spec.weights):
        ident["weights"] = Path(spec.weights).name
        ident["sha256"] = sha256_file(Path(spec.weights).expanduser())
    elif spec.family == "sam3" and Path(spec.model).expanduser().is_dir():  # a save_pretrained folder
        h = hashlib.sha256()
        for f in sorted(Path(spec.model).expanduser().glob("*.safetensors")):
            h.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
        ident["sha256"] = h.hexdigest()
    return ident


def weight_files(specs) -> dict[str, str]:
    """{teacher: absolute path} of the specs that load a local weight file (what a build records beside
    the identities, so the files can be found again without asking)."""
    return {s.name: str(Path(s.weights).expanduser().resolve()) for s in specs if _is_file(s.weights)}


def locate_weights(ident: dict, recorded: str | None = None) -> tuple[Path | None, list[str]]:
    """The weight file a stored teacher was built from, found without asking: at the path its build
    recorded (`recorded`, from the store's `weight_files`), or for the toy preset under its file name in
    `cache/toy/` — only where the file still has the identity's sha256.

    Returns:
        (the file or None, the places looked at that failed, each 'PATH (missing|changed)'); (None, [])
        when the identity names no weight file.
    """
    if not ident.get("sha256"):
        return None, []
    candidates = [Path(recorded)] if recorded else []
    if ident.get("preset") == "toy" and ident.get("weights"):
        candidates.append(TOY_DIR / ident["weights"])
    tried = []
    for path in dict.fromkeys(candidates):
        if path.is_file() and sha256_file(path) == ident["sha256"]:
            return path, tried
        tried.append(f"{path} ({'changed' if path.is_file() else 'missing'})")
    return None, tried


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(partial(f.read, 1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class Teacher(nn.Module):
    """A frozen teacher: `forward(x)` maps (B, 3, R, R) normalised pixels to (summary (B, D) | None,
    spatial (B, h, w, C)), in float32. `patch`: input pixels per grid cell (a Fraction for SAM 3's s0: 7/2)."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, *, resolution: int, mean, std, patch: int | Fraction):
        super().__init__()
        self.spec, self.model, self.resolution, self.patch = spec, model, resolution, patch
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if resolution % patch:
            raise TeacherSpecError(f"teacher '{spec.name}': resolution {resolution} is not a multiple "
                                   f"of its patch size {patch}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        raise NotImplementedError

    def info(self) -> TeacherInfo:
        x = torch.zeros(1, 3, self.resolution, self.resolution, device=next(self.parameters()).device)
        with torch.inference_mode():
            summary, spatial = self(x)
        return TeacherInfo(resolution=self.resolution, mean=self.mean,
                           std=self.std, grid=tuple(spatial.shape[1:3]),
                           summary_dim=None if summary is None else summary.shape[-1],
                           spatial_dim=spatial.shape[-1])


class ClipTeacher(Teacher):
    """Summary: the pooled, projected (text-aligned) embedding, `encode_image` unnormalised. Spatial:
    trunk tokens after ln_post; for a timm image tower (SigLIP...), its patch tokens after its final
    norm (open_clip returns only the pooled output of those, so the trunk is called here)."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, *, timm_tower: bool, **kwargs):
        super().__init__(spec, model, **kwargs)
        self.timm_tower = timm_tower

    def forward(self, x):
        visual = self.model.visual
        if self.timm_tower:
            tokens = visual.trunk.forward_features(x)  # (B, prefix + h * w, C)
            pooled = visual.head(visual.trunk.forward_head(tokens))
            tokens = tokens[:, visual.trunk.num_prefix_tokens:]
        else:
            pooled, tokens = visual(x)
        h = w = x.shape[-1] // self.patch
        return pooled.float(), tokens.float().reshape(x.shape[0], h, w, -1)


class TimmTeacher(Teacher):
    """Summary: the pooled pre-logits feature (`forward_head(forward_features(x), pre_logits=True)`:
    SigLIP's attention pool, an average or the CLS token, as the model's `global_pool` says).
    Spatial: the patch tokens of `forward_features`, prefix tokens (CLS, registers) dropped."""

    def forward(self, x):
        tokens = self.model.forward_features(x)  # (B, prefix + h * w, C)
        h = w = x.shape[-1] // self.patch
        summary = self.model.forward_head(tokens, pre_logits=True)
        patches = tokens[:, self.model.num_prefix_tokens:]
        return summary.float(), patches.float().reshape(x.shape[0], h, w, -1)


class Dinov2Teacher(Teacher):
    """Summary: the normed CLS token. Spatial: normed patch tokens, registers dropped."""

    def forward(self, x):
        tokens = self.model.forward_features(x)
        h = w = x.shape[-1] // self.patch
        patches = tokens[:, self.model.num_prefix_tokens:]
        return tokens[:, 0].float(), patches.float().reshape(x.shape[0], h, w, -1)


class SamTeacher(Teacher):
    """No summary. Spatial: the image encoder's neck output (256 channels), or its pre-neck tokens.

    Runs in micro-batches: a global-attention block's position bias is (B, heads, N, N), 0.5 GB
    per image for SAM-H at 1024 px, so a build batch of 64 would need 34 GB for it alone.
    """

    micro_batch = 8

    def forward(self, x):
        if len(x) > self.micro_batch:
            outs = [self(chunk)[1] for chunk in x.split(self.micro_batch)]
            return None, torch.cat(outs)
        enc = self.model.image_encoder
        if self.spec.sam_spatial == "neck":
            return None, enc(x).permute(0, 2, 3, 1).float()
        x = enc.patch_embed(x)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for blk in enc.blocks:
            x = blk(x)
        return None, x.float()


class Sam2Teacher(Teacher):
    """No summary. Spatial: the feature level `spec.sam_spatial` of `SAM2ImagePredictor.set_image` (see
    `SAM_LEVELS`): the image embedding (the last FPN level plus `no_mem_embed`) or a high-resolution level
    (already through the mask decoder's conv_s1 / conv_s0 where the model reads them)."""

    def forward(self, x):
        m = self.model
        _, feats, _, sizes = m._prepare_backbone_features(m.forward_image(x))  # per level (h * w, B, C)
        if m.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + m.no_mem_embed
        level = SAM_LEVELS[self.spec.sam_spatial]
        return None, feats[level].permute(1, 0, 2).reshape(len(x), *sizes[level], -1).float()


class Sam3Teacher(Teacher):
    """No summary. Spatial: the feature level `spec.sam_spatial` of `Sam3TrackerModel.get_image_embeddings`:
    the image embedding its point-prompt mask decoder reads (the tracker neck's stride-14 level plus its
    no-memory embedding) or a high-resolution level (s1, s0 at strides 7 and 3.5, after conv_s1 / conv_s0)."""

    def forward(self, x):
        return None, self.model.get_image_embeddings(x)[SAM_LEVELS[self.spec.sam_spatial]].permute(0, 2, 3, 1).float()


def tile_layout(resolution: int, patch: int, tiles: int) -> tuple[int, int, list[int]]:
    """(canvas side, overlap, tile offsets) in px of `tiles` x `tiles` tiles of side `resolution` on a square canvas:
    neighbours overlap by about an eighth of a tile, in whole patches (at least one), so every tile's tokens
    fall on the canvas's token grid."""
    overlap = max(1, round(resolution / patch / 8)) * patch
    overlap += patch * (overlap % 1 != 0)  # a cell of 3.5 px (SAM 3's s0): an even number of cells, whole pixels
    stride = int(resolution - overlap)
    return resolution + (tiles - 1) * stride, int(overlap), [k * stride for k in range(tiles)]


class TiledTeacher(Teacher):
    """A base teacher's map at about K x its grid, paid once in the build (K x K + 1 forwards a view).

    Input: the view at the canvas side (`tile_layout`). Spatial: the base teacher on each tile, at its own
    side, placed at the tile's token offset; where tiles overlap, their maps are blended with weights falling
    linearly to the tile's edges, so seams have no steps. Summary: the base teacher's on the whole view resized
    to its side (None when it has none)."""

    def __init__(self, spec: TeacherSpec, base: Teacher):
        canvas, self.overlap, self.offsets = tile_layout(base.resolution, base.patch, spec.tiles)
        super().__init__(spec, base.model, resolution=canvas, mean=base.mean, std=base.std, patch=base.patch)
        self.base = base
        g, o = base.resolution // base.patch, self.overlap // base.patch
        ramp = torch.minimum(torch.arange(1, g + 1), torch.arange(g, 0, -1)).clamp(max=o + 1) / (o + 1)
        self.register_buffer("weight", ramp[:, None] * ramp[None, :], persistent=False)  # (g, g)

    def info(self) -> TeacherInfo:
        return replace(super().info(), tiles={"tiles": self.spec.tiles, "overlap": self.overlap, "boxes": self.boxes()})

    def boxes(self) -> list[list[float]]:
        """Each tile's box (x0, y0, x1, y1) in fractions of the view, row by row."""
        r, c = self.base.resolution, self.resolution
        return [[j / c, i / c, (j + r) / c, (i + r) / c] for i in self.offsets for j in self.offsets]

    def forward(self, x):
        r, p = self.base.resolution, self.patch
        g, side = r // p, self.resolution // p
        total, weights, summary = None, torch.zeros(side, side, device=x.device), None
        for i in self.offsets:
            for j in self.offsets:
                summary, tile = self.base(x[..., i:i + r, j:j + r])  # (B, g, g, C)
                if total is None:
                    total = tile.new_zeros(len(x), side, side, tile.shape[-1])
                rows, cols = slice(i // p, i // p + g), slice(j // p, j // p + g)
                total[:, rows, cols] += tile * self.weight[..., None]
                weights[rows, cols] += self.weight
        if summary is not None:
            small = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
            summary = self.base(small)[0]
        return summary, total / weights[..., None]


def register_toy_models() -> None:
    """Make the toy preset's timm models (`cache/toy/models.py`) known to timm by name."""
    from .toy import models  # noqa: F401  (registers at import)


def register_model_configs() -> None:
    """Make our open_clip configs (tiny and toy presets) known to open_clip by name."""
    import open_clip
    register_toy_models()  # the toy CLIP's image tower is one of them
    if not {TINY_CLIP, TOY_CLIP} <= set(open_clip.list_models()):
        open_clip.add_model_config(_MODEL_CONFIGS)


def build_clip(spec: TeacherSpec) -> Teacher:
    import open_clip
    register_model_configs()
    kwargs = {"force_image_size": spec.resolution} if spec.resolution else {}
    if spec.weights and not _is_file(spec.weights):  # e.g. OpenAI weights were trained with QuickGELU
        kwargs["force_quick_gelu"] = open_clip.get_pretrained_cfg(spec.model, spec.weights).get("quick_gelu", False)
    root = logging.getLogger()
    level = root.level
    if spec.random_init:  # random weights are the point; open_clip would warn on every worker that none loaded
        root.setLevel(logging.ERROR)
    try:
        # on the default device, like the other builders: `grid` builds on the meta device
        model = open_clip.create_model(spec.model, pretrained=spec.weights, device=torch.get_default_device(), **kwargs)
    finally:
        root.setLevel(level)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    resolution = size if isinstance(size, int) else size[0]
    visual = model.visual
    timm_tower = isinstance(visual, open_clip.timm_model.TimmModel)
    if timm_tower and not hasattr(visual.trunk, "num_prefix_tokens"):
        raise TeacherSpecError(f"teacher '{spec.name}': open_clip model '{spec.model}' has a timm image tower "
                               f"without patch tokens ({type(visual.trunk).__name__})")
    visual.output_tokens = True  # open_clip's own ViT returns (pooled, tokens); a timm tower ignores it
    return ClipTeacher(spec, model, timm_tower=timm_tower, resolution=resolution, mean=cfg["mean"], std=cfg["std"],
                       patch=(visual.trunk.patch_embed if timm_tower else visual).patch_size[0])


def _timm_teacher(spec: TeacherSpec, cls: type) -> Teacher:
    """A timm model as users load it: pretrained by the tag in its name, or from a local file, or random-init."""
    import timm
    register_toy_models()
    kwargs = dict(spec.model_kwargs)
    if spec.resolution:
        kwargs["img_size"] = spec.resolution
    if spec.weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(Path(spec.weights).expanduser())}
    pretrained = not spec.random_init or spec.weights is not None
    model = timm.create_model(spec.model, pretrained=pretrained, num_classes=0, **kwargs)
    cfg = model.pretrained_cfg
    return cls(spec, model, resolution=model.patch_embed.img_size[0], mean=cfg["mean"], std=cfg["std"],
               patch=model.patch_embed.patch_size[0])


def build_dinov2(spec: TeacherSpec) -> Teacher:
    return _timm_teacher(spec, Dinov2Teacher)


def build_timm(spec: TeacherSpec) -> Teacher:
    return _timm_teacher(spec, TimmTeacher)


def _small_sam(*, dim: int, size: int, patch: int, depth: int, embed_dim: int, heads: int, window: int,
               decoder_depth: int, checkpoint: str | None):
    """segment_anything's `_build_sam` at small sizes; the last encoder block attends globally."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=depth, embed_dim=embed_dim, img_size=size, mlp_ratio=4,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=patch,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=[depth - 1],
                                      window_size=window, out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=dim, mlp_dim=2 * dim,
                                                               num_heads=2),
                                 transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    if checkpoint is not None:
        sam.load_state_dict(load_weights(checkpoint))
    return sam


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch checkpoint (tensors only), on the CPU."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    with open(path, "rb") as f:
        return torch.load(f, weights_only=True, map_location="cpu")


def build_tiny_sam(checkpoint: str | None = None):
    """segment_anything's `_build_sam` at toy sizes: 64 px input, 8 px patches, 32 channels."""
    return _small_sam(dim=32, size=64, patch=8, depth=2, embed_dim=32, heads=2, window=4, decoder_depth=1,
                      checkpoint=checkpoint)


def build_toy_sam(checkpoint: str | None = None):
    """The toy preset's SAM: 128 px input, 8 px patches (a 16 x 16 grid) embedded by a conv stem
    (`cache/toy/models.py`), 64 channels, 3 encoder blocks."""
    from .toy.models import replace_sam_stem
    sam = _small_sam(dim=64, size=128, patch=8, depth=3, embed_dim=64, heads=2, window=8, decoder_depth=2,
                     checkpoint=None)
    replace_sam_stem(sam)
    if checkpoint is not None:
        sam.load_state_dict(load_weights(checkpoint))
    return sam


@lru_cache(maxsize=1)
def _sdpa_attention() -> type:
    """segment_anything's image-encoder attention, computed by SDPA with the decomposed relative
    position bias as an additive mask: same weights, same maths, a fused kernel instead of an
    explicit softmax(q kᵀ) (see bench/teachers.py for speed and cosine to stock)."""
    from segment_anything.modeling.image_encoder import Attention, get_rel_pos

    class SdpaAttention(Attention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
            B, H, W, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, nh, N, hd)
            bias = None
            if self.use_rel_pos:
                r_q = q.reshape(B * self.num_heads, H, W, -1)
                rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(H, H, self.rel_pos_h).to(q.dtype))
                rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(W, W, self.rel_pos_w).to(q.dtype))
                bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, self.num_heads, H * W, H * W)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, N, hd)
            return self.proj(x.transpose(1, 2).reshape(B, H, W, -1))

    return SdpaAttention


def use_sdpa(sam) -> None:
    """Switch every attention of a segment_anything image encoder to SDPA, in place."""
    for blk in sam.image_encoder.blocks:
        blk.attn.__class__ = _sdpa_attention()


def _sam_builders() -> dict:
    from segment_anything import sam_model_registry
    return {**sam_model_registry, "tiny": build_tiny_sam, "toy": build_toy_sam}


def build_sam(spec: TeacherSpec) -> Teacher:
    weights = str(Path(spec.weights).expanduser()) if spec.weights else None
    sam = _sam_builders()[spec.model](checkpoint=weights)
    use_sdpa(sam)
    enc = sam.image_encoder
    if spec.resolution not in (None, enc.img_size):
        raise TeacherSpecError(f"teacher '{spec.name}': SAM '{spec.model}' runs at {enc.img_size} px only, "
                               f"not {spec.resolution}")
    return SamTeacher(spec, sam, resolution=enc.img_size, mean=(sam.pixel_mean / 255).flatten().tolist(),
                      std=(sam.pixel_std / 255).flatten().tolist(), patch=enc.img_size // enc.pos_embed.shape[1])


SAM2_EXAMPLE = "configs/sam2.1/sam2.1_hiera_l.yaml"
# `sam2:tiny`: SAM 2.1 Hiera-T's config at toy sizes (hydra overrides, as `build_sam2` takes them): 128 px input,
# a 5-block Hiera of width 8, 32 channels (an 8 x 8 image embedding); the video memory shrunk to match
SAM2_TINY = ("configs/sam2.1/sam2.1_hiera_t.yaml", (
    "++model.image_size=128", "++model.image_encoder.trunk.embed_dim=8", "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.d_model=32", "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.memory_attention.d_model=32", "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32", "++model.memory_attention.layer.dim_feedforward=32",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16", "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.position_encoding.num_pos_feats=16", "++model.memory_encoder.fuser.layer.dim=32",
    "++model.memory_encoder.fuser.num_layers=1"))


@lru_cache(maxsize=1)
def _sam2_configs() -> tuple[str, ...]:
    """The hydra config names `build_sam2` knows (the sam2 package's), and `tiny`."""
    import sam2
    root = Path(sam2.__file__).parent
    names = [p.relative_to(root).as_posix() for p in (*root.glob("*.yaml"), *root.glob("configs/sam2*/*.yaml"))]
    return ("tiny", *sorted(names))


def _sam2_config(spec: TeacherSpec):
    """The resolved hydra config `build_sam2` instantiates for `spec` (without its post-processing overrides)."""
    import sam2  # noqa: F401 - its import points hydra at its configs, as build_sam2 relies on
    from hydra import compose
    from omegaconf import OmegaConf
    config, overrides = SAM2_TINY if spec.model == "tiny" else (spec.model, ())
    cfg = compose(config_name=config, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def _check_side(spec: TeacherSpec, label: str, side: int) -> None:
    if spec.resolution not in (None, side):
        raise TeacherSpecError(f"teacher '{spec.name}': {label} '{spec.model}' runs at {side} px only, "
                               f"not {spec.resolution}")


def build_sam2(spec: TeacherSpec) -> Teacher:
    """SAM 2 as users load it: `sam2.build_sam.build_sam2(config, checkpoint)` (`sam2:tiny`: toy-size overrides)."""
    from sam2.build_sam import build_sam2 as sam2_build
    from sam2.utils.transforms import SAM2Transforms

    config, overrides = SAM2_TINY if spec.model == "tiny" else (spec.model, ())
    model = sam2_build(config, str(Path(spec.weights).expanduser()) if spec.weights else None,
                       device=torch.get_default_device(), hydra_overrides_extra=list(overrides))
    _check_side(spec, "SAM 2", model.image_size)
    norm = SAM2Transforms(model.image_size, mask_threshold=0.0)
    stride = model.backbone_stride // 2 ** (2 - SAM_LEVELS[spec.sam_spatial])
    return Sam2Teacher(spec, model, resolution=model.image_size, mean=norm.mean, std=norm.std, patch=stride)


def tiny_sam3_config():
    """transformers' `Sam3TrackerConfig` at toy sizes: 112 px input, 14 px patches (an 8 x 8 embedding),
    a 2-block ViT of width 32, 32 channels."""
    from transformers import Sam3TrackerConfig
    return Sam3TrackerConfig(
        vision_config=dict(model_type="sam3_vision_model", fpn_hidden_size=32, scale_factors=[4.0, 2.0, 1.0],
                           backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
                           backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, image_size=112,
                                                patch_size=14, window_size=4, global_attn_indexes=[1],
                                                pretrain_image_size=56)),
        prompt_encoder_config=dict(hidden_size=32, image_size=112, patch_size=14, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=32))


def build_sam3(spec: TeacherSpec) -> Teacher:
    """SAM 3 as transformers users load it: `Sam3TrackerModel.from_pretrained(hub id or folder)`, the model
    with SAM 3's point-prompt mask decoder (`sam3:tiny`: `tiny_sam3_config`, seeded)."""
    from transformers import Sam3TrackerConfig, Sam3TrackerModel
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

    source = str(Path(spec.model).expanduser()) if Path(spec.model).expanduser().is_dir() else spec.model
    try:
        if spec.model == "tiny":
            model = Sam3TrackerModel(tiny_sam3_config())
        elif spec.random_init:
            model = Sam3TrackerModel(Sam3TrackerConfig.from_pretrained(source))
        else:
            model = Sam3TrackerModel.from_pretrained(source)
    except OSError as e:  # not cached and the hub unreachable (offline), gated or unknown: one line
        reason = " ".join(str(e).split())[:200]
        raise TeacherSpecError(f"teacher '{spec.name}': SAM 3 model '{spec.model}' cannot be loaded ({reason}); "
                               f"download it on a machine with network (`hf download {spec.model}`) and copy that "
                               "Hugging Face cache here, or pass a save_pretrained folder") from None
    vit = model.config.vision_config.backbone_config
    side = vit.image_size if isinstance(vit.image_size, int) else vit.image_size[0]
    _check_side(spec, "SAM 3", side)
    patch = vit.patch_size if isinstance(vit.patch_size, int) else vit.patch_size[0]
    stride = Fraction(patch, 2 ** (2 - SAM_LEVELS[spec.sam_spatial]))  # s0 of 14 px patches: 3.5 px per cell
    # the mean and std of its image processor (Sam3ImageProcessor's defaults)
    return Sam3Teacher(spec, model, resolution=side, mean=IMAGENET_STANDARD_MEAN, std=IMAGENET_STANDARD_STD,
                       patch=int(stride) if stride.denominator == 1 else stride)


TEACHERS = {"clip": build_clip, "dinov2": build_dinov2, "sam": build_sam, "sam2": build_sam2, "sam3": build_sam3,
            "timm": build_timm}


def grid(spec: TeacherSpec) -> tuple[int, int]:
    """The teacher's (h, w) spatial grid from its architecture alone: built on the meta device, without
    weights or memory, so that settings depending on it are checked before any work."""
    if spec.family == "sam2":  # Hiera's init calls .item(), which the meta device refuses: read its config
        model = _sam2_config(spec).model
        _check_side(spec, "SAM 2", model.image_size)
        side = model.image_size // (model.get("backbone_stride", 16) // 2 ** (2 - SAM_LEVELS[spec.sam_spatial]))
        return side, side
    with torch.device("meta"):
        teacher = _build(replace(spec, weights=None, random_init=True))
    side = teacher.resolution // teacher.patch
    return side, side


def _build(spec: TeacherSpec, base: Teacher | None = None) -> Teacher:
    if spec.tiles == 1:
        return TEACHERS[spec.family](spec)
    return TiledTeacher(spec, base or TEACHERS[spec.family](replace(spec, tiles=1)))


def build_teacher(spec: TeacherSpec, *, device: str | torch.device = "cpu", base: Teacher | None = None) -> Teacher:
    """Load a teacher by its library, frozen, in eval mode, on `device`. Tiny teachers are seeded.
    A tiled spec wraps `base` (the same model, already loaded) when given, else loads its own."""
    check_spec(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = _build(spec, base)
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


def build_teachers(specs, *, device: str | torch.device = "cpu") -> dict[str, Teacher]:
    """{name: teacher} of `specs`; a tiled entry shares the model of its global one (loaded once)."""
    teachers = {s.name: build_teacher(s, device=device) for s in specs if s.tiles == 1}
    for s in specs:
        if s.tiles > 1:
            base = next((t for t in teachers.values() if t.spec == replace(s, name=t.spec.name, tiles=1)), None)
            teachers[s.name] = build_teacher(s, device=device, base=base)
    return {s.name: teachers[s.name] for s in specs}
