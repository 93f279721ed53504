"""Where LiteMedSAM's time goes on the CPU: its encoder and decoder by stage, fp32 PyTorch, at 1 and 2
threads; and the whole encoder and decoder with each runtime (issue #12, item 1).

Encoder stages: ``patch_embed``, ``layers[0]`` (2 MBConv at 256x256 + merge), ``layers[1]`` (2 blocks at
128x128, window 7 + merge), ``layers[2]`` (6 blocks at 64x64, window 14 + merge), ``layers[3]`` (2 blocks,
window 7), ``neck``. Decoder stages (one box prompt): prompt encoder, dense positional encoding,
two-way transformer, output upscaling, hypernetwork MLPs + mask product, IoU head. Every stage runs on its
own input, ``--reps`` times; thread counts (and runtimes) alternate inside every repetition, so that
outside load hits them alike. The input is the middle slice of a sample volume, as the app makes it.

Prints one JSON line: ``encoder`` / ``decoder`` -> stage -> ``{"1t": {"median_s", "p90_s"}, ...}``,
``runtimes`` -> ``{"torch": {"encoder_1t": ...}, "onnx": ...}``, and the load average before and after.
Usage::

    .venv/bin/python bench/profile_encoder.py [--reps 10] [--threads 1,2] [--runtimes torch,onnx]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def summarise(times: list[float]) -> dict[str, float]:
    t = sorted(times)
    return {
        "median_s": round(statistics.median(t), 5),
        "p90_s": round(t[min(len(t) - 1, round(0.9 * (len(t) - 1)))], 5),
    }


def sample_input(sam) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input of the middle slice of ``phantom_000`` and a box around its centre."""
    from sam_medical.inference.caches import VolumeCache
    from sam_medical.inference.predictor import VolumePredictor
    from sam_medical.model import forward as sf

    key, vol, _ = VolumeCache().load(REPO / "sample_volumes" / "phantom_000.nii.gz")
    prep = VolumePredictor(sam, "base").prepare(key, vol)
    canvas = torch.from_numpy(prep.canvas(vol.shape[2] // 2))[None]
    return sf.canvas_to_input(sam, canvas), torch.tensor([[70.0, 70.0, 180.0, 170.0]])


def encoder_stages(enc) -> list[tuple[str, object]]:
    def neck(x):
        b, n, c = x.shape
        side = int(round(n**0.5))
        return enc.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))

    return [
        ("patch_embed", enc.patch_embed),
        ("layers[0] MBConv x2 @256 + merge", enc.layers[0]),
        ("layers[1] 2 blocks @128 win 7 + merge", enc.layers[1]),
        ("layers[2] 6 blocks @64 win 14 + merge", enc.layers[2]),
        ("layers[3] 2 blocks @64 win 7", enc.layers[3]),
        ("neck", neck),
    ]


def decoder_stages(sam, emb: torch.Tensor, box: torch.Tensor) -> list[tuple[str, object]]:
    pe, md = sam.prompt_encoder, sam.mask_decoder
    sparse, dense = pe(points=None, boxes=box, masks=None)
    tokens = torch.cat([torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0)[None], sparse], 1)
    src, pos = emb + dense, pe.get_dense_pe()
    hs, out = md.transformer(src, pos, tokens)
    out = out.transpose(1, 2).reshape(emb.shape)
    up = md.output_upscaling(out)

    def hyper():
        h = torch.stack([md.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(md.num_mask_tokens)], 1)
        b, c, hh, ww = up.shape
        return (h @ up.view(b, c, hh * ww)).view(b, -1, hh, ww)

    return [
        ("prompt encoder", lambda: pe(points=None, boxes=box, masks=None)),
        ("dense PE", pe.get_dense_pe),
        ("two-way transformer", lambda: md.transformer(src, pos, tokens)),
        ("output upscaling", lambda: md.output_upscaling(out)),
        ("hypernet MLPs + mask product", hyper),
        ("IoU head", lambda: md.iou_prediction_head(hs[:, 0])),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument(
        "--runtimes", default="torch,onnx", help="whole encoder/decoder per runtime (torch, onnx, openvino)"
    )
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]

    from sam_medical.inference.runtime import build_engine
    from sam_medical.model.build import build_sam
    from sam_medical.model.forward import PromptBatch

    sam, info = build_sam("medsam_lite")
    x, box = sample_input(sam)
    load_before = os.getloadavg()
    engines = {}
    with tempfile.TemporaryDirectory() as cache:
        for rt in runtimes:
            for t in threads:
                engines[(rt, t)] = build_engine(sam, rt, base_info=info, export_dir=cache, threads=t)
    times: dict[str, dict[int, list[float]]] = {}

    def timed(name: str, t: int, fn, *a) -> object:
        t0 = time.perf_counter()
        out = fn(*a)
        times.setdefault(name, {}).setdefault(t, []).append(time.perf_counter() - t0)
        return out

    with torch.inference_mode():
        enc_stages = encoder_stages(sam.image_encoder)
        inputs, h = [], x
        for _, fn in enc_stages:
            inputs.append(h)
            h = fn(h)
        emb = h
        dec_stages = decoder_stages(sam, emb, box)
        for rep in range(args.reps + 1):  # the first repetition warms up and is dropped
            for t in threads:
                torch.set_num_threads(t)
                for (name, fn), inp in zip(enc_stages, inputs, strict=True):
                    timed("enc:" + name, t, fn, inp)
                for name, fn in dec_stages:
                    timed("dec:" + name, t, fn)
                for rt in runtimes:
                    engine = engines[(rt, t)]
                    timed(f"rt:{rt}:encoder", t, engine.encode, x)
                    timed(f"rt:{rt}:decoder", t, lambda e=engine: e.decode(emb, PromptBatch(boxes=box)))
            if rep == 0:
                times.clear()
    out = {
        "model": "medsam_lite",
        "torch": torch.__version__,
        "reps": args.reps,
        "threads": threads,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "encoder": {},
        "decoder": {},
        "runtimes": {},
    }
    for key, per_thread in times.items():
        kind, _, name = key.partition(":")
        for t, values in per_thread.items():
            if kind == "rt":
                rt, part = name.split(":")
                out["runtimes"].setdefault(rt, {})[f"{part}_{t}t"] = summarise(values)
            else:
                section = out["encoder" if kind == "enc" else "decoder"]
                section.setdefault(name, {})[f"{t}t"] = summarise(values)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
