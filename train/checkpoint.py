"""Checkpoints without pickle: the student (safetensors + JSON, loadable by `load_student`), the
optimizer's tensors (safetensors) and everything else as JSON. Written to a temporary folder and
swapped in, so a crash mid-save keeps the previous checkpoint."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError
from ..student import load_student, save_student
from ..student.export import CONFIG, WEIGHTS

STUDENT, OPTIMIZER, STATE = "student", "optimizer.safetensors", "state.json"


def save_checkpoint(directory: Path, *, model, optimizer: torch.optim.Optimizer, step: int, run: dict) -> Path:
    """Save everything `--resume` needs to continue exactly after `step` steps.

    Raises:
        TrainingError: the checkpoint cannot be written (a full disk...); the previous one is kept.
    """
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, model=model, optimizer=optimizer, step=step, run=run)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what was written
        last = latest(directory)
        kept = (f"the checkpoint in '{last}' (step {read_state(last)['step']}) is kept" if last
                else "no checkpoint is kept")
        raise TrainingError(f"cannot write the checkpoint of step {step} to '{directory}': {e.strerror or e}; {kept}; "
                            "free space and continue with --resume") from None
    old = directory.with_name(directory.name + ".old")
    if directory.exists() and old.exists():  # a crash after the last swap left both: the newest complete one stays
        shutil.rmtree(old if _complete(directory) else directory)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _write(tmp: Path, *, model, optimizer: torch.optim.Optimizer, step: int, run: dict) -> None:
    """The checkpoint's files, into the new folder `tmp`."""
    tmp.mkdir(parents=True)
    save_student(model, tmp / STUDENT)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():  # this process's device only: a resume may see other GPUs
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps({"step": step, "param_groups": opt["param_groups"],
                                         "optimizer_scalars": scalars, "run": run}, indent=2))


def latest(directory: Path) -> Path | None:
    """The checkpoint folder to resume from: `directory`, or its `.old` twin when a crash hit the swap.

    A crash between the swap's renames leaves only `.old`; after them, both (`.old` perhaps half deleted):
    the first complete one is taken, and the next save removes the other."""
    return next((d for d in (directory, directory.with_name(directory.name + ".old")) if _complete(d)), None)


def _complete(directory: Path) -> bool:
    """Whether every file of a checkpoint is there (`state.json` is written last, but deleted in any order)."""
    return all((directory / f).is_file() for f in (STATE, OPTIMIZER, f"{STUDENT}/{WEIGHTS}", f"{STUDENT}/{CONFIG}"))


def read_state(directory: Path) -> dict:
    return json.loads((directory / STATE).read_text())


def load_checkpoint(directory: Path, *, model, optimizer: torch.optim.Optimizer) -> int:
    """Restore model, optimizer and RNG state in place; returns the step to continue from."""
    state = read_state(directory)
    saved = load_student(directory / STUDENT)
    model.load_state_dict(saved.state_dict())
    tensors = load_file(directory / OPTIMIZER)
    opt_state = {}
    for key, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        if key.startswith("rng."):
            continue
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available() and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state["step"]
