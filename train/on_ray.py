"""`radio-train --ray-workers N`: the same `train(cfg)` on Ray Train workers, across machines."""

import os
from dataclasses import replace
from pathlib import Path

from .._ray import check_address, check_room
from ..errors import RadioDistillError


def train_on_ray(cfg, *, workers: int, address: str | None = None) -> None:
    """Run `train(cfg)` on `workers` Ray Train workers (one per GPU when the cluster has GPUs).

    Every node must see the images and `cfg.out` at the same paths (a shared filesystem), and the store
    there or on S3: rank 0 writes checkpoints and metrics there. The workers get this process's S3
    settings, which workers on other nodes do not inherit."""
    import ray
    from ray.train import RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    from ..store.group import open_store
    from ..store.location import s3_environment
    from .config import check_option
    from .loop import train

    check_option("--ray-workers", workers, "count")
    check_address(address)
    open_store(cfg.store)  # a missing store or refused S3 credentials: one line here, before Ray starts
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="ERROR")
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    scaling = ScalingConfig(num_workers=workers, use_gpu=use_gpu)
    # Ray started here cannot grow: workers it cannot place would be waited for forever
    check_room(scaling.total_resources, ray.cluster_resources(), asked=f"--ray-workers {workers}",
               may_grow=address is not None)
    store = cfg.store.resolve() if isinstance(cfg.store, Path) else cfg.store  # an s3:// URL is absolute already
    cfg = replace(cfg, store=store, out=cfg.out.resolve())  # workers start in other folders
    env = s3_environment()

    def loop() -> None:
        os.environ.update(env)
        train(cfg)

    trainer = TorchTrainer(loop, scaling_config=scaling,
                           run_config=RunConfig(storage_path=str(cfg.out / "ray"), name="train"))
    try:
        trainer.fit()
    except WorkerGroupError as e:  # the first rank's own error, as one line
        rank = min(e.worker_failures)
        cause = getattr(e.worker_failures[rank], "cause", None) or e.worker_failures[rank]  # inside RayTaskError
        what = str(cause) if isinstance(cause, RadioDistillError) else f"{type(cause).__name__}: {cause}"
        raise RadioDistillError(f"Ray Train worker {rank} failed: {what.splitlines()[0] if what else ''}") from None
