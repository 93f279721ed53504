"""Background encodes that a click stops mid-way: one encode at a time, and a click's comes first.

The image encoder is the one long computation of serving (about 0.5-1.5 s per slice on 2 CPU cores). The
prefetcher (:mod:`sam_medical.inference.prefetch`) runs it in the background; when a click needs an encode,
the background one must not make it wait. :class:`EncoderGate` lets one encode run at a time:

* a click enters :meth:`EncoderGate.foreground`: it announces itself, stops the background encode in
  flight (unless that one is encoding the very slice the click needs, which then finishes and is used),
  and runs as soon as the stopped encode has returned -- within one graph node, milliseconds;
* the prefetcher enters :meth:`EncoderGate.background`, which raises :class:`Preempted` at once while a
  click waits or runs, and gives the :class:`StopSignal` its encode checks.

How an encode in flight is stopped depends on the engine (:func:`encode_stoppable`):

* ONNX Runtime: the background run gets its own ``RunOptions``; stopping sets ``terminate`` (checked
  between graph nodes; measured: the run ends about 30 ms later);
* OpenVINO: the background run uses its own infer request on the same compiled model and is
  ``cancel()``-ed (measured: about 30 ms);
* PyTorch: forward pre-hooks on every module of the image encoder (:func:`make_stoppable`) raise
  :class:`Preempted` in the background thread once its signal is stopped (they do nothing in any other
  thread);
* any other engine cannot be stopped: the click waits for it (still only one encode at a time).

Images are ``(B, 3, S, S)`` float model inputs; embeddings ``(B, C, h, w)`` float32, as
:class:`~sam_medical.inference.engines.Engine` ``.encode`` takes and returns them.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

_local = threading.local()  # .signal: the StopSignal of this thread's background encode, if any
_ov_requests: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_hook_lock = threading.Lock()


class Preempted(RuntimeError):
    """A background encode was stopped (or not started) because a click needs the encoder."""


class StopSignal:
    """The stop handle of one background encode over slices ``keys`` (cache keys)."""

    def __init__(self, keys: Iterable[Hashable]) -> None:
        self.keys = frozenset(keys)
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._cancel: Callable[[], None] | None = None

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """Stop the encode: the engine's own cancel is called now if one is running."""
        with self._lock:
            self._stopped.set()
            cancel = self._cancel
        if cancel is not None:
            cancel()

    def check(self) -> None:
        """Raise :class:`Preempted` once stopped."""
        if self._stopped.is_set():
            raise Preempted("a click needs the encoder")

    @contextlib.contextmanager
    def cancel_with(self, cancel: Callable[[], None]) -> Iterator[None]:
        """While the block runs, :meth:`stop` calls ``cancel`` (the engine's way to end a run early)."""
        with self._lock:
            self.check()
            self._cancel = cancel
        try:
            yield
        finally:
            with self._lock:
                self._cancel = None


class EncoderGate:
    """One encode at a time; a click's encode pre-empts a background one (see the module docstring)."""

    def __init__(self) -> None:
        self._run_lock = threading.Lock()  # held by the encode that runs
        self._state = threading.Lock()
        self._clicks_waiting = 0
        self._background: StopSignal | None = None
        self.preemptions = 0

    @contextlib.contextmanager
    def foreground(self, keys: Iterable[Hashable]) -> Iterator[float]:
        """Run a click's encode of ``keys``: stop the background encode unless it encodes one of them.

        Yields the seconds spent waiting for the encoder (the stopped encode's way out).
        """
        wanted = frozenset(keys)
        with self._state:
            self._clicks_waiting += 1
            background = self._background
        if background is not None and not (background.keys & wanted):
            background.stop()
            self.preemptions += 1
        t0 = time.perf_counter()
        try:
            with self._run_lock:
                yield time.perf_counter() - t0
        finally:
            with self._state:
                self._clicks_waiting -= 1

    @contextlib.contextmanager
    def background(self, keys: Iterable[Hashable]) -> Iterator[StopSignal]:
        """Run a background encode of ``keys`` under a :class:`StopSignal` (made current for this thread).

        Raises:
            Preempted: at once while a click waits for the encoder or runs it, or later from the block
                when a click stops it.
        """
        signal = StopSignal(keys)
        self._check_no_click()
        with self._run_lock:
            with self._state:
                self._check_no_click()
                self._background = signal
            _local.signal = signal
            try:
                yield signal
            finally:
                _local.signal = None
                with self._state:
                    self._background = None

    def _check_no_click(self) -> None:
        if self._clicks_waiting:
            raise Preempted("a click is waiting for the encoder or running it")


