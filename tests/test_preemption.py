"""A click never waits for background work: the prefetch encode in flight is stopped, then tried again.

Asserted through the order of events (never through timing thresholds; the timings live in
``bench/click_latency.py``).
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sam_medical.inference import preemption
from sam_medical.inference.predictor import VolumePredictor
from sam_medical.inference.volume_slices import centre_out
from sam_medical.volume.io import Volume

DEADLINE_S = 60.0  # only reached when pre-emption is broken (the test then fails, not hangs)


def small_volume() -> Volume:
    rng = np.random.default_rng(0)
    arr = rng.normal(40, 30, (48, 64, 8)).astype(np.float32)
    return Volume(arr, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


class LongBackgroundEncode:
    """A forward pre-hook on the image encoder that makes the *first* background encode long: it loops
    until the gate stops it (as ONNX Runtime checks its terminate flag between graph nodes)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.started = threading.Event()
        self._held = False

    def __call__(self, module, args) -> None:
        signal = preemption.current_signal()
        if signal is None:  # a click's encode
            if "click encodes" not in self.events:
                self.events.append("click encodes")
            return
        if self._held:
            return
        self._held = True
        self.events.append("background starts")
        self.started.set()
        deadline = time.monotonic() + DEADLINE_S
        while not signal.stopped and time.monotonic() < deadline:
            time.sleep(0.001)
        self.events.append("background stopped" if signal.stopped else "background ran to its end")


def test_a_click_stops_the_background_encode_and_it_is_encoded_again(tiny_sam):
    volume = small_volume()
    hook = LongBackgroundEncode()
    tiny_sam.image_encoder.register_forward_pre_hook(hook)
    pred = VolumePredictor(tiny_sam, "v1")
    assert pred.prefetch("vol", volume, [5]) == 1
    assert hook.started.wait(DEADLINE_S)  # slice 5 is being encoded in the background
    _, info = pred.segment_slice("vol", volume, 1, [(20, 30)])
    assert info["embedding"] == "computed"
    assert hook.events[:3] == ["background starts", "background stopped", "click encodes"]
    assert pred.prefetch_idle(timeout=DEADLINE_S)
    stats = pred.stats()["prefetch"]
    assert stats["preempted"] == 1 and stats["encoded"] == 1  # stopped once, then encoded after the click
    assert pred.cache_key("vol", 5) in pred.cache
    _, info = pred.segment_slice("vol", volume, 5, [(20, 30)])
    assert info["embedding"] == "cached"
    pred.close()


def test_a_click_on_the_slice_being_encoded_in_the_background_uses_that_encode(tiny_sam):
    volume = small_volume()
    release = threading.Event()
    started = threading.Event()

    def slow_background(module, args) -> None:
        if preemption.current_signal() is not None and not started.is_set():
            started.set()
            release.wait(DEADLINE_S)

    tiny_sam.image_encoder.register_forward_pre_hook(slow_background)
    pred = VolumePredictor(tiny_sam, "v1")
    pred.prefetch("vol", volume, [3])
    assert started.wait(DEADLINE_S)
    threading.Timer(0.2, release.set).start()
    _, info = pred.segment_slice("vol", volume, 3, [(20, 30)])
    assert info["embedding"] == "cached"  # waited for the background encode of slice 3, not stopped it
    assert pred.stats()["prefetch"]["preempted"] == 0 and pred.encoder_calls == 1
    pred.close()


def test_a_background_encode_does_not_start_while_a_click_waits(tiny_sam):
    gate = preemption.EncoderGate()
    with gate.foreground(["a"]) as waited:
        assert waited >= 0.0
        done = []
        worker = threading.Thread(target=lambda: done.append(_try_background(gate)))
        worker.start()
        worker.join(DEADLINE_S)
    assert done == ["preempted"]


def _try_background(gate: preemption.EncoderGate) -> str:
    try:
        with gate.background(["b"]):
            return "ran"
    except preemption.Preempted:
        return "preempted"


