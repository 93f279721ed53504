"""LoRA fine-tuning of SAM's image encoder on ``.npz`` slice files.

The recipe (SAMed / MedSAM):

* model: :func:`sam_medical.model.build.build_sam`, LoRA on q and v of every encoder block
  (:func:`sam_medical.adapters.lora.inject_lora`), base frozen; optionally the mask decoder trained too;
* data: :class:`sam_medical.training.dataset.NpzSliceDataset` items (slice x label, binary target) with random
  prompts (:class:`sam_medical.prompts.TrainPromptSampler`), split into training and validation by
  volume, read case by case (:class:`sam_medical.training.dataset.CaseGroupedSampler`);
* loss: MONAI ``DiceCELoss(sigmoid=True, lambda_dice=0.8, lambda_ce=0.2)`` (SAMed's 0.8 Dice + 0.2 CE)
  on the decoder's **low-resolution** logits ``(B, 1, L, L)`` (``L = S/4`` for ViT SAM, 256 for LiteMedSAM).
  The binary canvas target ``(B, 1, 256, 256)`` is brought to ``L`` by *area averaging* (``F.interpolate(mode="area")``): each
  low-res target pixel is the fraction of its footprint covered by the object, a soft target in
  ``[0, 1]``, so a structure thinner than one low-res pixel still pulls the logits up instead of
  vanishing as it would with nearest-neighbour resizing. (At ``S = 1024`` the low-res grid is the
  canvas itself and the target is unchanged.);
* optimiser: AdamW on the trainable parameters, linear warm-up then cosine decay to 0
  (``torch.optim.lr_scheduler.LambdaLR``), gradient accumulation, bf16 autocast on CUDA when supported
  (else fp16 with a ``GradScaler``), fp32 on the CPU;
* validation: MONAI ``DiceMetric`` of the thresholded canvas mask (logits upsampled to 256, > 0, zero
  outside the image region of the canvas) with deterministic prompts (tight box; interior point first),
  before the first step (``initial_val_dice``) and after every epoch. The prompt kinds validated follow
  the training mode (``both`` validates box alone and point alone and averages them);
* multi-process: under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) the model is wrapped in
  ``DistributedDataParallel`` (NCCL on CUDA, gloo on the CPU); each rank reads its own share of the
  case-grouped order and scores its share of the validation items (Dice sums are all-reduced); rank 0
  alone writes files.

Files in the run folder (all written atomically except the append-only log):

* ``adapter.pt`` -- the best adapter so far (:func:`sam_medical.adapters.lora.save_adapter`, ``extra`` holds
  ``val_dice`` and ``epoch``). Epoch 0 (the starting adapter) counts, so the file exists from the first
  validation on and the served model is never one that validated worse than where training started;
* ``last.pt`` -- everything to resume: trainable tensors, optimiser, scheduler, scaler, epoch, position
  in the epoch, step, best so far, RNG states;
* ``log.jsonl`` -- one JSON line per epoch (``event: "epoch"``; epoch 0 is the initial validation),
  optionally every ``log_every`` steps (``event: "step"``), and one line when a run is stopped;
* ``summary.json`` -- the outcome (see :func:`train`).

Stopping: a ``STOP`` file in the run folder, ``stop_event.set()``, or (in the CLI) Ctrl-C ends the run
after the current optimiser step: ``last.pt`` and ``summary.json`` (``stopped_early: true``) are
written and the best ``adapter.pt`` is kept. A ``STOP`` file left from an earlier run is removed when a
run starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sam_medical.atomic import atomic_path, write_json_atomic
from sam_medical.device import resolve_device
from sam_medical.errors import UserInputError
from sam_medical.outdir import prepare_output_dir
from sam_medical.training.config import LAMBDA_CE, LAMBDA_DICE, TrainConfig  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

STATE_FORMAT = "sam-medical-train-state"
STATE_FORMAT_VERSION = 1
#: Set to 1 to make every rank write ``rank{r}_lora_sha.txt`` (hash of its trainable tensors at the
#: start and the end): the check that DDP ranks end with identical adapters.
DEBUG_HASH_ENV = "SAM_MEDICAL_DEBUG_RANK_HASH"
#: The files of one run; a new run refuses a folder holding any of them (unless ``overwrite``).
RUN_FILES = ("summary.json", "last.pt", "log.jsonl", "adapter.pt")
# --- small helpers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a ``torchrun`` job (``world_size == 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        return cls(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA when supported, else fp16 on CUDA; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor at optimiser step ``s``: linear warm-up ``(s+1)/warmup``, then cosine from 1 to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def area_target(target: torch.Tensor, size: int) -> torch.Tensor:
    """Binary canvas target ``(B, 1, 256, 256)`` -> soft target ``(B, 1, size, size)`` by area averaging.

    Each output pixel is the covered fraction of its footprint (see the module docstring).
    """
    if target.shape[-1] == size:
        return target
    return F.interpolate(target, size=(size, size), mode="area")


def trainable_state(sam: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached CPU copies."""
    return {n: p.detach().cpu().clone() for n, p in sam.named_parameters() if p.requires_grad}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and raw bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def decode_grouped(
    sam: Sam,
    embeddings: torch.Tensor,
    points: torch.Tensor,
    point_labels: torch.Tensor,
    box: torch.Tensor,
    has_box: torch.Tensor,
    *,
    return_iou: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode a batch whose items carry different prompts, each exactly as at inference time.

    Items are grouped by (box given, number of real clicks); each group is decoded with its clicks cut to
    their real number (no ``-1`` padding) and with ``boxes=None`` or ``points=None`` where its prompt lacks
    that part, so SAM pads exactly as it does for a user's prompt. (Every extra ``-1`` "not a point" token
    changes SAM's mask -- a model trained on padded prompts would be served unpadded ones.) The sampler
    puts an item's real clicks first (:class:`~sam_medical.prompts.TrainPromptSampler`).

    Args:
        embeddings: ``(B, C, h, h)``.
        points: ``(B, P, 2)`` canvas ``[x, y]``; ``point_labels (B, P)``, -1 padding after the real clicks;
            an item with only padding has no clicks.
        box: ``(B, 4)`` canvas ``[x0, y0, x1, y1]``; ``has_box (B,)`` bool.

    Returns:
        Low-resolution logits ``(B, 1, L, L)`` in the batch's order; with ``return_iou`` also SAM's
        predicted IoU ``(B, 1)``.
    """
    from sam_medical.model.forward import decode

    device = embeddings.device
    has_box = has_box.to(device=device, dtype=torch.bool)
    n_points = (point_labels >= 0).sum(dim=1).to(device)
    if not bool((has_box | (n_points > 0)).all()):
        raise ValueError("every item needs a box or at least one click")
    outs, ious, order = [], [], []
    for hb in (True, False):
        for n in sorted({int(v) for v in n_points.tolist()}):
            idx = torch.nonzero((has_box == hb) & (n_points == n)).flatten()
            if idx.numel() == 0:
                continue
            pidx = idx.to(points.device)
            low, iou = decode(
                sam,
                embeddings[idx],
                points=points[pidx, :n] if n else None,
                point_labels=point_labels[idx.to(point_labels.device), :n] if n else None,
                boxes=box[idx.to(box.device)] if hb else None,
            )
            outs.append(low)
            ious.append(iou)
            order.append(idx)
    inverse = torch.argsort(torch.cat(order))
    logits = outs[0] if len(outs) == 1 else torch.cat(outs)[inverse]
    if not return_iou:
        return logits
    return logits, (ious[0] if len(ious) == 1 else torch.cat(ious)[inverse])


class PromptedSam(nn.Module):
    """SAM as one module from canvases and prompts to low-res logits (what DDP wraps).

    ``forward(image (B,256,256,3) uint8, points (B,P,2), point_labels (B,P), box (B,4), has_box (B,),
    keys)`` -> ``(B, 1, L, L)`` logits. With a :class:`~sam_medical.training.feature_cache.FeatureCache` and
    ``keys`` (one ``(case, slice index)`` per image), the frozen part of the encoder is computed once per
    slice.
    """

    def __init__(self, sam: Sam, features: Any = None) -> None:
        super().__init__()
        self.sam = sam
        self.features = features

    def forward(
        self,
        image: torch.Tensor,
        points: torch.Tensor,
        point_labels: torch.Tensor,
        box: torch.Tensor,
        has_box: torch.Tensor,
        keys: list[tuple[str, int]] | None = None,
    ) -> torch.Tensor:
        from sam_medical.model.forward import canvas_to_input, encode

        if self.features is not None:
            embeddings = self.features.embed(self.sam, image, keys)
        else:
            embeddings = encode(self.sam, canvas_to_input(self.sam, image))
        return decode_grouped(self.sam, embeddings, points, point_labels, box, has_box)


def batch_keys(batch: dict[str, Any]) -> list[tuple[str, int]]:
    """``(case file uid, slice index)`` of each item of a collated batch: the feature cache's keys."""
    return [(str(c), int(k)) for c, k in zip(batch["case_uid"], batch["slice_index"].tolist(), strict=True)]


@dataclass(frozen=True)
class ItemDice:
    """The validation Dice of one item (slice x label value) for one prompt kind (NaN: empty target)."""

    case: str
    slice_index: int
    label: int
    kind: str
    dice: float


@torch.no_grad()
def _batch_dices(
    sam: Sam,
    loader: Any,
    kinds: list[str],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    features: Any = None,
) -> Iterator[tuple[dict[str, Any], str, torch.Tensor]]:
    """``(batch, kind, per-item Dice (B,))`` for every batch of ``loader`` and every prompt kind.

    Each image is encoded once (its frozen part from ``features``, a
    :class:`~sam_medical.training.feature_cache.FeatureCache`, when given) and decoded once per kind (``"box"``: the
    tight box; ``"point"``: the clicks; ``"box+point"``: both). Predictions are
    ``logits_to_canvas(low_res) > 0`` on the 256 canvas, set to 0 outside ``valid_hw``; Dice per item by
    MONAI ``DiceMetric`` (NaN for an empty target). The model is in eval mode meanwhile.
    """
    from monai.metrics import DiceMetric

    from sam_medical.model.forward import canvas_to_input, decode, encode, logits_to_canvas

    was_training = sam.training
    sam.eval()
    metric = DiceMetric(include_background=True, reduction="none")
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )
    try:
        for batch in loader:
            image = batch["image"].to(device, non_blocking=True)
            target = batch["target"].to(device)
            valid = torch.zeros_like(target, dtype=torch.bool)
            for b, (h, w) in enumerate(batch["valid_hw"].tolist()):
                valid[b, :, :h, :w] = True
            with autocast:
                if features is not None:
                    emb = features.embed(sam, image, batch_keys(batch))
                else:
                    emb = encode(sam, canvas_to_input(sam, image))
                for kind in kinds:
                    use_points = "point" in kind
                    low, _ = decode(
                        sam,
                        emb,
                        points=batch["points"] if use_points else None,
                        point_labels=batch["point_labels"] if use_points else None,
                        boxes=batch["box"] if "box" in kind else None,
                    )
                    pred = (logits_to_canvas(low.float()) > 0) & valid
                    per_item = metric(y_pred=pred.float(), y=target).flatten()  # (B,), nan for empty targets
                    metric.reset()
                    yield batch, kind, per_item
    finally:
        sam.train(was_training)


