"""Training settings: a TOML recipe and/or command-line values, turned into `TrainConfig` at one place.

```toml
store = "cache.zarr"
out = "runs/vit_b"
student = "vit_base_patch16_224"
steps = 20000
batch_size = 256
resolution = 224
lr = 1e-3
[loss]
kind = "phis"                       # amradio | phis
teacher_weights = { sam = 0.5 }
[student_overrides]
num_registers = 4
```
"""

from dataclasses import dataclass, field, fields
from pathlib import Path

from .._toml import read_toml
from ..errors import RadioDistillError
from .losses import KINDS, LossConfig


@dataclass(frozen=True)
class TrainConfig:
    store: Path
    out: Path
    student: str = "vit_small_patch16_224"
    student_overrides: dict = field(default_factory=dict)
    steps: int | None = None  # or epochs; one of them
    epochs: float | None = None
    batch_size: int = 64  # global, over all processes
    resolution: int = 224
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


def load_train_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Merge a TOML recipe (optional) with command-line values (None = not given); the latter win."""
    raw = read_toml(path)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise RadioDistillError(f"config '{path}': unknown keys {sorted(unknown)}; known: {sorted(known)}")
    values = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    loss = dict(raw.get("loss", {}))
    loss.update({k: v for k, v in (overrides.get("loss") or {}).items() if v is not None})
    bad = set(loss) - {f.name for f in fields(LossConfig)}
    if bad:
        raise RadioDistillError(f"unknown loss settings {sorted(bad)}; known: {[f.name for f in fields(LossConfig)]}")
    if loss.get("kind", "amradio") not in KINDS:
        raise RadioDistillError(f"unknown loss '{loss['kind']}'; choose from {', '.join(KINDS)}")
    values["loss"] = LossConfig(**loss)
    for key in ("store", "out"):
        if values.get(key) is None:
            raise RadioDistillError(f"missing '{key}': give it on the command line or in the config file")
        values[key] = Path(values[key])
    if values.get("steps") is None and values.get("epochs") is None:
        raise RadioDistillError("give --steps or --epochs")
    return TrainConfig(**values)