class FakeOrtSession:
    """Stands in for an ONNX Runtime session: ``run`` loops until its ``RunOptions`` says terminate."""

    def __init__(self) -> None:
        self.started = threading.Event()

    def run(self, outputs, feed, options):
        self.started.set()
        deadline = time.monotonic() + DEADLINE_S
        while not options.terminate and time.monotonic() < deadline:
            time.sleep(0.001)
        if options.terminate:
            raise RuntimeError("Exiting due to terminate flag being set to true.")
        return [np.zeros((1, 8, 4, 4), np.float32)]


class FakeEncoder:
    def __init__(self, session) -> None:
        if session is not None:
            self.session = session


class FakeOnnxEngine:
    name = "onnx"
    encode_batch = 1

    def __init__(self) -> None:
        self._encoder = FakeEncoder(FakeOrtSession())


def background_encode(gate: preemption.EncoderGate, engine) -> tuple[threading.Thread, list[str]]:
    """A started thread encoding with ``engine`` in the background, and the list it reports its outcome to."""
    outcome: list[str] = []

    def background() -> None:
        try:
            with gate.background(["b"]):
                preemption.encode_stoppable(engine, torch.zeros(1, 3, 16, 16))
            outcome.append("finished")
        except preemption.Preempted:
            outcome.append("preempted")

    worker = threading.Thread(target=background)
    worker.start()
    return worker, outcome


def test_onnx_runtime_background_run_is_terminated_by_a_click():
    pytest.importorskip("onnxruntime")
    engine = FakeOnnxEngine()
    gate = preemption.EncoderGate()
    worker, outcome = background_encode(gate, engine)
    assert engine._encoder.session.started.wait(DEADLINE_S)
    with gate.foreground(["a"]):
        outcome.append("click runs")
    worker.join(DEADLINE_S)
    assert outcome == ["preempted", "click runs"] and gate.preemptions == 1


def test_centre_out_order():
    assert centre_out(5) == [2, 3, 1, 4, 0]
    assert centre_out(4) == [2, 3, 1, 0]
    assert centre_out(1) == [0] and centre_out(0) == []


def test_an_encoder_with_stop_checks_still_exports_the_same_model(tiny_sam, tmp_path):
    pytest.importorskip("onnxruntime")
    from sam_medical.inference import onnx_export
    from sam_medical.inference.onnx_engine import OnnxEngine
    from sam_medical.model import forward as sf

    preemption.make_stoppable(tiny_sam.image_encoder)
    onnx_export.export_onnx(tiny_sam, tmp_path)
    engine = OnnxEngine(tmp_path, sf.input_size(tiny_sam))
    images = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        want = sf.encode(tiny_sam, images)
    torch.testing.assert_close(engine.encode(images), want, atol=1e-3, rtol=1e-3)


class FakeOpenVinoRequest:
    """Stands in for an OpenVINO infer request: ``wait`` blocks until ``cancel``, then raises."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self._cancelled = threading.Event()
        self.background: FakeOpenVinoRequest | None = None

    def get_compiled_model(self):
        return self

    def create_infer_request(self):
        self.background = FakeOpenVinoRequest()
        return self.background

    def start_async(self, inputs) -> None:
        self.started.set()

    def wait(self) -> None:
        if not self._cancelled.wait(DEADLINE_S):
            return
        raise RuntimeError("Infer Request was canceled")

    def cancel(self) -> None:
        self._cancelled.set()


def test_openvino_background_run_is_cancelled_by_a_click_on_its_own_request():
    request = FakeOpenVinoRequest()
    engine = SimpleNamespace(name="openvino", encode_batch=1, _encoder=FakeEncoder(None))
    engine._encoder.request = request
    gate = preemption.EncoderGate()
    worker, outcome = background_encode(gate, engine)
    deadline = time.monotonic() + DEADLINE_S
    while request.background is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert request.background is not None and request.background.started.wait(DEADLINE_S)
    with gate.foreground(["a"]):
        outcome.append("click runs")
    worker.join(DEADLINE_S)
    assert outcome == ["preempted", "click runs"]
    assert not request._cancelled.is_set()  # the clicks' own request is never touched
