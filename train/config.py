"""Training settings: a TOML recipe and/or command-line values, turned into `TrainConfig` at one place.

```toml
store = "cache.zarr"
out = "runs/vit_b"
student = "vit_base_patch16_224"
steps = 20000
batch_size = 256
resolution = 224                    # or several, e.g. [224, 384, 512]: see resolution_policy
lr = 1e-3
denoise = "mean"                    # subtract the teachers' fixed patterns (`radio-cache pattern` first), or "shift"
[loss]
kind = "phis"                       # amradio | phis
teacher_weights = { sam = 0.5 }
[upsample]
sam = 2                             # SAM's spatial head draws 2 x 2 tokens per student token
[student_overrides]
num_registers = 4
```

`init = "runs/vit_b"` (`--init`) starts from a trained student; with no `student` given, its student and
overrides are taken.
"""

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from .._toml import field_types, read_toml, typed
from ..errors import RadioDistillError
from ..ops import check_device, parse_device
from ..store.location import check_folder, is_remote
from ..store.reader import DENOISE
from ..student import check_student_name
from ..student.init import init_config
from .losses import KINDS, LossConfig


@dataclass(frozen=True)
class TrainConfig:
    store: str | Path  # a folder, or an s3:// URL (kept a string)
    out: Path
    student: str = "vit_small_patch16_224"
    student_overrides: dict = field(default_factory=dict)
    steps: int | None = None  # or epochs; one of them
    epochs: float | None = None
    batch_size: int | tuple[int, ...] = 64  # global, over all processes; 'partition': one per resolution
    resolution: int | tuple[int | tuple[int, ...], ...] = 224  # student input side, or several (a list of one is
    # that one side); under 'partition' a part may be a set of sides, e.g. [[128, 256, 384], [512, 1024]]: each
    # step draws that part's side from its set (C-RADIOv4's low and high partitions)
    # several resolutions: 'random' draws one per step (seeded by (seed, step): every rank the same);
    # 'partition' splits every step's global batch into one part per resolution (RADIOv2.5's low/high
    # partitions), with its own --batch-size so the high-resolution part's memory stays bounded
    resolution_policy: str = "random"
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # default: 5% of the steps
    grad_clip: float = 1.0
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    holdout: float = 0.05  # fraction of sample ids never trained on (evaluation split)
    workers: int | None = None  # DataLoader processes per training process; default: this process's share of the cores
    log_every: int = 10
    checkpoint_every: int = 500
    allow_partial: bool = False
    resume: bool = False
    stop_at: int | None = None  # end this session after this step (checkpointed); continue with resume
    device: str | None = None  # default: cuda if available, else cpu
    images: Path | None = None  # the image folder, when it moved since the build; default: the store's root
    init: Path | None = None  # start from this trained student (run folder, student folder or its weights file)
    # keeping the teachers' position-fixed artifacts out of the student: 'mean', every spatial target less its
    # teacher's fixed pattern (`radio-cache pattern`); 'shift', the student's view against the teacher's map of
    # another view of the image over their overlap (`shift.py`), so no pattern fixed to the teacher's grid
    # stays put; 'none': the targets as stored
    denoise: str = "none"
    # teacher -> k: its spatial head predicts k x k tokens per student token, for a teacher whose grid is finer
    # than the student's (SAM's 64 x 64 at 1024 px against a student's 28 x 28 at 448): `TeacherDims.upsample`
    upsample: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        check_student_name(self.student)  # names before numbers: a misspelt student is what the user fixes first
        for name in ("resolution", "batch_size"):  # TOML lists and 1-tuples: one form per setting
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                value = tuple(_one_form(v) for v in value)
                object.__setattr__(self, name, value[0] if len(value) == 1 else value)
        # --init with --steps 0 saves the initial student as is (its heads matched to this store's teachers)
        check_fields(self, {**_RULES, "steps": "index"} if self.init is not None else _RULES, optional=_OPTIONAL)
        if self.steps is not None and self.epochs is not None:  # one would be dropped without a word
            raise RadioDistillError(f"--steps {self.steps} and --epochs {self.epochs}: give one of them, not both")
        if self.min_lr > self.lr:  # the cosine would climb from lr to min_lr
            raise RadioDistillError(f"min_lr {self.min_lr} is above --lr {self.lr}: the rate would climb to it; "
                                    "give a min_lr <= lr in the --config recipe")
        for side in self.sides:
            check_option("--resolution", side, "count")
        for size in self.batch_sizes:
            check_option("--batch-size", size, "count")
        if not self.sides or len(set(self.sides)) < len(self.sides):
            raise RadioDistillError(f"--resolution {_listed(self.resolution)}: give one side or several different ones")
        if self.resolution_policy not in POLICIES:
            raise RadioDistillError(f"--resolution-policy {self.resolution_policy!r}: choose from {', '.join(POLICIES)}")
        partition = self.resolution_policy == "partition" and len(self.side_sets) > 1
        if any(isinstance(s, tuple) for s in self.side_sets) and not partition:
            raise RadioDistillError(f"--resolution {_listed(self.resolution)}: sets of sides (a/b) are the parts of "
                                    "--resolution-policy partition, e.g. --resolution 128/256,512/1024 --batch-size 64,16")
        if len(self.batch_sizes) != (len(self.side_sets) if partition else 1):
            raise RadioDistillError(
                f"--batch-size {_listed(self.batch_size)} with --resolution {_listed(self.resolution)}: "
                + ("--resolution-policy partition needs one batch size per resolution, in the same order "
                   "(e.g. --resolution 224,512 --batch-size 64,16)" if partition
                   else "several batch sizes need --resolution-policy partition and one resolution each"))
        if self.denoise not in DENOISE:
            raise RadioDistillError(f"--denoise {self.denoise!r}: choose from {', '.join(DENOISE)}")
        if self.loss.kind not in KINDS:
            raise RadioDistillError(f"unknown loss '{self.loss.kind}'; choose from {', '.join(KINDS)}")
        check_option("[loss] summary_weight", self.loss.summary_weight, "non-negative")
        check_option("[loss] spatial_weight", self.loss.spatial_weight, "non-negative")
        for name, weight in self.loss.teacher_weights.items():
            check_option(f"--teacher-weight {name}", weight, "non-negative", sep="=")
        for name, k in self.upsample.items():
            check_option(f"--upsample {name}", k, "count", sep="=")

    @property
    def side_sets(self) -> tuple[int | tuple[int, ...], ...]:
        """What `resolution` lists: sides, and under 'partition' sets of sides (one per part)."""
        return self.resolution if isinstance(self.resolution, tuple) else (self.resolution,)

    @property
    def sides(self) -> tuple[int, ...]:
        """Every student resolution."""
        return tuple(s for part in self.side_sets for s in (part if isinstance(part, tuple) else (part,)))

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The global batch size, or one per part ('partition')."""
        return self.batch_size if isinstance(self.batch_size, tuple) else (self.batch_size,)


POLICIES = ("random", "partition")


def _one_form(value):
    """A set of sides as a tuple (a set of one: that side)."""
    if isinstance(value, (list, tuple)):
        return tuple(value)[0] if len(value) == 1 else tuple(value)
    return value


def _listed(value) -> str:
    """`resolution` or `batch_size` as the command line spells it: 224,512 or 128/256,512/1024."""
    if not isinstance(value, tuple):
        return str(value)
    return ",".join("/".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)


_RULES = {"steps": "count", "epochs": "positive", "lr": "positive",
          "min_lr": "non-negative", "weight_decay": "non-negative", "warmup_steps": "index", "grad_clip": "positive",
          "seed": "index", "holdout": "fraction", "workers": "index", "log_every": "count",
          "checkpoint_every": "count", "stop_at": "count"}
_OPTIONAL = {"steps", "epochs", "warmup_steps", "workers", "stop_at"}
_WANT = {"count": "a whole number >= 1", "index": "a whole number >= 0", "positive": "a finite number > 0",
         "non-negative": "a finite number >= 0", "fraction": "a fraction in [0, 1)"}


def check_fields(cfg, rules: dict[str, str], *, optional=(), options: dict[str, str] | None = None) -> None:
    """`check_option` on each field of `cfg` named in `rules` (None passes for `optional` fields); the
    option of field `a_b` is `--a-b` unless `options` names it."""
    for name, rule in rules.items():
        value = getattr(cfg, name)
        if value is not None or name not in optional:
            check_option((options or {}).get(name, "--" + name.replace("_", "-")), value, rule)


def check_option(option: str, value, rule: str, *, sep: str = " ") -> None:
    """Raises a one-line error naming `option` unless `value` follows `rule` (a key of `_WANT`)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    integer = isinstance(value, int) and not isinstance(value, bool)
    ok = {"count": integer and value >= 1, "index": integer and value >= 0, "positive": number and value > 0,
          "non-negative": number and value >= 0, "fraction": number and 0 <= value < 1}[rule]
    if not ok:
        raise RadioDistillError(f"{option}{sep}{value!r}: must be {_WANT[rule]}")


