"""How a click that needs an encode fares while the prefetcher encodes another slice (issue 19). One JSON line.

In process, on the served predictor (:class:`~sam_medical.inference.predictor.VolumePredictor`) with the
model's exported runtime (``--runtime``: ``onnx`` or ``openvino``, verified export from the cache) on a
synthetic 512x512x100 CT. Each trial starts a background encode of one slice, lets it run ``--into``
seconds, then clicks (an ROI box) on another slice that is not cached and times the click. Options,
interleaved trial by trial so that the machine's changing load hits them alike:

* ``off``: no background encode at all (the reference);
* ``preempt``: what serves: the click stops the background encode (ONNX Runtime ``terminate``, OpenVINO
  ``cancel``) and encodes at once (:class:`~sam_medical.inference.preemption.EncoderGate`);
* ``wait``: the click waits for the background encode to finish (one encode at a time, not stopped:
  the behaviour before issue 19);
* ``parallel``: no gate: the click encodes while the background encode goes on, both in the same
  session (what a separate runtime session or a worker process without pre-emption would give on the
  same cores).

Reports the p50 click seconds of each option and its ratio to ``off``. Usage::

    .venv/bin/python bench/preemption_options.py [--trials 6] [--into 0.3] [--runtime onnx] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from click_latency import SHAPE, SPACING, synthetic_ct  # noqa: E402 - the bench folder's volume

OPTIONS = ("off", "preempt", "wait", "parallel")


def predictor_for(args):
    """A fresh predictor of ``args.model`` on its verified export, and the synthetic volume."""
    from sam_medical.inference.caches import EmbeddingCache
    from sam_medical.inference.predictor import VolumePredictor
    from sam_medical.inference.runtime import build_engine
    from sam_medical.model.build import build_sam
    from sam_medical.volume.io import Volume

    sam, info = build_sam(args.model, image_size=256, random_weights=args.model != "medsam_lite")
    sam.eval()
    engine = build_engine(sam, args.runtime, base_info=info, export_dir=args.export_dir, threads=args.threads)
    image, label = synthetic_ct()
    volume = Volume(image, SPACING, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return VolumePredictor(sam, "base", EmbeddingCache(1 << 30), engine=engine), volume, label


@contextlib.contextmanager
def option(pred, name: str):
    """Run the block with the gate behaving as option ``name``."""
    gate = pred._gate
    if name == "wait":  # the background encode is never stopped: the click waits for it
        real = gate.foreground

        @contextlib.contextmanager
        def waiting(keys):
            with gate._run_lock:
                yield 0.0

        gate.foreground = waiting
        try:
            yield
        finally:
            gate.foreground = real
    elif name == "parallel":  # no gate at all for the click
        real = gate.foreground
        gate.foreground = lambda keys: contextlib.nullcontext(0.0)
        try:
            yield
        finally:
            gate.foreground = real
    else:
        yield


def trial(pred, volume, label, name: str, background_k: int, click_k: int, into: float) -> float:
    ii, jj = np.nonzero(label[:, :, click_k])
    box = (int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()))
    if name != "off":
        pred.prefetch("ct", volume, [background_k])
        deadline = time.time() + 30
        while pred.stats()["prefetch"]["in_flight"] and not pred._gate._background and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(into)
    with option(pred, name):
        t0 = time.perf_counter()
        _, info = pred.segment_slice("ct", volume, click_k, None, None, box)
        seconds = time.perf_counter() - t0
    assert info["embedding"] == "computed"
    pred.prefetch_idle(timeout=120)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="medsam_lite")
    parser.add_argument("--runtime", default="onnx", choices=("onnx", "openvino"))
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads of the engine (the server's: half the cores)"
    )
    parser.add_argument("--trials", type=int, default=6, help="clicks per option")
    parser.add_argument(
        "--into", type=float, default=0.3, help="seconds into the background encode when the click comes"
    )
    parser.add_argument(
        "--export-dir", default=str(Path(tempfile.gettempdir()) / "sam_medical_bench_exports")
    )
    args = parser.parse_args()
    pred, volume, label = predictor_for(args)
    pred.segment_slice("ct", volume, 50, None, None, (150, 250, 150, 250))  # warm up
    times: dict[str, list[float]] = {name: [] for name in OPTIONS}
    ks = iter(range(12, 89))  # inside the organ, each slice encoded once
    for t in range(args.trials):
        for name in OPTIONS[t % len(OPTIONS) :] + OPTIONS[: t % len(OPTIONS)]:
            times[name].append(trial(pred, volume, label, name, next(ks), next(ks), args.into))
    p50 = {name: round(float(np.median(v)), 4) for name, v in times.items()}
    row = {
        "bench": "preemption_options",
        "command": "bench/preemption_options.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "runtime": args.runtime,
        "threads": args.threads,
        "volume": list(SHAPE),
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
        "click_p50_s": p50,
        "over_off": {name: round(p50[name] / p50["off"], 3) for name in OPTIONS},
        "all_s": {name: [round(s, 3) for s in v] for name, v in times.items()},
        "preempted": pred.stats()["prefetch"]["preempted"],
    }
    pred.close()
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
