"""What ``sam_2d`` and ``sam_3d`` share: reading the Slicer plugin's request, errors, the answer file.

The request, as 3D Slicer's MONAILabel plugin sends it (``MONAILabel.py``, ``onClickDeepgrow``), merged
by MONAI Label with the model's ``config`` values:

* ``image``: the datastore image's path (MONAI Label resolved the id);
* ``foreground`` / ``background``: ``[[i, j, k], ...]`` voxel indices of the volume as stored (rounded);
  for 2D models only the points of the current slice (all of them when that slice is 0);
* ``roi``: ``[i0, i1, j0, j1, k0, k1]`` (min/max per axis, possibly unordered, possibly outside);
* ``slice``: ``k`` (2D models); ``label``: the segment name; ``reset_state``: may be present (ignored:
  the predictor keeps no per-label state);

The answer's mask holds the segment's value in the datastore's label maps (``liver`` -> 1, ``spleen``
-> 2: the app's ``labels``, see ``lib/settings.py``), and ``label_names`` maps the segment name to it;
Slicer imports the one value of the answer into the clicked segment.
* ``result_extension`` (``.nrrd``) and ``result_dtype`` (``uint8``).

The answer's ``latency`` gives every stage of the request, in seconds: ``parse`` (request and prompt
checks), ``load`` (the volume: read, or a cache hit), ``prepare`` (the window, once per volume),
``wait`` (for the encoder: a background encode is stopped, never waited for), ``canvas``, ``encode``
(0 when the embedding was cached), ``decode`` (the prompt decoder, with any click strategy), ``map_back``
(logits to the label volume), ``write`` (the answer file), ``queue`` (background encodes queued),
``segment`` (the task's work from load to write) and ``total``. MONAI Label's own handling and the
transfer come on top (``bench/click_latency.py`` reports them as ``http``).

A user's mistake raises :class:`fastapi.HTTPException` (422, JSON ``{"detail": "..."}``): MONAI Label's
infer endpoint lets it through to FastAPI, which answers it and keeps serving.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from sam_medical.errors import UserInputError
from sam_medical.volume.io import Volume, write_volume

from ..datastore import name_problem
from ..served_model import ServedModel

logger = logging.getLogger(__name__)

RESULT_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".mha")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")


def user_error(message: str, status: int = 422) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def check_point_count(request: dict[str, Any], limit: int) -> None:
    """Refuse more than ``limit`` foreground + background points in one request (memory and time grow
    with them: 5,000 points once took 7.7 s and 2.9 GB), before any of them is parsed.

    Raises:
        UserInputError: too many points.
    """
    count = sum(
        len(v) for v in (request.get("foreground"), request.get("background")) if isinstance(v, list | tuple)
    )
    if count > limit:
        raise UserInputError(
            f"{count} points in one request; at most {limit} are accepted (--conf max_points)"
        )


def parse_points(value: Any, what: str, shape: tuple[int, int, int]) -> list[tuple[int, int, int | None]]:
    """``[[i, j, k], ...]`` (or ``[i, j]`` pairs: no slice given) -> checked integer tuples.

    Raises:
        UserInputError: malformed, or outside the volume ``(I, J, K)``.
    """
    if value in (None, "", []):
        return []
    if not isinstance(value, list | tuple):
        raise UserInputError(f"{what} must be a list of [i, j, k] points, got {value!r}")
    out = []
    for p in value:
        if not isinstance(p, (list, tuple)) or len(p) not in (2, 3):
            raise UserInputError(f"{what} point {p!r} is not [i, j, k]")
        try:
            nums = [float(v) for v in p]
        except (TypeError, ValueError):
            raise UserInputError(f"{what} point {p!r} holds a value that is not a number") from None
        if not np.isfinite(nums).all():
            raise UserInputError(f"{what} point {p!r} is not finite")
        idx = [int(round(v)) for v in nums]
        for axis, (v, n) in enumerate(zip(idx, shape, strict=False)):
            if not 0 <= v < n:
                raise UserInputError(
                    f"{what} point {list(p)} is outside the volume: index {'ijk'[axis]}={v} must be in 0..{n - 1} "
                    f"(volume size {list(shape)})"
                )
        out.append((idx[0], idx[1], idx[2] if len(idx) == 3 else None))
    return out


def parse_roi(value: Any, shape: tuple[int, int, int]) -> tuple[int, int, int, int, int, int] | None:
    """``[i0, i1, j0, j1, k0, k1]`` -> ordered per axis and clipped to the volume; None when absent.

    Raises:
        UserInputError: malformed, or entirely outside the volume.
    """
    if value in (None, "", []):
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        raise UserInputError(f"roi must be [i0, i1, j0, j1, k0, k1], got {value!r}")
    try:
        nums = [float(v) for v in value]
    except (TypeError, ValueError):
        raise UserInputError(f"roi must hold 6 numbers, got {value!r}") from None
    if not np.isfinite(nums).all():
        raise UserInputError(f"roi must hold finite numbers, got {value!r}")
    out = []
    for axis in range(3):
        lo, hi = sorted(nums[2 * axis : 2 * axis + 2])
        n = shape[axis]
        if hi < 0 or lo > n - 1:
            raise UserInputError(
                f"roi {list(value)} is outside the volume along {'ijk'[axis]} (0..{n - 1}; volume size {list(shape)})"
            )
        out += [int(round(max(lo, 0))), int(round(min(hi, n - 1)))]
    return tuple(out)  # type: ignore[return-value]


def parse_int(value: Any, name: str) -> int:
    try:
        number = float(value)
        out = int(number)
        if out != number:
            raise ValueError
        return out
    except (TypeError, ValueError, OverflowError):
        raise UserInputError(f"{name} must be an integer, got {value!r}") from None


def task_description(served: ServedModel, what: str) -> str:
    """``/info/``'s description of a task: the served model, ``what`` the task does, and its weights note."""
    note = served.weights_note()
    return f"{served.model_line()}, {what}" + (f". {note}" if note else "")