def load_train_config(path: str | Path | None = None, *, device_here: bool = True, **overrides) -> TrainConfig:
    """Merge a TOML recipe (optional) with command-line values (None = not given); the latter win.

    `device_here`: training runs on this machine, so its GPUs are what --device is checked against; False
    (--ray-workers): only its form, the Ray workers check it where they run (`on_ray.py`)."""
    raw = read_toml(path)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise RadioDistillError(f"config '{path}': unknown keys {sorted(unknown)}; known: {sorted(known)}")
    raw = typed(raw, field_types(TrainConfig), path=path)
    given = {k: v for k, v in overrides.items() if v is not None}
    if {"steps", "epochs"} & set(given):  # the training's length given here replaces the recipe's
        raw = {k: v for k, v in raw.items() if k not in ("steps", "epochs")}
    values = {**raw, **given}
    loss = dict(raw.get("loss", {}))
    loss.update({k: v for k, v in (overrides.get("loss") or {}).items() if v is not None})
    bad = set(loss) - {f.name for f in fields(LossConfig)}
    if bad:
        raise RadioDistillError(f"unknown loss settings {sorted(bad)}; known: {[f.name for f in fields(LossConfig)]}")
    values["loss"] = LossConfig(**loss)
    for key in ("store", "out"):
        if values.get(key) is None:
            raise RadioDistillError(f"missing '{key}': give it on the command line or in the config file")
        values[key] = values[key] if key == "store" and is_remote(values[key]) else Path(values[key])
    if values.get("images") is not None:
        values["images"] = Path(values["images"])
    if values.get("init") is not None:
        values["init"] = Path(values["init"])
        started = init_config(values["init"])  # its student as it was built, unless another is asked for
        if values.get("student") is None:
            values["student"] = started["student"]
        if values["student"] == started["student"] and "student_overrides" not in values:  # its weights, not timm's
            values["student_overrides"] = {k: v for k, v in started["overrides"].items() if k != "pretrained"}
    if values.get("steps") is None and values.get("epochs") is None:
        raise RadioDistillError("give --steps or --epochs")
    cfg = TrainConfig(**values)
    if device_here:
        check_device(cfg.device)
    else:
        parse_device(cfg.device)
    check_folder(cfg.out, "--out")
    return cfg