def current_signal() -> StopSignal | None:
    """The :class:`StopSignal` of this thread's background encode, or None (a click, or no gate)."""
    return getattr(_local, "signal", None)


def encode_stoppable(engine: Any, images: torch.Tensor) -> torch.Tensor:
    """``engine.encode(images)``; inside :meth:`EncoderGate.background`, stopped by the gate's signal.

    Raises:
        Preempted: the background encode was stopped by a click.
    """
    signal = current_signal()
    if signal is None:
        return engine.encode(images)
    signal.check()
    encoder = getattr(engine, "_encoder", None)
    session = getattr(encoder, "session", None)
    if session is not None:
        return _ort_encode(session, images, signal)
    request = getattr(encoder, "request", None)
    if request is not None:
        return _openvino_encode(encoder, request, images, signal)
    out = engine.encode(images)  # PyTorch: stopped by the pre-hooks of make_stoppable, if put there
    signal.check()
    return out


def _cpu_input(images: torch.Tensor) -> np.ndarray:
    return images.detach().to("cpu", torch.float32).contiguous().numpy()


def _ort_encode(session: Any, images: torch.Tensor, signal: StopSignal) -> torch.Tensor:
    """The ONNX Runtime encoder session run with its own ``RunOptions`` (``terminate`` on stop)."""
    import onnxruntime as ort  # optional dependency: only an ONNX engine gets here

    options = ort.RunOptions()
    try:
        with signal.cancel_with(lambda: setattr(options, "terminate", True)):
            out = session.run(None, {"image": _cpu_input(images)}, options)[0]
    except Exception:
        signal.check()  # stopped: Preempted instead of ONNX Runtime's error
        raise
    signal.check()
    return torch.from_numpy(out)


def _openvino_encode(encoder: Any, request: Any, images: torch.Tensor, signal: StopSignal) -> torch.Tensor:
    """OpenVINO: a second infer request on the engine's compiled model, one image at a time, cancelled on stop."""
    background = _ov_requests.get(encoder)
    if background is None:
        background = request.get_compiled_model().create_infer_request()
        _ov_requests[encoder] = background
    x = _cpu_input(images)
    outs = []
    for i in range(len(x)):
        try:
            with signal.cancel_with(background.cancel):
                background.start_async({"image": x[i : i + 1]})
                background.wait()
        except Exception:
            signal.check()
            raise
        outs.append(background.get_output_tensor(0).data.copy())
    signal.check()
    return torch.from_numpy(np.concatenate(outs))


def _stop_point(module: torch.nn.Module, args: Any) -> None:
    """Forward pre-hook: in a background encode whose signal was stopped, raise :class:`Preempted`."""
    signal = getattr(_local, "signal", None)
    if signal is not None:
        signal.check()


def make_stoppable(encoder: torch.nn.Module) -> None:
    """Put a stop check before every module of the image encoder ``encoder`` (once; a deep copy keeps
    them), so that a background PyTorch encode can be stopped. Call it before the model is shared with
    other threads (e.g. an export worker); outside a background encode the checks do nothing."""
    with _hook_lock:
        if any(hook is _stop_point for hook in encoder._forward_pre_hooks.values()):
            return
        for module in encoder.modules():
            module.register_forward_pre_hook(_stop_point)
