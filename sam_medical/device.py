"""The one place a ``--device`` / ``--conf device`` value becomes a :class:`torch.device`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sam_medical.errors import UserInputError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, *, local_rank: int | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as asked.

    ``local_rank``: under DDP, plain ``cuda`` (or ``auto`` on a GPU machine) becomes ``cuda:LOCAL_RANK``.

    Raises:
        UserInputError: another name, or CUDA asked for on a machine without it.
    """
    import torch  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)

    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserInputError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"device {name} was asked for, but no CUDA GPU is available; use cpu or auto")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name)
