"""Evaluation settings: command-line values become one frozen `EvalConfig`."""

from dataclasses import dataclass
from pathlib import Path

from ..errors import RadioDistillError
from ..train.config import check_fields, check_option

MAX_THROUGHPUT_BATCH = 4096  # images/s stop growing long before; a typo of 10 million would ask for terabytes


@dataclass(frozen=True)
class EvalConfig:
    store: str | Path  # the store the run was trained from: a folder or an s3:// URL
    run: Path  # a `radio-train` run folder (run.json, student/, metrics.csv)
    out: Path  # where report.md, report.json, features.png and curves.png go
    masks: Path | None = None  # mask folder; default <images root>/../masks when it exists
    instances: Path | None = None  # instance-mask folder (SAM's ground truth); default <images root>/../instances
    resolution: int | None = None  # student input side; default the run's (the largest of a multi-resolution run's)
    resolutions: tuple[int, ...] = ()  # fidelity at each of these sides too (same views); default a multi-res run's
    max_bank: int = 10000  # train-split samples in the kNN bank (a seeded subset when more)
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_images: int = 500  # images per split for the dense probe (a seeded subset when more)
    probe_steps: int = 300  # full-batch AdamW steps of each linear probe
    pictures: int = 4  # held-out images in features.png (and in sam_masks.png, of those with objects)
    batch_size: int = 64
    workers: int = 2  # DataLoader processes (spawned); 0 reads in this process
    device: str | None = None  # default: cuda if available, else cpu
    throughput: bool = True
    throughput_batch: int | None = None  # default 64 on CUDA, 4 on CPU
    throughput_seconds: float | None = None  # timed seconds per model; default 2 on CUDA, 0.5 on CPU
    seed: int = 0  # of the bank / probe subsets
    images: Path | None = None  # the image folder, when it moved since the build; default: the store's root
    sam: bool = True  # SAM mask agreement, where the store has a SAM teacher (neck target)
    sam_checkpoint: Path | None = None  # the SAM teacher's checkpoint (its decoder); the tiny preset needs none
    sam_images: int = 200  # held-out images of the SAM metric (a seeded subset when more)

    def __post_init__(self):
        check_fields(self, _RULES, optional=_OPTIONAL, options=_OPTIONS)
        for side in self.resolutions:
            check_option("--resolutions", side, "count")
        if (self.throughput_batch or 0) > MAX_THROUGHPUT_BATCH:
            raise RadioDistillError(f"--throughput-batch {self.throughput_batch}: at most {MAX_THROUGHPUT_BATCH}")


_RULES = {"resolution": "count", "max_bank": "count", "knn_k": "count", "knn_temperature": "positive",
          "probe_images": "count", "probe_steps": "count", "pictures": "count", "batch_size": "count",
          "workers": "index", "throughput_batch": "count", "throughput_seconds": "positive", "seed": "index",
          "sam_images": "count"}
_OPTIONAL = {"resolution", "throughput_batch", "throughput_seconds"}
_OPTIONS = {"knn_k": "--k", "knn_temperature": "knn_temperature", "throughput_seconds": "throughput_seconds"}