class SamInferTask(InferTask):
    """Base of the SAM infer tasks: request checks, loading (cached), answer file, timings, errors."""

    def __init__(self, served: ServedModel, dimension: int, description: str, config: dict[str, Any]) -> None:
        labels = dict(served.config.labels)  # {name: value}: /info/ lists them, Slicer offers them
        super().__init__(
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=dimension,
            description=description,
            config=config,
        )
        self.served = served

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["sam"] = self.served.describe()
        return out

    def config(self) -> dict[str, Any]:
        cfg = dict(self._config)
        # a combo box in Slicer's options table: keep following the published version, or pin one
        cfg["adapter"] = [
            "current",
            "none",
            *reversed([v["version"] for v in self.served.store.list_versions()]),
        ]
        return cfg

    # -- the request ---------------------------------------------------------------------------
    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        try:
            return self._run(request)
        except UserInputError as exc:
            logger.info(f"{type(self).__name__}: bad request: {exc}")
            raise user_error(str(exc)) from None

    def _run(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        t0 = time.perf_counter()
        ext = str(request.get("result_extension") or ".nrrd")
        if ext not in RESULT_EXTENSIONS:
            raise UserInputError(
                f"result_extension {ext!r} is not supported; use one of {', '.join(RESULT_EXTENSIONS)}"
            )
        dtype = str(request.get("result_dtype") or "uint8")
        if dtype not in RESULT_DTYPES:
            raise UserInputError(
                f"result_dtype {dtype!r} is not supported; use one of {', '.join(RESULT_DTYPES)}"
            )
        path = request.get("image")
        if not isinstance(path, str) or not path:
            raise UserInputError("no image: give a datastore image id")
        check_point_count(request, self.served.config.max_points)
        adapter = request.get("adapter")
        adapter = str(adapter[0] if isinstance(adapter, list) and adapter else adapter or "") or None
        predictor = self.served.predictor(adapter)
        t_parse = time.perf_counter()
        image_key, volume, load_state = self.served.volumes.load(path)
        t_load = time.perf_counter()
        label = request.get("label")
        label = str(label[0] if isinstance(label, list) and label else label or "") or next(
            iter(self.served.config.labels)
        )
        label_value = self.served.config.label_value(label)  # the segment's value in the label maps
        with predictor.busy():  # no background encode starts while this request runs
            out, extra, on_done = self.segment(request, predictor, image_key, volume)
            t_seg = time.perf_counter()
            if label_value != 1:  # the 0/1 mask becomes 0/value, in place (volumes can be large)
                np.multiply(out, np.uint8(label_value), out=out)
            t_value = time.perf_counter()
            result = self._write(out.astype(dtype, copy=False), volume, ext)
        t_written = time.perf_counter()
        if on_done is not None:
            on_done()  # e.g. queue the background encodes
        t_end = time.perf_counter()
        stages = {"parse": t_parse - t0, "load": t_load - t_parse}
        for name, seconds in extra.pop("timings", {}).items():  # the task's own stages
            stages[name] = stages.get(name, 0.0) + seconds
        stages["map_back"] = stages.get("map_back", 0.0) + t_value - t_seg
        stages.update(
            segment=t_seg - t_load, write=t_written - t_value, queue=t_end - t_written, total=t_end - t0
        )
        answer = {
            "model_version": predictor.model_version,
            "label_names": {label: label_value},
            "volume": {"load": load_state, "shape": list(volume.shape)},
            "latency": {name: round(seconds, 4) for name, seconds in stages.items()},
            **extra,
            "cache": predictor.stats(),
        }
        return result, answer

    def segment(
        self, request: dict[str, Any], predictor: Any, image_key: str, volume: Volume
    ) -> tuple[np.ndarray, dict[str, Any], Callable[[], None] | None]:
        """``(label volume (I, J, K), answer fields, callback after the file is written)``."""
        raise NotImplementedError

    @staticmethod
    def _write(array: np.ndarray, volume: Volume, ext: str) -> str:
        fd, name = tempfile.mkstemp(prefix="sam_medical_", suffix=ext)
        os.close(fd)
        write_volume(array, volume, name)
        return name


#: The one file path the current request may segment besides datastore images: the volume the client
#: uploaded with this request, or its own session's image. Set by ``lib.http_guard`` around the call.
TRUSTED_IMAGE: ContextVar[str | None] = ContextVar("sam_medical_trusted_image", default=None)


def check_infer_request(request: dict[str, Any], models: dict[str, Any], datastore: Any) -> str | None:
    """Answer what MONAI Label itself would turn into an HTTP 500 or a file read, with a 4xx.

    * an unknown model -> 404 listing the models;
    * no image -> 422;
    * the image is the file this request uploaded, or its session's image (:data:`TRUSTED_IMAGE`):
      accepted (returns None);
    * anything else must be a datastore image id: a path (``/tmp/x``, ``../x``) -> 422, with the same
      words whether that path exists or not; an id the datastore does not hold -> 404.

    Returns:
        The datastore file of the image id (None for a trusted upload/session path).
    """
    model = request.get("model")
    if model not in models:
        raise user_error(f"unknown model {model!r}; available models: {', '.join(sorted(models))}", 404)
    image = request.get("image")
    if not isinstance(image, str) or not image:
        raise user_error("no image: give a datastore image id (?image=ID)")
    trusted = TRUSTED_IMAGE.get()
    if trusted is not None and image == trusted:
        return None
    problem = name_problem(image)
    if problem:
        raise user_error(
            f"image id {image!r} is refused: an id names a datastore image, not a file ({problem})"
        )
    uri = datastore.get_image_uri(image)
    if not uri:
        raise user_error(f"image {image!r} is not in the datastore", 404)
    return uri
