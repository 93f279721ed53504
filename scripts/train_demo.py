"""Train the offline CPU demo model from scratch on phantoms, reproducibly.

The ``demo`` model (``sam_medical.models.DEMO_CONFIG``: a SAM-architecture model of 4.6 M parameters
built from ``segment_anything.modeling`` classes) is NOT a foundation model: it is trained here, from
seeded random weights, on CT phantoms from ``sam-medical make-samples``, so that the README's main
command gives sensible masks on the bundled sample volumes on a machine with no internet.

Everything is trained (image encoder, prompt encoder, mask decoder), with the prompts users give:
jittered boxes, 1-3 foreground clicks plus an optional background click, or both (one kind dropped at
random half of the time). Loss: MONAI ``DiceCELoss(sigmoid=True)`` on the low-res logits against the
area-averaged target (as in ``sam_medical.training``), plus MSE between SAM's predicted IoU and the
IoU of its thresholded mask, so that ``pred_iou`` means something.

    python scripts/train_demo.py --minutes 40 --out runs/demo       # writes sam_medical/assets/demo_sam.pt

The exact command, seed and time of the committed weights are in ``sam_medical/assets/demo_sam.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader

from sam_medical.atomic import write_json_atomic
from sam_medical.data import CaseGroupedSampler, NpzSliceDataset
from sam_medical.models import DEMO_ASSET, build_sam, count_parameters, save_full_model
from sam_medical.preprocess import PreprocessOptions, find_cases, preprocess_cases
from sam_medical.prompts import TrainPromptSampler
from sam_medical.sam_forward import canvas_to_input, encode
from sam_medical.samples import make_samples
from sam_medical.training import area_target, decode_grouped, lr_lambda


def prepare_data(out: Path, count: int, seed: int) -> Path:
    raw, npz = out / "phantoms", out / "npz"
    if not (npz / "manifest.json").exists():
        make_samples(raw, count=count, seed=seed)
        cases, _, _ = find_cases(raw)
        preprocess_cases(cases, npz, PreprocessOptions(modality="ct", window="abdomen"), workers=2)
    return npz


def step_loss(sam, batch, loss_fn) -> tuple[torch.Tensor, float]:
    """Encode the batch once, decode each prompt-kind group as at inference; segmentation + IoU-head loss."""
    emb = encode(sam, canvas_to_input(sam, batch["image"]))
    target = area_target(batch["target"], sam.prompt_encoder.mask_input_size[0])
    low, iou_pred = decode_grouped(
        sam, emb, batch["points"], batch["point_labels"], batch["box"], batch["has_box"], return_iou=True
    )
    with torch.no_grad():
        pred = (low > 0).float()
        hard = (target > 0.5).float()
        inter = (pred * hard).sum(dim=(1, 2, 3))
        iou = inter / ((pred + hard) > 0).float().sum(dim=(1, 2, 3)).clamp(min=1)
        dice = (2 * inter / (pred.sum(dim=(1, 2, 3)) + hard.sum(dim=(1, 2, 3))).clamp(min=1)).mean().item()
    loss = loss_fn(low, target) + torch.nn.functional.mse_loss(iou_pred[:, 0], iou)
    return loss, dice


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--count", type=int, default=24, help="phantom volumes to train on")
    ap.add_argument("--data-seed", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=40.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--asset", type=Path, default=DEMO_ASSET)
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue from a full-model file of an earlier run (e.g. runs/demo/demo_sam_last.pt)",
    )
    ap.add_argument("--warmup", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    npz = prepare_data(args.out, args.count, args.data_seed)

    if args.init:
        sam, base_info = build_sam("demo", checkpoint=args.init)
        base_info = dict(base_info, checkpoint=None, checkpoint_md5=None)
    else:
        sam, base_info = build_sam("demo", random_weights=True, seed=args.seed)
    sam.train()
    for p in sam.parameters():
        p.requires_grad_(True)
    sampler = TrainPromptSampler(mode="both", box_jitter=5, num_points=3, num_bg_points=1, drop_prob=0.5)
    ds = NpzSliceDataset(npz, prompt_sampler=sampler, cache_size=4, seed=args.seed)
    order = CaseGroupedSampler(ds, shuffle=True, seed=args.seed)
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=order, drop_last=True, num_workers=0)
    # Time-bounded run: the schedule assumes max_steps, the loop stops at the time budget.
    steps_per_epoch = len(loader)
    est_steps = args.max_steps
    opt = torch.optim.AdamW(sam.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(args.warmup, est_steps // 10), est_steps))
    loss_fn = DiceCELoss(sigmoid=True, lambda_dice=0.8, lambda_ce=0.2)
    start, step, epoch = time.time(), 0, 0
    deadline = start + args.minutes * 60
    log = (args.out / "log.jsonl").open("a")
    running = []
    while step < args.max_steps and time.time() < deadline:
        order.set_epoch(epoch)
        ds.set_epoch(epoch)
        for batch in loader:
            loss, dice = step_loss(sam, batch, loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            running.append((loss.item(), dice))
            if step % 50 == 0:
                lo, di = np.mean(running, axis=0)
                running = []
                rec = {
                    "step": step,
                    "epoch": epoch,
                    "loss": round(float(lo), 4),
                    "train_dice": round(float(di), 4),
                    "lr": sched.get_last_lr()[0],
                    "seconds": round(time.time() - start, 1),
                }
                print(json.dumps(rec), flush=True)
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if step % 500 == 0:
                save_full_model(sam, args.out / "demo_sam_last.pt", base_info, half=False)
            if step >= args.max_steps or time.time() >= deadline:
                break
        epoch += 1
    seconds = time.time() - start
    sam.eval()
    info = dict(base_info, checkpoint=None, random_weights=False, trained_by="scripts/train_demo.py")
    save_full_model(sam, args.asset, info, half=True)
    record = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "init": str(args.init) if args.init else None,
        "seed": args.seed,
        "data_seed": args.data_seed,
        "phantoms": args.count,
        "items": len(ds),
        "steps_per_epoch": steps_per_epoch,
        "steps": step,
        "epochs": epoch,
        "seconds": round(seconds, 1),
        "minutes": round(seconds / 60, 1),
        "parameters": count_parameters(sam),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__,
    }
    write_json_atomic(args.asset.with_suffix(".json"), record)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