def dice_sums(
    sam: Sam,
    loader: Any,
    kinds: list[str],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    features: Any = None,
) -> dict[str, tuple[float, int]]:
    """Sum and count of per-item Dice, per prompt kind, over ``loader`` (deterministic prompts).

    See :func:`_batch_dices` for how items are predicted and scored. Sums rather than means so that
    DDP ranks can add theirs (MONAI's own ``aggregate`` would gather across ranks by itself, which only
    works when every rank validates). :func:`item_dices` gives the same values item by item.
    """
    sums = {k: [0.0, 0] for k in kinds}
    for _, kind, per_item in _batch_dices(sam, loader, kinds, device, amp_dtype, features):
        ok = ~torch.isnan(per_item)
        sums[kind][0] += float(per_item[ok].sum())
        sums[kind][1] += int(ok.sum())
    return {k: (v[0], v[1]) for k, v in sums.items()}


def item_dices(
    sam: Sam,
    loader: Any,
    kinds: list[str],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    features: Any = None,
) -> list[ItemDice]:
    """The Dice of every item of ``loader`` for every prompt kind, item by item (what :func:`dice_sums`
    adds up): per-label means and paired tests before/after training are made from these."""
    out: list[ItemDice] = []
    for batch, kind, per_item in _batch_dices(sam, loader, kinds, device, amp_dtype, features):
        keys = zip(batch["case"], batch["slice_index"].tolist(), batch["label"].tolist(), strict=True)
        for (case, k, label), dice in zip(keys, per_item.tolist(), strict=True):
            out.append(ItemDice(str(case), int(k), int(label), kind, float(dice)))
    return out


