"""`radio-train --ray-workers N`: the same `train(cfg)` on Ray Train workers, across machines.

The driver often has no GPU (a head node, a laptop); the workers do. So the driver checks only what it can
see, the form of --device and the cluster's resources, and the device itself is checked where the workers
run: a probe on a GPU of the cluster before Ray Train starts, then each worker on the GPU Ray gave it.
"""

import os
from dataclasses import replace
from pathlib import Path

from .._ray import check_address, check_room, error_line
from ..errors import RadioDistillError
from ..ops import autocast_environment, check_device, parse_device


def train_on_ray(cfg, *, workers: int, address: str | None = None) -> None:
    """Run `train(cfg)` on `workers` Ray Train workers: one GPU each with --device cuda, or by default when the
    cluster has GPUs; CPU workers with --device cpu, or on a cluster without GPUs.

    Every node must see the images and `cfg.out` at the same paths (a shared filesystem), and the store
    there or on S3: rank 0 writes checkpoints and metrics there. The workers get this process's S3 and
    autocast settings, which workers on other nodes do not inherit."""
    import ray
    from ray.train import ControllerError, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    from ..store.group import open_store
    from ..store.location import s3_environment
    from .config import check_option
    from .loop import train

    check_option("--ray-workers", workers, "count")
    check_address(address)
    device = parse_device(cfg.device) if cfg.device is not None else None
    if device is not None and device.index is not None:  # cuda:1 would not exist beside a worker's one GPU
        raise RadioDistillError(f"--device {cfg.device} with --ray-workers: each worker trains on the GPU Ray gives "
                                "it; give --device cuda")
    open_store(cfg.store)  # a missing store or refused S3 credentials: one line here, before Ray starts
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="ERROR")
    use_gpu = wants_gpu(device, ray.cluster_resources().get("GPU", 0))
    scaling = ScalingConfig(num_workers=workers, use_gpu=use_gpu)
    # Ray started here cannot grow: workers it cannot place would be waited for forever
    check_room(scaling.total_resources, ray.cluster_resources(),
               asked=f"--ray-workers {workers}" + (" --device cuda" if device is not None and use_gpu else ""),
               may_grow=address is not None)
    if use_gpu:  # before Ray Train, whose NCCL group on a GPU-less worker fails with a traceback
        problem = ray.get(ray.remote(_device_problem).options(num_gpus=1, num_cpus=0).remote("cuda"))
        if problem:
            raise RadioDistillError(problem)
    store = cfg.store.resolve() if isinstance(cfg.store, Path) else cfg.store  # an s3:// URL is absolute already
    cfg = replace(cfg, store=store, out=cfg.out.resolve(), device="cuda" if use_gpu else "cpu")  # workers start elsewhere
    env = {**s3_environment(), **autocast_environment()}

    def loop() -> None:
        import torch

        os.environ.update(env)
        here = cfg
        if use_gpu and torch.cuda.is_available():  # the GPU Ray gave this worker, as Ray Train maps it
            import ray.train.torch

            here = replace(cfg, device=str(ray.train.torch.get_device()))
        train(here)

    trainer = TorchTrainer(loop, scaling_config=scaling,
                           run_config=RunConfig(storage_path=str(cfg.out / "ray"), name="train"))
    try:
        trainer.fit()
    except WorkerGroupError as e:  # the first rank's own error, as one line
        rank = min(e.worker_failures)
        cause = getattr(e.worker_failures[rank], "cause", None) or e.worker_failures[rank]  # inside RayTaskError
        what = str(cause) if isinstance(cause, RadioDistillError) else f"{type(cause).__name__}: {cause}"
        raise RadioDistillError(f"Ray Train worker {rank} failed: {what.splitlines()[0] if what else ''}") from None
    except ControllerError as e:  # the workers could not start (their process group, placement): Ray's traceback
        raise RadioDistillError(f"Ray Train workers could not start: {error_line(e.controller_failure)}") from None


def wants_gpu(device, cluster_gpus: float) -> bool:
    """Whether each Ray Train worker takes a GPU: with --device cuda, or by default (`device` None) when the
    cluster has GPUs; --device cpu never takes one (a GPU held idle, and Ray Train's NCCL group for CPU tensors)."""
    return device.type == "cuda" if device is not None else cluster_gpus > 0


def _device_problem(device: str) -> str | None:
    """Run as a Ray task on a GPU of the cluster: why `device` cannot train there (one line), or None."""
    import ray

    gpus = ",".join(map(str, ray.get_gpu_ids())) or "none"
    where = (f"on Ray node {ray.util.get_node_ip_address()} to a task Ray gave GPU {gpus} "
             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    try:
        check_device(device, where=where, fix="Ray lists a GPU there that CUDA cannot open: check the node's "
                                              "driver and torch build, or train with --device cpu")
    except RadioDistillError as e:
        return str(e)
    return None
