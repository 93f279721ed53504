"""An exported model (:mod:`sam_medical.inference.onnx_export`) run on the CPU by ONNX Runtime, or with an
OpenVINO encoder: :class:`OnnxEngine`, an :class:`~sam_medical.inference.engines.Engine`.

Prompts arrive in canvas pixels as :func:`sam_medical.model.forward.decode_many` takes them (a
:class:`~sam_medical.model.forward.PromptBatch`) and are turned
into SAM's ONNX convention by :func:`onnx_prompts`: points, then the box corners (labels 2 and 3), or SAM's
single padding point when there is no box -- exactly what ``PromptEncoder`` builds, at their true length.
(Each *extra* -1 point still takes part in attention and changes the mask, so prompts are never padded to
a common length.)

ONNX Runtime runs with explicit threads (``intra_op_num_threads``), the sequential executor, spinning
off (idle threads must not steal a shared core) and graph optimisation level "all". Measured on 2
shared cores (README.md, section "Interactive latency"): encoder about 2x and decoder about 2.2x faster
than PyTorch fp32, masks identical to the pixel; OpenVINO f32 encoder about 2.5x.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam_medical.inference.onnx_export import DECODER_FILE, ENCODER_FILE
from sam_medical.model import forward as sf
from sam_medical.model.forward import PromptBatch

#: Backends an export can be run with (``openvino``: OpenVINO encoder, ONNX Runtime decoder).
BACKENDS = ("onnx", "openvino")


def onnx_prompts(prompts: PromptBatch, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Canvas prompts -> ``point_coords (P, N, 2)`` and ``point_labels (P, N)`` float32, model pixels.

    Points first, then the box corners (labels 2 and 3), or one padding point ``(0, 0)`` with label -1
    when there is no box: the tokens ``PromptEncoder`` makes, in its order, at their true length.

    Raises:
        ValueError: no points and no box, or boxes for another number of prompt sets than the points.
    """
    coords, labels = [], []
    count = None
    if prompts.points is not None:
        count = prompts.points.shape[0]
        coords.append(prompts.points.detach().to("cpu", torch.float32) * factor)
        labels.append(prompts.point_labels.detach().to("cpu", torch.float32))
    boxes = prompts.boxes
    if boxes is not None:
        if count is not None and boxes.shape[0] != count:
            raise ValueError(f"boxes must be (P, 4) for the P prompt sets, got {tuple(boxes.shape)}")
        count = boxes.shape[0]
        coords.append(boxes.detach().to("cpu", torch.float32).reshape(-1, 2, 2) * factor)
        labels.append(torch.tensor([[2.0, 3.0]]).expand(count, 2))
    elif count is not None:
        coords.append(torch.zeros(count, 1, 2))
        labels.append(torch.full((count, 1), -1.0))
    if count is None:
        raise ValueError("the ONNX decoder needs points or a box")
    return (
        torch.cat(coords, dim=1).numpy().astype(np.float32, copy=False),
        torch.cat(labels, dim=1).numpy().astype(np.float32, copy=False),
    )


def ort_session(path: str | os.PathLike, threads: int):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, sequential executor, spinning off,
    graph optimisation "all" (the settings measured fastest on shared cores)."""
    import onnxruntime as ort  # optional dependency

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class _OrtEncoder:
    def __init__(self, path: Path, threads: int) -> None:
        self.session = ort_session(path, threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": x})[0]


class _OpenVinoEncoder:
    """OpenVINO's CPU plugin on ``encoder.onnx``, batch 1, with an explicit f32 precision hint (its
    default on CPUs with AMX is bf16, which fails the agreement)."""

    def __init__(self, path: Path, threads: int, size: int) -> None:
        import openvino as ov  # optional dependency (sam-medical[openvino])
        import openvino.properties as props
        import openvino.properties.hint as hints  # optional dependency (sam-medical[openvino])

        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({"image": [1, 3, size, size]})
        config = {
            hints.inference_precision: ov.Type.f32,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.inference_num_threads: max(1, int(threads)),
            hints.num_requests: 1,
        }
        self.request = core.compile_model(model, "CPU", config).create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            return np.concatenate(
                [self.request.infer({"image": x[i : i + 1]})[0].copy() for i in range(len(x))]
            )


def runtime_versions(backend: str) -> dict[str, str]:
    """The versions of the packages that run ``backend`` (part of the cache key: an upgrade re-verifies)."""
    import onnxruntime  # optional dependency

    out = {"onnxruntime": onnxruntime.__version__}
    if backend == "openvino":
        import openvino  # optional dependency

        out["openvino"] = openvino.__version__
    return out


class OnnxEngine:
    """An exported model run by ONNX Runtime (``backend="onnx"``) or with an OpenVINO encoder
    (``"openvino"``); implements :class:`sam_medical.inference.engines.Engine` on the CPU.

    Args:
        folder: holds ``encoder.onnx`` and ``decoder.onnx``.
        input_size: ``S``; prompts in canvas pixels are scaled by ``S / 256``.
        threads: intra-op threads of each session.
        backend: ``onnx`` or ``openvino``.
        manifest: the cache manifest (for :meth:`describe`).
    """

    encode_batch = 1  # a batch is no cheaper per image on the CPU (measured); any B works

    def __init__(
        self,
        folder: str | os.PathLike,
        input_size: int,
        threads: int = 1,
        backend: str = "onnx",
        manifest: dict[str, Any] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        folder = Path(folder)
        self.name = backend
        self.threads = int(threads)
        self.input_size = int(input_size)
        self.manifest = manifest or {}
        if backend == "openvino":
            self._encoder = _OpenVinoEncoder(folder / ENCODER_FILE, threads, self.input_size)
        else:
            self._encoder = _OrtEncoder(folder / ENCODER_FILE, threads)
        self._decoder = ort_session(folder / DECODER_FILE, threads)
        self._low_res = int(next(i for i in self._decoder.get_inputs() if i.name == "mask_input").shape[-1])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` model input -> ``(B, C, h, w)`` float32 embeddings (CPU)."""
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._encoder(x))

    def decode(self, embedding: torch.Tensor, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """As :func:`sam_medical.model.forward.decode_many`: ``(P, M, L, L)`` logits, ``(P, M)`` IoU (CPU)."""
        if embedding.ndim == 3:
            embedding = embedding.unsqueeze(0)
        coords, labels = onnx_prompts(prompts, self.input_size / sf.CANVAS_SIZE)
        count = coords.shape[0]
        if prompts.mask_inputs is None:
            masks = np.zeros((count, 1, self._low_res, self._low_res), np.float32)
            has = np.zeros((count,), np.float32)
        else:
            masks = prompts.mask_inputs.detach().to("cpu", torch.float32).numpy()
            if masks.shape[0] != count:
                masks = np.broadcast_to(masks, (count, *masks.shape[1:]))
            masks = np.ascontiguousarray(masks)
            has = np.ones((count,), np.float32)
        low, iou = self._decoder.run(
            None,
            {
                "image_embeddings": embedding.detach().to("cpu", torch.float32).contiguous().numpy(),
                "point_coords": coords,
                "point_labels": labels,
                "mask_input": masks,
                "has_mask_input": has,
            },
        )
        return sf.select_masks(torch.from_numpy(low), torch.from_numpy(iou), prompts.multimask_output)

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "runtime": self.name,
            "device": "cpu",
            "precision": "fp32",
            "threads": self.threads,
            "export_digest": m.get("key"),
            "export": {
                k: m.get(k) for k in ("opset", "exporter", "versions", "files", "timings", "verification")
            },
        }