def mean_dice(sums: dict[str, tuple[float, int]]) -> dict[str, float]:
    """``{kind: mean Dice}`` plus ``"mean"``, the mean over kinds (0 for a kind with no item)."""
    out = {k: (s / n if n else 0.0) for k, (s, n) in sums.items()}
    out["mean"] = float(sum(out.values()) / len(out))
    return out


def validate(
    sam: Sam, loader: Any, kinds: list[str], device: torch.device, amp_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Mean Dice per prompt kind over ``loader`` (one process), plus ``"mean"``; see :func:`dice_sums`."""
    return mean_dice(dice_sums(sam, loader, kinds, device, amp_dtype))


# --- the resumable state -------------------------------------------------------------------------

_NUMBER = (int, float)
#: What ``last.pt`` must hold for a resume, and of which types (see ``Trainer._save_state``).
STATE_KEYS: dict[str, tuple[type, ...]] = {
    "identity": (dict,),
    "trainable": (dict,),
    "optimizer": (dict,),
    "scheduler": (dict,),
    "scaler": (dict,),
    "epoch": (int,),
    "micro_done": (int,),
    "epoch_loss_sum": _NUMBER,
    "epoch_loss_count": (int,),
    "step": (int,),
    "initial_val_dice": (*_NUMBER, type(None)),
    "best_val_dice": _NUMBER,
    "best_epoch": (int,),
    "elapsed": _NUMBER,
    "train_cases": (list,),
    "train_items": (int,),
    "world_size": (int,),
    "batch_size": (int,),
    "history": (str,),
    "torch_rng": (torch.Tensor,),
}


def check_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a training state that lacks a key or holds a value of the wrong type (a damaged file).

    Raises:
        UserInputError: naming the missing or damaged keys.
    """
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise UserInputError(f"cannot resume: {path} is incomplete (missing {', '.join(missing)})")
    bad = [
        k for k, types in STATE_KEYS.items() if isinstance(state[k], bool) or not isinstance(state[k], types)
    ]
    if "trainable" not in bad and not all(isinstance(v, torch.Tensor) for v in state["trainable"].values()):
        bad.append("trainable")
    if bad:
        raise UserInputError(
            f"cannot resume: {path} is damaged (wrong values for {', '.join(sorted(set(bad)))})"
        )
    try:
        json.loads(state["history"])
    except ValueError:
        raise UserInputError(f"cannot resume: {path} is damaged (unreadable history)") from None


# --- the trainer --------------------------------------------------------------------------------


class Trainer:
    """One training run; :func:`train` is ``Trainer(config, ...).run()``.

    After :meth:`setup` (called by :meth:`run`), ``self.sam`` is the model being trained (tests inspect
    it), ``self.base_info`` its base model, ``self.train_ds``/``self.val_ds`` the datasets.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        progress: bool = True,
        stop_event: threading.Event | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.stop_event = stop_event or threading.Event()
        self.on_epoch = on_epoch
        self.on_step = on_step
        self.dist = DistInfo.from_env()
        self.out = Path(config.out)
        self._init_group = False

    # --- files ----------------------------------------------------------------------------------
    @property
    def adapter_path(self) -> Path:
        return self.out / "adapter.pt"

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.out / "summary.json"

    @property
    def stop_path(self) -> Path:
        return self.out / "STOP"

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _say(self, text: str) -> None:
        if self.dist.is_main and self.progress:
            print(text, file=sys.stderr, flush=True)

    # --- setup ----------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        import torch.distributed as tdist

        if self.dist.distributed and not tdist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            tdist.init_process_group(backend=backend, timeout=timedelta(hours=1))
            self._init_group = True

    def setup(self) -> None:
        """Data, model, optimiser, scheduler; resume or adapter initialisation. Raises UserInputError."""
        from torch.utils.data import DataLoader, Subset

        from sam_medical.adapters import lora
        from sam_medical.model.build import build_sam, count_parameters
        from sam_medical.prompts import TrainPromptSampler
        from sam_medical.training.dataset import CaseGroupedSampler, NpzSliceDataset, list_npz, split_cases

        cfg = self.config
        cfg.check()
        self.device = resolve_device(
            cfg.device, local_rank=self.dist.local_rank if self.dist.distributed else None
        )
        self.amp_dtype = amp_dtype_for(self.device)
        self._check_run_folder()

        # data (before the model: bad data is the most common mistake and the cheapest to find)
        files = list_npz(cfg.data)
        train_files, val_files = split_cases(files, cfg.val_fraction, cfg.seed)
        self.val_on_train = not val_files
        self.prompt_sampler = TrainPromptSampler(
            cfg.prompt, cfg.box_jitter, cfg.num_points, cfg.num_bg_points, cfg.drop_prob
        )
        self.train_ds = NpzSliceDataset(
            train_files,
            cfg.label_values,
            prompt_sampler=self.prompt_sampler,
            cache_size=cfg.cache_size,
            seed=cfg.seed,
        )
        try:
            self.val_ds = NpzSliceDataset(
                val_files or train_files,
                cfg.label_values,
                prompt_sampler=self.prompt_sampler,
                deterministic_seed=cfg.seed,
                cache_size=cfg.cache_size,
            )
        except UserInputError as exc:
            raise UserInputError(f"validation cases {[f.name for f in val_files]}: {exc}") from None
        val_index = list(range(len(self.val_ds)))
        if cfg.val_max_items is not None and len(val_index) > cfg.val_max_items:
            step = len(val_index) / cfg.val_max_items
            val_index = [int(i * step) for i in range(cfg.val_max_items)]
        self.val_items = len(val_index)
        # DDP: rank r scores items r, r + W, ... (contiguous runs would balance worse across cases)
        val_items = Subset(self.val_ds, val_index[self.dist.rank :: self.dist.world_size])
        self.train_sampler = CaseGroupedSampler(
            self.train_ds, shuffle=True, seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size
        )
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(
            self.train_ds,
            batch_size=cfg.batch_size,
            sampler=self.train_sampler,
            num_workers=cfg.workers,
            pin_memory=pin,
        )
        self.val_loader = DataLoader(
            val_items, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers, pin_memory=pin
        )
        self.micro_per_epoch = math.ceil(len(self.train_sampler) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        planned = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(planned, cfg.max_steps) if cfg.max_steps else planned

        # model
        init_meta = lora.read_adapter_meta(cfg.adapter_init) if cfg.adapter_init else None
        sam, self.base_info = build_sam(cfg.model, **cfg.model_kwargs())
        self.blocks = (
            lora.inject_lora(
                sam, rank=cfg.lora_rank, alpha=cfg.lora_alpha, blocks=cfg.lora_blocks, seed=cfg.seed
            )
            if cfg.lora_rank > 0
            else []
        )
        self.save_decoder = cfg.train_decoder
        if init_meta is not None:
            alpha = (
                float(cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha) if cfg.lora_rank else 1.0
            )
            theirs = (int(init_meta["rank"]), float(init_meta["alpha"]), sorted(init_meta["blocks"]))
            if theirs != (cfg.lora_rank, alpha, self.blocks):
                raise UserInputError(
                    f"--adapter-init {cfg.adapter_init} has LoRA rank {theirs[0]}, alpha {theirs[1]:g} on "
                    f"blocks {theirs[2]}, but this run uses rank {cfg.lora_rank}, alpha {alpha:g} on blocks "
                    f"{self.blocks} (set --lora-rank/--lora-alpha/--lora-blocks to match)"
                )
            lora.load_adapter(sam, cfg.adapter_init, base_info=self.base_info, inject=False)
            # a decoder that came with the starting adapter is kept in the adapters this run saves
            self.save_decoder = cfg.train_decoder or bool(init_meta.get("train_decoder"))
        lora.set_trainable(sam, cfg.train_decoder)
        self.sam = sam.to(self.device)
        self.trainable_params = count_parameters(sam, trainable_only=True)
        self.params = [p for p in sam.parameters() if p.requires_grad]

        from sam_medical.training.feature_cache import FeatureCache

        self.features = FeatureCache(
            self.sam, cfg.feature_cache_mb << 20, cfg.feature_cache_dir, self._frozen_identity(init_meta)
        )
        self._init_distributed()
        self.module: nn.Module = PromptedSam(self.sam, self.features)
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # the IoU head is not in the loss: its parameters get no gradient when the decoder trains
            self.module = DDP(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.train_decoder,
            )

        from monai.losses import DiceCELoss

        self.loss_fn = DiceCELoss(sigmoid=True, lambda_dice=cfg.dice_weight, lambda_ce=cfg.ce_weight)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * self.total_steps))
        self.warmup = min(warmup, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.warmup, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        # progress state
        self.epoch = 0  # last epoch begun (1-based); 0 = nothing trained yet
        self.micro_done = 0  # micro-batches of `epoch` already consumed (when stopped mid-epoch)
        self.step = 0
        self.initial_val_dice: float | None = None
        self.best_val_dice = -1.0
        self.best_epoch = -1
        self.elapsed_before = 0.0
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0
        self.history: list[dict[str, Any]] = []
        if cfg.resume:
            self._load_state()
            if self.step >= self.total_steps:
                raise UserInputError(
                    f"nothing to resume: the run in {self.out} is complete ({self.step} of {self.total_steps} "
                    "steps); give more --epochs or --max-steps with --resume to train it further"
                )

    def _check_run_folder(self) -> None:
        """One run per folder: a new run refuses a folder that holds another one, unless ``overwrite``.

        ``resume`` needs ``last.pt``; ``overwrite`` deletes the earlier run's files first (rank 0), so
        that an old ``summary.json`` or ``last.pt`` never sits beside a new run's files.

        Raises:
            UserInputError: ``out`` is a file or cannot be written; it holds a run and neither
                ``resume`` nor ``overwrite`` was given; ``resume`` without ``last.pt``.
        """
        cfg, out = self.config, self.out
        if out.exists() and not out.is_dir():
            raise UserInputError(f"--out {out} is a file, not a folder")
        found = [name for name in RUN_FILES if (out / name).exists()]
        if cfg.resume:
            if not self.last_path.is_file():
                why = (
                    f" (the run in {out} ended before its first validation finished: start it again with "
                    "--overwrite)"
                    if found
                    else ""
                )
                raise UserInputError(f"cannot resume: {self.last_path} does not exist{why}")
        elif found:
            if not cfg.overwrite:
                raise UserInputError(
                    f"--out {out} already holds a training run ({', '.join(found)}): continue it with "
                    "--resume, or start again with --overwrite"
                )
            if self.dist.is_main:
                for path in [
                    *(out / name for name in RUN_FILES),
                    self.stop_path,
                    *out.glob("rank*_lora_sha.txt"),
                ]:
                    path.unlink(missing_ok=True)
        prepare_output_dir(out)

    def _frozen_identity(self, init_meta: dict[str, Any] | None) -> str:
        """What the frozen encoder layers are: the base weights, plus the starting adapter's LoRA when the
        encoder is frozen whole (its cached embeddings then include that LoRA)."""
        info = self.base_info
        base = info.get("weights_digest") or f"random:{info['name']}:{info['seed']}"
        if init_meta is not None and int(init_meta.get("rank") or 0) > 0:
            from sam_medical.model.checkpoints import sha256_file

            base += f"|adapter:{sha256_file(self.config.adapter_init)}"
        return f"{info['name']}|{info['image_size']}|{base}"

    # --- resumable state ------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        cfg = self.config
        base = {
            k: self.base_info.get(k)
            for k in ("name", "image_size", "checkpoint_md5", "weights_digest", "random_weights", "seed")
        }
        return {
            "base": base,
            "rank": cfg.lora_rank,
            "alpha": float(cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha)
            if cfg.lora_rank
            else 1.0,
            "blocks": list(self.blocks),
            "train_decoder": cfg.train_decoder,
        }

    def _save_state(self, elapsed: float) -> None:
        if not self.dist.is_main:
            return
        state = {
            "format": STATE_FORMAT,
            "format_version": STATE_FORMAT_VERSION,
            "identity": self._identity(),
            "trainable": trainable_state(self.sam),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "micro_done": self.micro_done,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_loss_count": self.epoch_loss_count,
            "step": self.step,
            "initial_val_dice": self.initial_val_dice,
            "best_val_dice": self.best_val_dice,
            "best_epoch": self.best_epoch,
            "elapsed": elapsed,
            "train_cases": self.train_ds.case_names,
            "train_items": len(self.train_ds),
            "world_size": self.dist.world_size,
            "batch_size": self.config.batch_size,
            "history": json.dumps(self.history),
            "save_decoder": self.save_decoder,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        with atomic_path(self.last_path) as tmp:
            torch.save(state, tmp)

    def _load_state(self) -> None:
        try:
            state = torch.load(self.last_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserInputError(
                f"cannot resume: {self.last_path} could not be read ({type(exc).__name__})"
            ) from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserInputError(f"cannot resume: {self.last_path} is not a sam-medical training state")
        check_state(state, self.last_path)
        saved, current = state["identity"], self._identity()
        for key in ("base", "rank", "alpha", "blocks", "train_decoder"):
            if saved.get(key) != current.get(key):
                raise UserInputError(
                    f"cannot resume from {self.last_path}: it was made with {key} = {saved.get(key)}, "
                    f"but this run has {key} = {current.get(key)}"
                )
        params = dict(self.sam.named_parameters())
        trainable = state["trainable"]
        if set(trainable) != {n for n, p in params.items() if p.requires_grad}:
            raise UserInputError(
                f"cannot resume from {self.last_path}: its trainable tensors do not fit this model"
            )
        try:
            with torch.no_grad():
                for name, value in trainable.items():
                    params[name].copy_(value)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise UserInputError(
                f"cannot resume from {self.last_path}: its optimiser or model state does not fit this run "
                f"({type(exc).__name__})"
            ) from None
        self.epoch = int(state["epoch"])
        self.micro_done = int(state["micro_done"])
        self.epoch_loss_sum = float(state["epoch_loss_sum"])
        self.epoch_loss_count = int(state["epoch_loss_count"])
        self.step = int(state["step"])
        # the schedule follows this run's --lr, --epochs and --max-steps (a resumed run may be given more)
        factor = lr_lambda(self.warmup, self.total_steps)(self.step)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * factor
        self.scheduler.base_lrs = [self.config.lr for _ in self.optimizer.param_groups]
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.initial_val_dice = state["initial_val_dice"]
        self.best_val_dice = float(state["best_val_dice"])
        self.best_epoch = int(state["best_epoch"])
        self.elapsed_before = float(state["elapsed"])
        self.history = json.loads(state["history"])
        self.save_decoder = bool(state.get("save_decoder", self.save_decoder))
        same_data = (
            state["train_cases"] == self.train_ds.case_names
            and state["train_items"] == len(self.train_ds)
            and state["world_size"] == self.dist.world_size
            and state["batch_size"] == self.config.batch_size
        )
        if self.micro_done and not same_data:
            self._say("resume: the data, batch size or world size changed; the interrupted epoch restarts")
            self.micro_done = 0
            self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
        try:
            torch.set_rng_state(state["torch_rng"])
        except (TypeError, RuntimeError):
            raise UserInputError(
                f"cannot resume from {self.last_path}: its random state is damaged"
            ) from None
        if torch.cuda.is_available() and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # --- pieces of the loop ---------------------------------------------------------------------
    def _validate(self) -> dict[str, float]:
        """Validation Dice; under DDP each rank scores its share of the items and the sums are added."""
        kinds = self.config.val_kinds()
        sums = dice_sums(self.sam, self.val_loader, kinds, self.device, self.amp_dtype, self.features)
        if self.dist.distributed:
            import torch.distributed as tdist

            t = torch.tensor(
                [x for k in kinds for x in sums[k]], dtype=torch.float64, device=self._comm_device
            )
            tdist.all_reduce(t)
            values = t.tolist()
            sums = {k: (values[2 * i], int(values[2 * i + 1])) for i, k in enumerate(kinds)}
        return mean_dice(sums)

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _stop_requested(self) -> bool:
        """Stop event, stop file (rank 0) or a signal on any rank; agreed across ranks."""
        local = self.stop_event.is_set() or (self.dist.is_main and self.stop_path.exists())
        if self.dist.distributed:
            import torch.distributed as tdist

            flag = torch.tensor([1.0 if local else 0.0], device=self._comm_device)
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
            local = bool(flag.item() > 0)
        return local

    def _save_best(self, val_dice: float, epoch: int) -> None:
        from sam_medical.adapters import lora

        if self.dist.is_main:
            lora.save_adapter(
                self.sam,
                self.adapter_path,
                base_info=self.base_info,
                rank=self.config.lora_rank,
                alpha=self.config.lora_alpha,
                blocks=self.blocks,
                image_size=self.config.image_size,
                train_decoder=self.save_decoder,
                extra={
                    "val_dice": val_dice,
                    "epoch": epoch,
                    "step": self.step,
                    "val_kinds": self.config.val_kinds(),
                },
            )

    def _end_epoch_record(self, epoch: int, val: dict[str, float], seconds: float) -> dict[str, Any]:
        loss = self.epoch_loss_sum / self.epoch_loss_count if self.epoch_loss_count else None
        if self.dist.distributed and epoch > 0:
            import torch.distributed as tdist

            t = torch.tensor(
                [self.epoch_loss_sum, float(self.epoch_loss_count)],
                dtype=torch.float64,
                device=self._comm_device,
            )
            tdist.all_reduce(t)
            loss = float(t[0] / t[1]) if t[1] > 0 else None
        record = {
            "event": "epoch",
            "epoch": epoch,
            "step": self.step,
            "loss": loss,
            "val_dice": val["mean"],
            **{f"val_dice_{k.replace('+', '_')}": val[k] for k in self.config.val_kinds()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(seconds, 3),
            "best": False,
        }
        return record

    def _train_micro(self, batch: dict[str, Any], scale: float, sync: bool) -> float:
        """Forward + backward of one micro-batch; returns its loss. ``scale`` = 1 / accumulation size."""
        dev = self.device
        image = batch["image"].to(dev, non_blocking=True)
        target = batch["target"].to(dev, non_blocking=True)
        args = (
            image,
            batch["points"].to(dev),
            batch["point_labels"].to(dev),
            batch["box"].to(dev),
            batch["has_box"].to(dev),
            batch_keys(batch),
        )
        no_sync = (
            self.module.no_sync() if self.dist.distributed and not sync else contextlib.nullcontext()  # type: ignore[operator]
        )
        autocast = (
            torch.autocast(device_type=dev.type, dtype=self.amp_dtype)
            if self.amp_dtype
            else contextlib.nullcontext()
        )
        with no_sync:
            with autocast:
                low = self.module(*args)
            low = low.float()
            loss = self.loss_fn(low, area_target(target, low.shape[-1]))
            self.scaler.scale(loss * scale).backward()
        return float(loss.detach())

    def _optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _write_summary(
        self, *, stopped_early: bool, stop_reason: str | None, seconds: float, final: dict | None
    ) -> dict:
        cfg = self.config
        summary = {
            "initial_val_dice": self.initial_val_dice,
            "best_val_dice": self.best_val_dice,
            "best_epoch": self.best_epoch,
            "final_val_dice": final["mean"] if final else None,
            "epochs": self.epoch,
            "epochs_planned": cfg.epochs,
            "steps": self.step,
            "steps_planned": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "trainable_params": self.trainable_params,
            "seconds": round(seconds, 3),
            "stopped_early": stopped_early,
            "stop_reason": stop_reason,
            "train_cases": self.train_ds.case_names,
            "val_cases": [] if self.val_on_train else self.val_ds.case_names,
            "val_on_train": self.val_on_train,
            "val_kinds": cfg.val_kinds(),
            "train_items": len(self.train_ds),
            "val_items": self.val_items,
            "labels": self.train_ds.labels_present(),
            "adapter": str(self.adapter_path) if self.adapter_path.is_file() else None,
            "base": self.base_info,
            "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
            "world_size": self.dist.world_size,
            "config": cfg.to_dict(),
        }
        # the outcome, said plainly (sam_medical.training.outcome): did any epoch beat the starting model, Dice per
        # label by name, and the best adapter against the starting model item by item (both scored again)
        from sam_medical.training.feature_cache import MODE_EMBEDDING
        from sam_medical.training.outcome import paired_gain, per_label, score_start_and_best, verdict
        from sam_medical.volume.label_names import files_label_names

        cases = self.train_ds.cases + ([] if self.val_on_train else self.val_ds.cases)
        by_value = files_label_names([c.path for c in cases])
        start = best = None
        if self.adapter_path.is_file() or self.dist.distributed:
            start, best = score_start_and_best(
                cfg,
                self.adapter_path,
                self.val_loader,
                cfg.val_kinds(),
                self.device,
                self.amp_dtype,
                self.dist,
                score_start=self.best_epoch > 0,
                features=self.features if self.features.mode == MODE_EMBEDDING else None,
            )
        paired = paired_gain(start, best) if start is not None and best is not None else None
        initial, best_dice = self.initial_val_dice, self.best_val_dice
        learned, text = verdict(
            initial=initial,
            best=best_dice,
            best_epoch=max(self.best_epoch, 0),
            final=final["mean"] if final else None,
            stopped_early=stopped_early,
            steps=self.step,
            val_on_train=self.val_on_train,
            paired=paired,
        )
        summary["learned"] = learned
        summary["verdict"] = text
        summary["val_dice_gain"] = best_dice - initial if initial is not None else None
        summary["label_names"] = {str(v): n for v, n in by_value.items()}
        summary["val_dice_per_label"] = per_label(best, by_value) if best else {}
        summary["initial_val_dice_per_label"] = per_label(
            start if start is not None else best or {}, by_value
        )
        summary["paired"] = paired
        if self.dist.is_main:
            write_json_atomic(self.summary_path, summary)
        return summary

    def _debug_hash(self, tag: str) -> None:
        if os.environ.get(DEBUG_HASH_ENV) == "1":
            with open(self.out / f"rank{self.dist.rank}_lora_sha.txt", "a") as f:
                f.write(f"{tag} {tensors_sha256(trainable_state(self.sam))}\n")

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train; return the summary (also written to ``summary.json`` by rank 0)."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self.dist.is_main and self.stop_path.exists():  # left from an earlier run
            self.stop_path.unlink()
        try:
            self.setup()  # raises UserInputError before anything is written
            self.out.mkdir(parents=True, exist_ok=True)
            if self.dist.is_main and not cfg.resume:
                with atomic_path(self.log_path) as tmp:  # a fresh run starts a fresh log
                    tmp.write_text("")
            self._debug_hash("start")
            start = time.perf_counter()

            def elapsed() -> float:
                return self.elapsed_before + time.perf_counter() - start

            if self.initial_val_dice is None:
                t0 = time.perf_counter()
                val = self._validate()
                self.initial_val_dice = val["mean"]
                self.best_val_dice, self.best_epoch = val["mean"], 0
                self._save_best(val["mean"], 0)
                record = self._end_epoch_record(0, val, time.perf_counter() - t0)
                record["best"] = True
                self._finish_epoch_record(record)
                self._say(f"initial validation Dice {val['mean']:.4f} ({self.val_items} items)")
                self._save_state(elapsed())  # a run killed in its first epoch can resume from here

            stop_reason: str | None = None
            final: dict[str, float] | None = None
            # the model stays in eval mode while its adapters train: nothing in SAM depends on the mode
            # but BatchNorm (TinyViT), whose running statistics must stay frozen like every base weight
            self.sam.eval()
            show = self.progress and self.dist.is_main and sys.stderr.isatty()
            while self.step < self.total_steps and stop_reason is None:
                if self.micro_done == 0:
                    self.epoch += 1
                    self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
                if self.epoch > cfg.epochs:
                    self.epoch = cfg.epochs
                    break
                epoch, t0 = self.epoch, time.perf_counter()
                skip = self.micro_done * cfg.batch_size
                self.train_sampler.set_epoch(epoch, start=min(skip, self.train_sampler.num_samples))
                self.train_ds.set_epoch(epoch)
                bar = tqdm(
                    total=self.micro_per_epoch,
                    initial=self.micro_done,
                    desc=f"epoch {epoch}/{cfg.epochs}",
                    disable=not show,
                    leave=False,
                )
                for batch in self.train_loader:
                    m = self.micro_done
                    group_start = (m // cfg.grad_accum) * cfg.grad_accum
                    group_size = min(cfg.grad_accum, self.micro_per_epoch - group_start)
                    last_of_group = m - group_start == group_size - 1
                    loss = self._train_micro(batch, 1.0 / group_size, sync=last_of_group)
                    self.micro_done += 1
                    self.epoch_loss_sum += loss
                    self.epoch_loss_count += 1
                    bar.update(1)
                    if not last_of_group:
                        continue
                    self._optimizer_step()
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    if cfg.log_every and self.step % cfg.log_every == 0:
                        self._log(
                            {"event": "step", "epoch": epoch, "step": self.step, "loss": loss, "lr": lr}
                        )
                    if self.on_step is not None:
                        self.on_step({"epoch": epoch, "step": self.step, "loss": loss, "lr": lr})
                    if self._stop_requested():
                        stop_reason = "stop requested (STOP file, stop event or interrupt)"
                        break
                    if self.step >= self.total_steps:
                        break
                bar.close()
                if stop_reason is not None and self.micro_done < self.micro_per_epoch:
                    break  # stopped mid-epoch: no validation, state saved below
                # the epoch ended (or max_steps was reached within it): validate, keep the best
                self.micro_done = 0
                val = self._validate()
                final = val
                record = self._end_epoch_record(epoch, val, time.perf_counter() - t0)
                if val["mean"] > self.best_val_dice:
                    self.best_val_dice, self.best_epoch = val["mean"], epoch
                    self._save_best(val["mean"], epoch)
                    record["best"] = True
                self._finish_epoch_record(record)
                self._say(
                    f"epoch {epoch}: loss {record['loss']:.4f}  val Dice {val['mean']:.4f}  "
                    f"(best {self.best_val_dice:.4f} at epoch {self.best_epoch})"
                )
                self._save_state(elapsed())
            if stop_reason is not None:
                self._save_state(elapsed())
                self._log({"event": "stop", "epoch": self.epoch, "step": self.step, "reason": stop_reason})
                self._say(
                    f"stopped at step {self.step}; best adapter (epoch {self.best_epoch}) kept in {self.adapter_path}"
                )
            self._debug_hash("end")
            return self._write_summary(
                stopped_early=stop_reason is not None, stop_reason=stop_reason, seconds=elapsed(), final=final
            )
        finally:
            if self._init_group:
                import torch.distributed as tdist

                tdist.destroy_process_group()

    def _finish_epoch_record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._log(record)
        if self.on_epoch is not None and self.dist.is_main:
            self.on_epoch(dict(record))


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    stop_event: threading.Event | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one training (see the module docstring); return the summary.

    The summary (also ``RUN_DIR/summary.json``) holds ``initial_val_dice``, ``best_val_dice``,
    ``best_epoch``, ``final_val_dice``, ``epochs``, ``steps``, ``trainable_params``, ``seconds``,
    ``stopped_early``, ``train_cases``, ``val_cases``, ``val_on_train``, ``adapter`` and ``config``.

    Args:
        config: the run's settings.
        progress: show a tqdm bar (only on a terminal) and one line per epoch on stderr.
        stop_event: set it (from another thread) to end the run after the current optimiser step.
        on_epoch: called by rank 0 with each epoch's log record (epoch 0: the initial validation).
        on_step: called after every optimiser step with ``{"epoch", "step", "loss", "lr"}``.

    Raises:
        UserInputError: bad data, model, checkpoint, adapter or resume state.
    """
    return Trainer(config, progress=progress, stop_event=stop_event, on_epoch=on_epoch, on_step=on_step).run()
