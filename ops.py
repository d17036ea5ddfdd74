"""Tensor steps every stage shares (build, training, evaluation, benchmarks), written once.

Here rather than in a sub-package: `cache/` never imports `train/`, `student/` knows nothing of
`cache/`, and all of them normalise pixels, run under the same autocast and check `--device` alike.

Letters: B batch, R side in pixels.
"""

import functools
import os

import torch

from .errors import RadioDistillError


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, R, R) pixels in 0..255 (uint8 or float) -> new float32 (x / 255 - mean) / std per channel.

    Args:
        mean, std: 3 floats each, of the model the pixels feed (teacher or student).
    """
    m, s = _channel_stats(tuple(mean), tuple(std), pixels.device)
    return (pixels.float() / 255).sub_(m).div_(s)


@functools.lru_cache(maxsize=64)
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # once per (model, device): a tensor built from Python floats on a GPU is a blocking copy
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


AUTOCAST_ENV = "RADIO_DISTILL_AUTOCAST"  # bf16: on every device (the GPU's numerics, on the CPU); fp32: nowhere
AUTOCAST_MODES = ("auto", "bf16", "fp32")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast every stage runs under on `device`: bf16 on CUDA, none (fp32) on the CPU, unless
    RADIO_DISTILL_AUTOCAST says `bf16` (every device: how the CPU tests run the GPU's precision) or
    `fp32` (no device: a GPU run to compare with)."""
    mode, device = os.environ.get(AUTOCAST_ENV) or "auto", torch.device(device)
    if mode not in AUTOCAST_MODES:
        raise RadioDistillError(f"{AUTOCAST_ENV}={mode!r}: choose from {', '.join(AUTOCAST_MODES)} (unset: auto, "
                                "bf16 on CUDA and fp32 on the CPU)")
    if mode == "fp32" or (mode == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on the CPU a disabled one (fp32), as every stage runs (`autocast_dtype`)."""
    dtype = autocast_dtype(device)
    return torch.autocast(torch.device(device).type, dtype or torch.bfloat16, enabled=dtype is not None)


def autocast_environment() -> dict[str, str]:
    """The autocast setting of this process, for processes Ray starts elsewhere ({} when unset)."""
    mode = os.environ.get(AUTOCAST_ENV)
    return {AUTOCAST_ENV: mode} if mode else {}


def parse_device(device: str | None) -> torch.device:
    """`device` (None: cpu) as a torch device, or one line unless it is cpu, cuda or cuda:N; not checked
    against this machine's GPUs (for a device on other machines: Ray workers)."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise RadioDistillError(f"--device {device!r}: not a device here; use cpu, cuda or cuda:N")
    return dev


def check_device(device: str | None, *, where: str = "here", fix: str = "use --device cpu") -> None:
    """One line, before anything is created, unless `device` is None, cpu, or a CUDA GPU this machine has.

    Args:
        where, fix: where the GPUs were looked for, and what to do when there are none, as the line says them.
    """
    dev = parse_device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise RadioDistillError(f"--device {device}: no CUDA GPU is visible {where}; {fix}")
        if dev.index is not None and dev.index >= count:
            raise RadioDistillError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
