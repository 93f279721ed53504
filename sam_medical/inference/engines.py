"""Inference engines: what runs the image encoder and the prompt decoder of a served model.

:class:`~sam_medical.inference.predictor.VolumePredictor` does its preprocessing, caching and post-processing
itself and asks an engine for two things only:

* ``encode(images (B, 3, S, S) float) -> embeddings (B, C, h, w) float32``: the model input made by
  :func:`sam_medical.model.forward.canvas_to_input`;
* ``decode(embedding (1, C, h, w), prompts) -> (low_res_logits (P, M, L, L), iou (P, M))`` float32 on the
  CPU: ``prompts`` a :class:`~sam_medical.model.forward.PromptBatch` of ``P`` prompt sets in canvas pixels,
  exactly as :func:`sam_medical.model.forward.decode_many` takes it (``M`` is 1, or 3 with its
  ``multimask_output``).

Engines (the ``runtime`` option):

* ``torch`` (:class:`TorchEngine`): the PyTorch model itself, i.e. ``sam_forward.encode`` and
  ``sam_forward.decode_many``; on CUDA optionally under fp16/bf16 autocast, with batched encodes;
* ``onnx``: the model exported to ONNX and run by ONNX Runtime (:mod:`sam_medical.inference.onnx_engine`, exported by :mod:`sam_medical.inference.onnx_export`; :func:`sam_medical.inference.runtime.build_engine` makes either);
* ``openvino``: the same export, encoder run by OpenVINO (optional extra ``sam-medical[openvino]``),
  decoder by ONNX Runtime.

Training always stays in PyTorch; engines are for inference only.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sam_medical.errors import UserInputError
from sam_medical.model import forward as sf
from sam_medical.model.forward import PromptBatch

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

#: Values of the ``runtime`` option. ``auto``: ONNX Runtime on the CPU (when installed), PyTorch on CUDA.
RUNTIMES: tuple[str, ...] = ("auto", "torch", "onnx", "openvino")
#: Values of the ``precision`` option (fp16/bf16: PyTorch on CUDA only).
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
#: Images per encoder call on CUDA (prefetch and propagation encode this many slices at once).
CUDA_ENCODE_BATCH = 8


class Engine(Protocol):
    """What a predictor needs from an inference engine (see the module docstring)."""

    #: ``"torch"``, ``"onnx"`` or ``"openvino"``.
    name: str
    #: How many images one ``encode`` call should hold to pay off (1 on the CPU: measured no cheaper).
    encode_batch: int

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, embedding: torch.Tensor, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def check_runtime(name: Any, option: str = "runtime") -> str:
    """``name`` if it is one of :data:`RUNTIMES`, else a :class:`UserInputError` listing them."""
    text = str(name).strip().lower()
    if text not in RUNTIMES:
        raise UserInputError(f"{option} must be one of {', '.join(RUNTIMES)}, got {name!r}")
    return text


def check_precision(name: Any, option: str = "precision") -> str:
    text = str(name).strip().lower()
    if text not in PRECISIONS:
        raise UserInputError(f"{option} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return text


def resolve_runtime(requested: str, device: torch.device, precision: str = "fp32") -> str:
    """The engine a ``runtime`` option gives on ``device``: ``torch``, ``onnx`` or ``openvino``.

    ``auto`` is ``onnx`` on the CPU (exact masks, about twice as fast, see README.md, section "Interactive latency")
    when ONNX Runtime is installed, else ``torch``; on CUDA it is ``torch``.

    Raises:
        UserInputError: an exported runtime asked for on CUDA or with fp16/bf16; a runtime whose package
            is not installed; fp16/bf16 on the CPU (they fail the 0.995 mask agreement there).
    """
    runtime = check_runtime(requested)
    precision = check_precision(precision)
    if precision != "fp32" and device.type != "cuda":
        raise UserInputError(
            f"precision {precision} runs on CUDA only (on the CPU, bf16 changed the masks: Dice agreement "
            "with fp32 fell below 0.995); use precision fp32"
        )
    if runtime == "auto":
        if device.type == "cuda" or precision != "fp32":
            return "torch"
        return "onnx" if onnxruntime_available() else "torch"
    if runtime in ("onnx", "openvino"):
        if device.type != "cpu":
            raise UserInputError(
                f"runtime {runtime} runs on the CPU; with device {device} use runtime torch (or auto)"
            )
        if precision != "fp32":
            raise UserInputError(
                f"runtime {runtime} is exported in fp32; precision {precision} needs runtime torch"
            )
        if not onnxruntime_available():
            raise UserInputError(f"runtime {runtime} needs the package onnxruntime (pip install onnxruntime)")
        if runtime == "openvino" and not openvino_available():
            raise UserInputError(
                "runtime openvino needs the optional package openvino: pip install 'sam-medical[openvino]'"
            )
    return runtime


class TorchEngine:
    """The PyTorch model as an engine: today's ``sam_forward`` calls, nothing changed.

    Args:
        sam: the model (eval mode), on its device.
        precision: ``fp32``; on CUDA also ``fp16`` or ``bf16`` (autocast; outputs are returned as fp32).
        encode_batch: images per encoder call worth batching (default: 1 on the CPU, where a batch is no
            cheaper per image, :data:`CUDA_ENCODE_BATCH` on CUDA).
    """

    name = "torch"

    def __init__(self, sam: Sam, precision: str = "fp32", encode_batch: int | None = None) -> None:
        self.sam = sam
        self.precision = check_precision(precision)
        self.device = sam.pixel_mean.device
        if self.precision != "fp32" and self.device.type != "cuda":
            raise ValueError(f"precision {self.precision} is for CUDA; the model is on {self.device}")
        default_batch = CUDA_ENCODE_BATCH if self.device.type == "cuda" else 1
        self.encode_batch = max(1, int(encode_batch or default_batch))

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.precision == "fp32":
            yield
            return
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` model input -> ``(B, C, h, w)`` float32 embeddings on the model's device."""
        with torch.inference_mode(), self._autocast():
            return sf.encode(self.sam, images.to(self.device)).float()

    def decode(self, embedding: torch.Tensor, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sam_medical.model.forward.decode_many` on the model's device: ``embedding (1, C, h, w)``
        and the prompts may be on any device (prompts are usually built on the CPU); returns
        ``(P, M, L, L)`` logits and ``(P, M)`` IoU as float32 CPU tensors, whatever the device and precision."""
        with torch.inference_mode(), self._autocast():
            low, iou = sf.decode_many(self.sam, embedding.to(self.device), prompts)
        return low.float().cpu(), iou.float().cpu()

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "device": str(self.device),
            "precision": self.precision,
            "encode_batch": self.encode_batch,
        }
