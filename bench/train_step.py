"""Benchmark one training step: seconds per step, trainable parameters and peak memory.

Prints one JSON line per configuration::

    model x image_size x mode
    models: tiny, vit_b (random weights); sizes: 256 (and 1024 when CUDA is available)
    modes:  lora            LoRA on q, v of every encoder block (rank 4), everything else frozen
            lora+decoder    LoRA plus the mask decoder
            full_encoder    the whole image encoder trainable (no LoRA), decoder frozen

One step = the training engine's own forward (:class:`sam_medical.training.prompted_sam.PromptedSam`), MONAI
``DiceCELoss`` on the low-res logits, backward and an AdamW step, on a synthetic batch of canvases
(random texture with a bright disc, box prompts). ``seconds_per_step`` is the median over ``--steps``
steps after ``--warmup`` warm-up steps.

Memory: on CUDA ``peak_memory_mb`` is ``torch.cuda.max_memory_allocated`` during the steps. On the CPU
each configuration runs in its own child process and ``peak_memory_mb`` is the growth of that process's
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) from just before the first step to the end:
activations, gradients and optimiser state, not the model itself (``model_rss_mb`` gives the RSS with
the model built). ``memory_kind`` says which.

Usage::

    python bench/train_step.py                      # all configurations, 3 timed steps each
    python bench/train_step.py --models tiny --steps 5 --batch-size 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

MODES = ("lora", "lora+decoder", "full_encoder")


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_one(
    model: str, image_size: int, mode: str, device_name: str, batch_size: int, steps: int, warmup: int
) -> dict:
    """Time ``steps`` training steps of one configuration in this process; return the JSON record."""
    import torch
    from monai.losses import DiceCELoss

    from sam_medical.adapters.inject import inject_lora, set_trainable
    from sam_medical.model.build import build_sam, count_parameters
    from sam_medical.training.config import LAMBDA_CE, LAMBDA_DICE
    from sam_medical.training.optim import amp_dtype_for
    from sam_medical.training.prompted_sam import PromptedSam
    from sam_medical.training.step import area_target

    device = torch.device(device_name)
    sam, _ = build_sam(model, image_size=image_size, random_weights=True, seed=0)
    if mode == "full_encoder":
        for p in sam.parameters():
            p.requires_grad_(False)
        for p in sam.image_encoder.parameters():
            p.requires_grad_(True)
    else:
        inject_lora(sam, rank=4, seed=0)
        set_trainable(sam, train_decoder=mode == "lora+decoder")
    sam.to(device).train()
    module = PromptedSam(sam)
    params = [p for p in sam.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = DiceCELoss(sigmoid=True, lambda_dice=LAMBDA_DICE, lambda_ce=LAMBDA_CE)
    amp = amp_dtype_for(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 60, (batch_size, 256, 256, 3), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    disc = ((yy - 100) ** 2 + (xx - 120) ** 2 <= 30**2).float()
    image[:, disc.bool()] = 220
    target = disc.expand(batch_size, 1, 256, 256).contiguous()
    points = torch.zeros(batch_size, 1, 2)
    labels = -torch.ones(batch_size, 1, dtype=torch.long)
    box = torch.tensor([[88.0, 68.0, 152.0, 132.0]]).expand(batch_size, 4).contiguous()
    has_box = torch.ones(batch_size, dtype=torch.bool)
    batch = [t.to(device) for t in (image, points, labels, box, has_box)]
    target = target.to(device)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=amp) if amp else contextlib.nullcontext():
            low = module(*batch)
        loss = loss_fn(low.float(), area_target(target, low.shape[-1]))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    model_rss = _rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak, kind = _rss_mb() - model_rss, "cpu_peak_rss_delta"
    return {
        "model": model,
        "image_size": image_size,
        "mode": mode,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "batch_size": batch_size,
        "trainable_params": count_parameters(sam, trainable_only=True),
        "total_params": count_parameters(sam),
        "seconds_per_step": round(statistics.median(times), 4),
        "step_seconds": [round(t, 3) for t in times],
        "steps_timed": steps,
        "peak_memory_mb": round(peak, 1),
        "memory_kind": kind,
        "model_rss_mb": round(model_rss, 1),
        "amp": str(amp).replace("torch.", "") if amp else "fp32",
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "vit_b"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="default: 256, plus 1024 on CUDA")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one configuration
    args = parser.parse_args(argv)

    if args.one:
        cfg = json.loads(args.one)
        print(json.dumps(run_one(**cfg)), flush=True)
        return 0

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.sizes or ([256, 1024] if device.startswith("cuda") else [256])
    for model in args.models:
        for size in sizes:
            for mode in args.modes:
                cfg = {"model": model, "image_size": size, "mode": mode, "device_name": device,
                       "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup}  # fmt: skip
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                    try:
                        print(json.dumps(run_one(**cfg)), flush=True)
                    except torch.OutOfMemoryError:
                        print(json.dumps({**cfg, "error": "out of memory"}), flush=True)
                    continue
                # CPU: a fresh process per configuration, so that the peak RSS belongs to it alone
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True
                )
                if proc.returncode != 0:
                    print(json.dumps({**cfg, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
                else:
                    print(proc.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
