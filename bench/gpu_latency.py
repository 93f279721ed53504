"""Click latency of the served PyTorch engine on one device (issue 18, "A GPU check"). One JSON line each.

LiteMedSAM (``build_sam("medsam_lite")``) through the engine the app serves on CUDA
(:func:`sam_medical.inference.runtime.build_engine` with runtime ``torch``), per precision (``fp32``,
``bf16``, ``fp16``), on a synthetic 256x256 canvas (a bright disc on noise; timings do not depend on
the picture):

* ``encoder``: ``engine.encode`` of 1 canvas and of :data:`~sam_medical.inference.engines.CUDA_ENCODE_BATCH`
  canvases (``ms_per_image`` too), with the peak CUDA memory of the batch;
* ``decoder``: ``engine.decode`` of 1 box and of 27 boxes in one call (3 sizes x 9 positions around the
  disc; the number of boxes the click-to-box search of issue 17 decoded), results back on the CPU;
* ``click_to_box``: one foreground click answered by the ``click_to_box`` strategy through
  ``decode_prompts`` (region, candidate boxes, one batched decode, chooser), when that strategy exists.

Each figure is the median (``ms_p50``) and 90th percentile (``ms_p90``) of ``--reps`` timed calls after
``--warmup`` untimed ones; CUDA is synchronised around every call. Usage::

    python bench/gpu_latency.py                       # cuda, fp32 and bf16
    python bench/gpu_latency.py --device cpu --precisions fp32 --reps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sam_medical.inference.decoding import CanvasPrompt
from sam_medical.inference.engines import CUDA_ENCODE_BATCH
from sam_medical.inference.runtime import build_engine
from sam_medical.model import forward as sf
from sam_medical.model.build import build_sam
from sam_medical.model.forward import PromptBatch

#: The disc of the synthetic canvas: centre (x, y) and radius, canvas pixels.
DISC = (128.0, 110.0, 40.0)


def canvas() -> torch.Tensor:
    """``(1, 256, 256, 3)`` uint8: noise (0-40) with a bright disc (220) at :data:`DISC`."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 40, size=(256, 256)).astype(np.uint8)
    yy, xx = np.mgrid[:256, :256]
    cx, cy, r = DISC
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 220
    return torch.from_numpy(img)[None, ..., None].expand(-1, -1, -1, 3).contiguous()


def boxes_27() -> torch.Tensor:
    """``(27, 4)`` canvas boxes ``(x0, y0, x1, y1)``: half-sizes 0.7, 1.0, 1.4 x the radius, each at the
    disc's centre shifted by -8, 0, +8 px in x and y."""
    cx, cy, r = DISC
    rows = [
        (cx + dx - h, cy + dy - h, cx + dx + h, cy + dy + h)
        for h in (0.7 * r, r, 1.4 * r)
        for dx in (-8.0, 0.0, 8.0)
        for dy in (-8.0, 0.0, 8.0)
    ]
    return torch.tensor(rows, dtype=torch.float32).clamp(0, 255)


def timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> dict[str, float]:
    """``ms_p50``, ``ms_p90`` (and ``reps``) of ``fn()``, synchronising CUDA around each call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return {"ms_p50": round(statistics.median(times), 3), "ms_p90": round(p90, 3), "reps": reps}


def peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def measure(engine: Any, sam: Any, device: torch.device, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The encoder, decoder and click-to-box rows of one engine."""
    x1 = sf.canvas_to_input(sam, canvas())
    xb = x1.expand(CUDA_ENCODE_BATCH, -1, -1, -1).contiguous()
    rows: list[dict[str, Any]] = [
        {"what": "encoder", "batch": 1, **timed(lambda: engine.encode(x1), device, args.reps, args.warmup)}
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {
        "what": "encoder",
        "batch": CUDA_ENCODE_BATCH,
        **timed(lambda: engine.encode(xb), device, args.reps, args.warmup),
    }
    row["ms_per_image"] = round(row["ms_p50"] / CUDA_ENCODE_BATCH, 3)
    row["peak_mb"] = peak_mb(device)
    rows.append(row)
    emb = engine.encode(x1)
    many = boxes_27()
    for count, boxes in ((1, many[13:14]), (27, many)):
        prompts = PromptBatch(boxes=boxes)
        row = {
            "what": "decoder",
            "boxes": count,
            **timed(lambda p=prompts: engine.decode(emb, p), device, args.reps, args.warmup),
        }
        rows.append(row)
    rows.append(click_to_box_row(engine, emb, device, args))
    return rows


def click_to_box_row(
    engine: Any, emb: torch.Tensor, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """One click answered by the ``click_to_box`` strategy, or why it could not be measured."""
    try:
        from sam_medical.inference.click_to_box import CLICK_TO_BOX  # the strategy is optional here
        from sam_medical.inference.strategies import decode_prompts
    except ImportError as exc:
        return {"what": "click_to_box", "error": f"not available: {exc}"}
    cx, cy, _ = DISC
    prompt = CanvasPrompt(
        points=np.array([[cx, cy]], np.float32),
        point_labels=np.array([1]),
        image=canvas()[0, :, :, 0].numpy().astype(np.float32),
        strategy=CLICK_TO_BOX,
    )
    answers: list = []

    def run() -> None:
        answers[:] = decode_prompts(engine, emb, [prompt], multimask="auto")

    try:
        row = {"what": "click_to_box", **timed(run, device, args.reps, args.warmup)}
    except Exception as exc:  # noqa: BLE001 - a bench row says what failed instead of stopping the others
        return {"what": "click_to_box", "error": f"{type(exc).__name__}: {exc}"}
    row["candidates"] = getattr(answers[0], "candidates", None)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--model", default="medsam_lite")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    sam, _ = build_sam(args.model)
    sam = sam.to(device).eval()
    base = {"bench": "gpu_latency", "model": args.model, "device": str(device)}
    if device.type == "cuda":
        base["gpu"] = torch.cuda.get_device_name(device)
    base["torch"] = torch.__version__
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        engine = build_engine(sam, "torch", device=device, precision=precision)
        for row in measure(engine, sam, device, args):
            print(json.dumps({**base, "precision": precision, **row}), flush=True)


if __name__ == "__main__":
    main()
