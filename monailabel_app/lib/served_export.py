"""The served model's runtime: each version starts on PyTorch; its verified export is attached in the background.

:class:`ServedRuntime` resolves ``--conf runtime`` once (at load), and for every predictor it is given
(one per served version) it records what serves it and, for ``onnx``/``openvino``, queues a job on a
:class:`BackgroundJobs` thread that gets the version's export
(:class:`sam_medical.inference.runtime.ExportedEngines`: kept in memory, else loaded from the cache or
exported and verified now) and swaps it into the predictor. A failure leaves the version on PyTorch and
says why in its status.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from sam_medical.errors import library_detail
from sam_medical.inference.predictor import VolumePredictor
from sam_medical.inference.runtime import EXPORTED_RUNTIMES, ExportedEngines

logger = logging.getLogger(__name__)

#: Exported engines kept in memory (current, extra and recently served versions).
KEPT_ENGINES = 4


class BackgroundJobs:
    """One daemon thread running submitted callables in order (a server exit never waits for it)."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> threading.Event:
        """Queue ``fn``; the returned event is set when it has run (``fn`` must not raise)."""
        done = threading.Event()
        self._queue.put((fn, done))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        return done

    def _loop(self) -> None:
        while True:
            fn, done = self._queue.get()
            try:
                fn()
            except Exception:  # noqa: BLE001 - the worker must survive; fn reports its own errors
                logger.exception(f"sam_medical: background job failed in {self._name}")
            finally:
                done.set()


class ServedRuntime:
    """What runs each served version: status per version, exports attached by a background worker.

    Args:
        requested: the ``--conf runtime`` value (reported in :meth:`status`).
        exports_dir: the export cache folder.
    """

    def __init__(self, requested: str, exports_dir: Any) -> None:
        self.requested = requested
        self.exports_dir = exports_dir
        self.runtime: str | None = None  # resolved at load: torch, onnx or openvino
        self.threads = 1
        self._status: dict[str, dict[str, Any]] = {}
        self._done: dict[str, threading.Event] = {}
        self._engines = ExportedEngines(keep=KEPT_ENGINES)
        self._jobs = BackgroundJobs("sam-medical-export")

    @property
    def exported(self) -> bool:
        """Whether versions are served from an export (``onnx`` or ``openvino``)."""
        return self.runtime in EXPORTED_RUNTIMES

    def attach(
        self, pred: VolumePredictor, base_info: dict[str, Any], adapter: dict[str, Any] | None
    ) -> None:
        """Record ``pred`` as served by PyTorch; with an exported runtime, queue its export.

        ``adapter``: ``{"version", "sha256"}`` of the merged adapter file (None for the base model).
        """
        status: dict[str, Any] = {"runtime": self.runtime, "serving": "torch", "state": "ready"}
        if self.exported:
            status["state"] = "exporting"
            self._done[pred.model_version] = self._jobs.submit(
                lambda: self._attach_export(pred, base_info, adapter, status)
            )
        self._status[pred.model_version] = status

    def _attach_export(
        self,
        pred: VolumePredictor,
        base_info: dict[str, Any],
        adapter: dict[str, Any] | None,
        status: dict[str, Any],
    ) -> None:
        """Background: the predictor's export from memory or the cache, or exported + verified now; swapped in."""
        torch.set_num_threads(1)  # this worker thread's own setting: the clicks keep the other cores
        runtime = str(self.runtime)
        if pred.closed:  # swapped out before its turn came: nothing to serve
            status.update(state="dropped")
            return
        try:
            digest, engine = self._engines.get(
                pred.sam, self.exports_dir, base_info, adapter, backend=runtime, threads=self.threads
            )
        except Exception as exc:  # noqa: BLE001 - any failure: the version stays on PyTorch
            status.update(
                state="failed", error=f"{type(exc).__name__}: {library_detail(exc)}; serving with torch"
            )
            logger.error(
                f"sam_medical: runtime {runtime} for version {pred.model_version} failed: {status['error']}"
            )
            return
        pred.set_engine(engine)
        manifest = engine.manifest
        status.update(
            state="ready",
            serving=engine.name,
            export_digest=digest,
            source=manifest.get("source"),
            seconds=manifest.get("load_s"),
            timings=manifest.get("timings"),
            verification=manifest.get("verification"),
            error=None,
        )
        logger.info(
            f"sam_medical: version {pred.model_version} now runs on {engine.name} "
            f"(export {digest[:12]}, {manifest.get('source')}, {manifest.get('load_s')} s)"
        )

    def wait(self, version: str | None, timeout: float | None = None) -> bool:
        """Wait until ``version`` runs on its runtime, or failed to; True when done."""
        done = self._done.get(version) if version else None
        return True if done is None else done.wait(timeout)

    def status(self, version: str | None) -> dict[str, Any]:
        """``{"requested", "runtime", "serving", "state", "export_digest", ...}`` of ``version``."""
        return {"requested": self.requested, **self._status.get(version or "", {})}
