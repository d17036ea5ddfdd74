"""Build settings from a TOML file and/or the command line, turned into a `CacheConfig` at one place.

```toml
data = "images/"            # folder, list file, or tar / Parquet pattern ("shards/{000000..000123}.tar")
out = "cache.zarr"
views = 2
fidelity = 0.99             # optional: every teacher's codecs picked by this budget (mean token cosine)
[[teachers]]
spec = "clip:ViT-L-14:openai@224"
[[teachers]]
spec = "sam:vit_h:/weights/sam_vit_h_4b8939.pth@1024"
spatial = "int8"            # codec of the spatial target: fp16 | int8
pool = 2                    # average-pool the spatial grid by this factor (a divisor of the grid)
sam_spatial = "preneck"     # SAM: neck (default) | preneck; SAM 2, SAM 3: neck | s1 | s0
fidelity = 0.995            # this teacher's budget, instead of codecs
```
`teachers = "tiny"` selects the offline preset. `CacheConfig` is what `build.build_cache` takes.
"""

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .._toml import field_types, read_toml, typed
from ..errors import RadioDistillError
from ..store.location import is_remote
from .teachers import PRESETS, TeacherSpec, parse_teacher, tiled_specs


@dataclass(frozen=True)
class Storage:
    """How one teacher's targets are stored: codec per target, spatial pooling factor. With a `fidelity`
    budget (a mean token cosine) the codecs are 'auto': the calibration pass picks them per target."""

    spatial: str = "int8"
    summary: str = "fp16"
    pool: int = 1
    fidelity: float | None = None

    def settings(self) -> dict:
        """As recorded in the store's settings (no fidelity key without a budget, as before budgets)."""
        return {k: v for k, v in asdict(self).items() if k != "fidelity" or v is not None}


@dataclass(frozen=True)
class CacheConfig:
    data: Path
    out: str | Path  # a folder or an s3:// URL (`location.py`)
    teachers: tuple[TeacherSpec, ...]
    storage: dict[str, Storage] = field(default_factory=dict)  # by teacher name; default Storage()
    views: int = 1
    seed: int = 0
    shard_size: int = 256
    batch_size: int = 64
    workers: int | None = None  # CPU-only runs; with GPUs there is one worker per GPU
    address: str | None = None
    overwrite: bool = False
    max_shards: int | None = None  # stop after this many new shards (a resumable partial build)
    pixels: int | None = None  # also store every view at this side, so training decodes no JPEG
    tar_samples: int | None = None  # tars without sidecars: plan this many rows a tar, not listing them (`sources.py`)



_TEACHER_TYPES = {"spec": str, "sam_spatial": str, **field_types(Storage)}  # the keys of a [[teachers]] entry


def load_cache_config(path: str | Path | None = None, *, teachers: list[str] | str | None = None,
                      spatial_codec: str | None = None, summary_codec: str | None = None,
                      pools: dict[str, int] | None = None, sam_spatial: str | None = None,
                      fidelity: dict[str | None, float] | None = None, **overrides) -> CacheConfig:
    """Merge a TOML file (optional) with command-line values; command-line values win.

    Args:
        teachers: a preset name ("tiny"), or a list of teacher specs like "clip:ViT-L-14:openai@224".
        spatial_codec, summary_codec: codec for every teacher without its own in the file.
        pools: spatial pooling factor by teacher name.
        fidelity: budget by teacher name, key None for every teacher; the teacher's codecs are then picked
            by the calibration pass (`calibrate.choose`) and may not be given too.
        overrides: CacheConfig fields (data, out, views, ...); None means "not given".
    """
    raw = read_toml(path)
    known = {f.name for f in fields(CacheConfig)} - {"teachers", "storage"}
    unknown = set(raw) - known - {"teachers", "fidelity"}
    if unknown:
        raise RadioDistillError(f"config '{path}': unknown keys {sorted(unknown)}; "
                                f"known: {sorted(known | {'teachers', 'fidelity'})}")
    file_types = {**field_types(CacheConfig), "teachers": str | tuple[str | dict, ...], "fidelity": float}
    raw = typed(raw, {k: v for k, v in file_types.items() if k != "storage"}, path=path)
    values = {k: v for k, v in raw.items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("data", "out"):
        if values.get(key) is None:
            raise RadioDistillError(f"missing '{key}': give it on the command line or in the config file")
        values[key] = values[key] if key == "out" and is_remote(values[key]) else Path(values[key])

    entries = teachers if teachers else raw.get("teachers", [])
    specs, storage = [], {}
    if isinstance(entries, str):  # a preset; a single spec comes as a one-element list
        if entries not in PRESETS:
            raise RadioDistillError(f"unknown preset '{entries}'; choose from: {', '.join(PRESETS)} "
                                    "(single teachers go in --teacher SPEC)")
        specs = PRESETS[entries]()
        entries = [{} for _ in specs]
    else:
        entries = [{"spec": e} if isinstance(e, str) else e for e in entries]
        for i, e in enumerate(entries):
            if "spec" not in e or set(e) - set(_TEACHER_TYPES):
                raise RadioDistillError(f"teacher entry {e}: needs 'spec', may have "
                                        f"{sorted(set(_TEACHER_TYPES) - {'spec'})}")
            entries[i] = e = typed(e, _TEACHER_TYPES, path=path, prefix=f"teachers[{i}].")
            specs.append(parse_teacher(e["spec"]))
    pairs = [(s, e) for spec, e in zip(specs, entries) for s in tiled_specs(spec)]  # a tiled spec: two entries
    specs, entries = [s for s, _ in pairs], [e for _, e in pairs]
    fidelity = fidelity or {}
    for i, (spec, e) in enumerate(zip(specs, entries)):
        if spec.family in ("sam", "sam2", "sam3") and (e.get("sam_spatial") or sam_spatial):
            specs[i] = spec = replace(spec, sam_spatial=e.get("sam_spatial") or sam_spatial)
        pool = (pools or {}).get(spec.name, e.get("pool", 1))
        budget = next((b for b in (fidelity.get(spec.name), fidelity.get(None), e.get("fidelity"), raw.get("fidelity"))
                       if b is not None), None)
        codecs = {"spatial": e.get("spatial") or spatial_codec, "summary": e.get("summary") or summary_codec}
        if budget is None:
            storage[spec.name] = Storage(spatial=codecs["spatial"] or "int8", summary=codecs["summary"] or "fp16",
                                         pool=pool)
            continue
        given = [f"{t} codec {c}" for t, c in codecs.items() if c]
        if given:
            raise RadioDistillError(f"teacher '{spec.name}': {given[0]} and fidelity {budget} both given; a fidelity "
                                    "budget picks the codecs: give one or the other")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise RadioDistillError(f"teacher '{spec.name}': fidelity must be a number like 0.99, got {budget!r}")
        storage[spec.name] = Storage(spatial="auto", summary="auto", pool=pool, fidelity=float(budget))
    for option, named in (("--pool", pools or {}), ("--fidelity", {k for k in fidelity if k is not None})):
        unknown_names = set(named) - set(storage)
        if unknown_names:
            raise RadioDistillError(f"{option} names unknown teacher(s) {sorted(unknown_names)}; teachers: {sorted(storage)}")
    return CacheConfig(teachers=tuple(specs), storage=storage, **values)
