"""The engine factory: the ``runtime`` option -> an :class:`~sam_medical.inference.engines.Engine` for a model.

:func:`build_engine` is what a caller outside the app uses (evaluation, benches): it resolves the option
(:func:`~sam_medical.inference.engines.resolve_runtime`), then gives PyTorch itself
(:class:`~sam_medical.inference.engines.TorchEngine`) or the model's verified export from the export cache
(:func:`sam_medical.inference.export_cache.load_or_export` -> :class:`~sam_medical.inference.onnx_engine.OnnxEngine`),
synchronously. The app attaches exports in the background with the same :class:`ExportedEngines`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from sam_medical.inference import export_cache
from sam_medical.inference.engines import Engine, TorchEngine, resolve_runtime

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

#: The runtimes that run an export rather than the PyTorch model.
EXPORTED_RUNTIMES = ("onnx", "openvino")


class ExportedEngines:
    """Exported engines kept in memory by export digest (the most recently used ``keep``), so that a
    model version served again does not reopen its sessions. Thread-safe."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = int(keep)
        self._engines: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self,
        sam: Sam,
        export_dir: str | os.PathLike,
        base_info: dict[str, Any],
        adapter: dict[str, Any] | None,
        *,
        backend: str,
        threads: int,
    ) -> tuple[str, Any]:
        """``(export digest, engine)`` for ``sam``: kept in memory, else loaded from the cache or exported
        and verified now (:func:`~sam_medical.inference.export_cache.load_or_export`, whose errors pass)."""
        digest, _ = export_cache.export_key(base_info, adapter, backend)
        with self._lock:
            engine = self._engines.get(digest)
        if engine is None:
            engine = export_cache.load_or_export(
                sam, export_dir, base_info, adapter, backend=backend, threads=threads
            )
        with self._lock:
            self._engines[digest] = engine
            self._engines.move_to_end(digest)
            while len(self._engines) > self.keep:
                self._engines.popitem(last=False)
        return digest, engine


def build_engine(
    sam: Sam,
    runtime: str = "auto",
    *,
    base_info: dict[str, Any] | None = None,
    adapter: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    export_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    engines: ExportedEngines | None = None,
) -> Engine:
    """The engine that runs ``sam`` under the ``runtime`` option, ready to use.

    Args:
        sam: the model in eval mode with any adapter merged, on ``device`` (the exported runtimes need
            it on the CPU: it is what is exported and what the export is verified against).
        runtime: ``auto``, ``torch``, ``onnx`` or ``openvino`` (:data:`~sam_medical.inference.engines.RUNTIMES`).
        base_info: :func:`sam_medical.model.build.build_sam`'s record; required by the exported runtimes
            (the export's digest); ``adapter``: ``{"version", "sha256"}`` of a merged adapter file
            (:func:`~sam_medical.inference.export_cache.adapter_identity`), or None.
        device: where the runtime is resolved for (default: the model's device).
        export_dir: the export cache folder; required by the exported runtimes.
        threads: intra-op threads of the ONNX sessions (default: torch's current setting).
        precision: ``fp32``; ``fp16``/``bf16`` for PyTorch on CUDA.
        engines: exported engines kept in memory between calls (default: none kept).

    Raises:
        UserInputError: a runtime/precision/device combination that cannot run (:func:`resolve_runtime`).
        ValueError: an exported runtime without ``base_info`` or ``export_dir``.
        ExportError, ExportMismatch: the export failed or disagrees with PyTorch.
    """
    dev = torch.device(device) if device is not None else sam.pixel_mean.device
    resolved = resolve_runtime(runtime, dev, precision)
    if resolved not in EXPORTED_RUNTIMES:
        return TorchEngine(sam, precision=precision)
    if base_info is None or export_dir is None:
        raise ValueError(f"runtime {resolved} needs base_info and export_dir (the export cache)")
    memo = engines if engines is not None else ExportedEngines(keep=1)
    _, engine = memo.get(
        sam,
        export_dir,
        base_info,
        adapter,
        backend=resolved,
        threads=int(threads or torch.get_num_threads()),
    )
    return engine
