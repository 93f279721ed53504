"""A training run on ``.npz`` slice files: fine-tunes SAM's mask decoder and, with ``lora_rank`` > 0, LoRA
adapters on q and v of the image encoder's attention; everything else stays frozen.

The recipe (SAMed / MedSAM), one module per part:

* model: :mod:`sam_medical.training.trained_model` (the base from :func:`sam_medical.model.build.build_sam`;
  LoRA by :func:`sam_medical.adapters.inject.inject_lora`; ``adapter_init`` to continue from an adapter);
* data: :mod:`sam_medical.training.loaders` (slice x label items with random prompts, split by volume, read
  case by case); the frozen encoder's outputs come from :mod:`sam_medical.training.feature_cache`;
* one micro-batch: :func:`sam_medical.training.step.train_step` (Dice + cross-entropy on the low-res logits),
  or with ``click_rounds`` the interactive rounds of :mod:`sam_medical.training.interactive_sam`;
* optimiser: :mod:`sam_medical.training.optim` (AdamW, warm-up + cosine, gradient accumulation, bf16/fp16
  autocast on CUDA, fp32 on the CPU);
* validation: :mod:`sam_medical.training.validation` (Dice with deterministic prompts of the kinds the
  training mode uses), before the first step (``initial_val_dice``) and after every epoch;
* multi-process: :mod:`sam_medical.training.distributed`: under ``torchrun`` the model is wrapped in
  ``DistributedDataParallel``; each rank reads its share of the data and scores its share of the
  validation items; rank 0 alone writes files;
* files and resume: :mod:`sam_medical.training.run_folder`, :mod:`sam_medical.training.state`;
* the outcome (verdict, Dice per label, paired gain): :mod:`sam_medical.training.outcome`.

Stopping: a ``STOP`` file in the run folder, ``stop_event.set()``, or (in the CLI) Ctrl-C ends the run
after the current optimiser step: ``last.pt`` and ``summary.json`` (``stopped_early: true``) are written
and the best ``adapter.pt`` is kept. A ``STOP`` file left from an earlier run is removed when a run starts.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sam_medical.adapters.save_and_load import save_adapter
from sam_medical.device import resolve_device
from sam_medical.errors import UserInputError
from sam_medical.training.config import TrainConfig
from sam_medical.training.distributed import (
    DistInfo,
    any_rank,
    end_group,
    init_group,
    sum_over_ranks,
    wrap_ddp,
)
from sam_medical.training.feature_cache import MODE_EMBEDDING, FeatureCache
from sam_medical.training.loaders import build_data
from sam_medical.training.optim import Optimisation, amp_dtype_for
from sam_medical.training.run_folder import RunFolder
from sam_medical.training.state import (
    RunProgress,
    read_state,
    restore_state,
    save_state,
    write_rank_hash,
)
from sam_medical.training.step import build_module, make_loss, train_step
from sam_medical.training.summary import Facts, write_summary
from sam_medical.training.trained_model import build_trained_model
from sam_medical.training.validation import Validation, validate

STOP_REASON = "stop requested (STOP file, stop event or interrupt)"


class Trainer:
    """One training run; :func:`train` is ``Trainer(config, ...).run()``.

    After :meth:`setup` (called by :meth:`run`), ``self.sam`` is the model being trained (tests inspect
    it), ``self.base_info`` its base model, ``self.data`` the datasets and loaders, ``self.state`` the
    progress.
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
        self.folder = RunFolder(Path(config.out), self.dist.is_main)
        self._init_group = False
        self._clock = time.perf_counter()

    def _say(self, text: str) -> None:
        if self.dist.is_main and self.progress:
            print(text, file=sys.stderr, flush=True)

    # --- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Data, model, optimiser, scheduler; resume or adapter initialisation. Raises UserInputError."""
        cfg = self.config
        cfg.check()
        local_rank = self.dist.local_rank if self.dist.distributed else None
        self.device = resolve_device(cfg.device, local_rank=local_rank)
        self.amp_dtype = amp_dtype_for(self.device, cfg.precision)
        self.folder.check(resume=cfg.resume, overwrite=cfg.overwrite)
        # data before the model: bad data is the most common mistake and the cheapest to find
        self.data = build_data(cfg, self.dist, pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = math.ceil(self.data.micro_per_epoch / cfg.grad_accum)
        planned = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(planned, cfg.max_steps) if cfg.max_steps else planned
        self.model = build_trained_model(cfg)
        self.sam, self.base_info = self.model.sam.to(self.device), self.model.base_info
        self.trainable_params = self.model.trainable_params
        self.features = FeatureCache(
            self.sam, cfg.feature_cache_mb << 20, cfg.feature_cache_dir, self.model.frozen_identity()
        )
        self._init_group = init_group(self.dist, self.device)
        # some trainable parameters get no gradient (the IoU head, or mask tokens a round does not use)
        self.module = wrap_ddp(
            build_module(cfg, self.sam, self.features), self.dist, self.device, cfg.train_decoder
        )
        self.loss_fn = make_loss(cfg)
        params = [p for p in self.sam.parameters() if p.requires_grad]
        self.optim = Optimisation.build(params, cfg, self.total_steps, self.amp_dtype)
        self.state = RunProgress(save_decoder=self.model.save_decoder)
        if cfg.resume:
            self._resume()

    def _layout(self) -> dict[str, Any]:
        return self.data.layout(self.dist.world_size, self.config.batch_size)

    def _resume(self) -> None:
        """Continue from ``last.pt``: tensors, optimiser, progress; this run's learning-rate schedule."""
        path = self.folder.last
        state = read_state(path, self.model.identity())
        restore_state(state, path, self.sam, self.optim)
        save_decoder = self.state.save_decoder
        self.state = RunProgress.from_state(state)
        if "save_decoder" not in state:
            self.state.save_decoder = save_decoder
        self.optim.follow_schedule_at(self.state.step)
        if self.state.micro_done and any(state[k] != v for k, v in self._layout().items()):
            self._say("resume: the data, batch size or world size changed; the interrupted epoch restarts")
            self.state.micro_done = 0
            self.state.epoch_loss_sum, self.state.epoch_loss_count = 0.0, 0
        if self.state.step >= self.total_steps:
            raise UserInputError(
                f"nothing to resume: the run in {self.folder.out} is complete ({self.state.step} of "
                f"{self.total_steps} steps); give more --epochs or --max-steps with --resume to train it further"
            )

    # --- files ----------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.state.elapsed + time.perf_counter() - self._clock

    def _save_state(self) -> None:
        if self.dist.is_main:
            save_state(
                self.folder.last,
                identity=self.model.identity(),
                layout=self._layout(),
                sam=self.sam,
                optim=self.optim,
                progress=self.state,
                elapsed=self._elapsed(),
            )

    def _save_best(self, val_dice: float, epoch: int) -> None:
        if not self.dist.is_main:
            return
        cfg = self.config
        extra = {"val_dice": val_dice, "epoch": epoch, "step": self.state.step, "val_kinds": cfg.val_kinds()}
        save_adapter(
            self.sam,
            self.folder.adapter,
            base_info=self.base_info,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            blocks=self.model.blocks,
            image_size=cfg.image_size,
            train_decoder=self.state.save_decoder,
            trained_prompts=cfg.trained_prompts(),
            extra=extra,
        )

    # --- validation and epoch records -----------------------------------------------------------
    def _validate(self) -> dict[str, float]:
        """Validation Dice per prompt kind and ``mean``; under DDP the ranks' sums are added."""
        return validate(self.sam, self._validation(self.features), self.dist)

    def _validation(self, features: FeatureCache | None) -> Validation:
        """The validation items, prompt kinds, device and AMP of this run; ``features`` for the encoder."""
        cfg = self.config
        loader, multimask = self.data.val_loader, cfg.click_rounds > 0
        return Validation(loader, cfg.val_kinds(), self.device, self.amp_dtype, features, multimask)

    def _epoch_record(self, epoch: int, val: dict[str, float], seconds: float) -> dict[str, Any]:
        total, count = self.state.epoch_loss_sum, float(self.state.epoch_loss_count)
        if epoch > 0:
            total, count = sum_over_ranks([total, count], self.dist, self.device)
        return {
            "event": "epoch",
            "epoch": epoch,
            "step": self.state.step,
            "loss": total / count if count > 0 else None,
            "val_dice": val["mean"],
            **{f"val_dice_{k.replace('+', '_')}": val[k] for k in self.config.val_kinds()},
            "lr": self.optim.current_lr,
            "seconds": round(seconds, 3),
            "best": False,
        }

    def _finish_epoch_record(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        self.folder.log(record)
        if self.on_epoch is not None and self.dist.is_main:
            self.on_epoch(dict(record))

    def _initial_validation(self) -> None:
        """Epoch 0: the starting model's Dice; it is the first best (``adapter.pt`` exists from here on)."""
        t0 = time.perf_counter()
        val = self._validate()
        self.state.initial_val_dice = val["mean"]
        self.state.best_val_dice, self.state.best_epoch = val["mean"], 0
        self._save_best(val["mean"], 0)
        record = self._epoch_record(0, val, time.perf_counter() - t0)
        record["best"] = True
        self._finish_epoch_record(record)
        self._say(f"initial validation Dice {val['mean']:.4f} ({self.data.val_items} items)")
        self._save_state()  # a run killed in its first epoch can resume from here

    def _end_epoch(self, epoch: int, t0: float) -> dict[str, float]:
        """Validate after an epoch (or when ``max_steps`` was reached within it), keep the best."""
        st = self.state
        val = self._validate()
        record = self._epoch_record(epoch, val, time.perf_counter() - t0)
        if val["mean"] > st.best_val_dice:
            st.best_val_dice, st.best_epoch = val["mean"], epoch
            self._save_best(val["mean"], epoch)
            record["best"] = True
        self._finish_epoch_record(record)
        self._say(
            f"epoch {epoch}: loss {record['loss']:.4f}  val Dice {val['mean']:.4f}  "
            f"(best {st.best_val_dice:.4f} at epoch {st.best_epoch})"
        )
        self._save_state()
        return val

    # --- the loop -------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """Stop event, stop file (rank 0) or a signal on any rank; agreed across ranks."""
        local = self.stop_event.is_set() or (self.dist.is_main and self.folder.stop.exists())
        return any_rank(local, self.dist, self.device)

    def _after_step(self, epoch: int, loss: float, bar: Any) -> str | None:
        """Take the optimiser step; log, report; the stop reason when a stop was requested."""
        self.optim.step()
        self.state.step += 1
        record = {"epoch": epoch, "step": self.state.step, "loss": loss, "lr": self.optim.current_lr}
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
        if self.config.log_every and self.state.step % self.config.log_every == 0:
            self.folder.log({"event": "step", **record})
        if self.on_step is not None:
            self.on_step(record)
        return STOP_REASON if self._stop_requested() else None

    def _train_epoch(self, show: bool) -> str | None:
        """The rest of the current epoch (from ``micro_done``), with gradient accumulation; the stop reason
        when a stop was requested."""
        cfg, st, data = self.config, self.state, self.data
        epoch = st.epoch
        sampler = data.train_sampler
        sampler.set_epoch(epoch, start=min(st.micro_done * cfg.batch_size, sampler.num_samples))
        data.train_ds.set_epoch(epoch)
        desc = f"epoch {epoch}/{cfg.epochs}"
        bar = tqdm(
            total=data.micro_per_epoch, initial=st.micro_done, desc=desc, disable=not show, leave=False
        )
        with bar:
            for batch in data.train_loader:
                group_start = (st.micro_done // cfg.grad_accum) * cfg.grad_accum
                group_size = min(cfg.grad_accum, data.micro_per_epoch - group_start)
                last_of_group = st.micro_done - group_start == group_size - 1
                loss = train_step(
                    self.module,
                    batch,
                    self.loss_fn,
                    self.optim.scaler,
                    device=self.device,
                    amp_dtype=self.amp_dtype,
                    scale=1.0 / group_size,
                    sync=last_of_group,
                )
                st.micro_done += 1
                st.epoch_loss_sum += loss
                st.epoch_loss_count += 1
                bar.update(1)
                if last_of_group:
                    stop = self._after_step(epoch, loss, bar)
                    if stop is not None or st.step >= self.total_steps:
                        return stop
        return None

    def _train_epochs(self) -> tuple[str | None, dict[str, float] | None]:
        """Epochs until ``total_steps`` or a stop: ``(stop reason, last validation)``."""
        st = self.state
        show = self.progress and self.dist.is_main and sys.stderr.isatty()
        stop_reason: str | None = None
        final: dict[str, float] | None = None
        while st.step < self.total_steps and stop_reason is None:
            if st.micro_done == 0:
                st.start_epoch()
            if st.epoch > self.config.epochs:
                st.epoch = self.config.epochs
                break
            t0 = time.perf_counter()
            stop_reason = self._train_epoch(show)
            if stop_reason is not None and st.micro_done < self.data.micro_per_epoch:
                break  # stopped mid-epoch: no validation, the state is saved by the caller
            st.micro_done = 0
            final = self._end_epoch(st.epoch, t0)
        return stop_reason, final

    def run(self) -> dict[str, Any]:
        """Train; return the summary (also written to ``summary.json`` by rank 0)."""
        self.folder.remove_stale_stop()
        try:
            self.setup()  # raises UserInputError before anything is written
            self.folder.out.mkdir(parents=True, exist_ok=True)
            if not self.config.resume:
                self.folder.start_log()
            write_rank_hash(self.folder.out, self.dist.rank, "start", self.sam)
            self._clock = time.perf_counter()
            if self.state.initial_val_dice is None:
                self._initial_validation()
            # the model stays in eval mode while its adapters train: nothing in SAM depends on the mode
            # but BatchNorm (TinyViT), whose running statistics must stay frozen like every base weight
            self.sam.eval()
            stop_reason, final = self._train_epochs()
            if stop_reason is not None:
                st = self.state
                self._save_state()
                self.folder.log({"event": "stop", "epoch": st.epoch, "step": st.step, "reason": stop_reason})
                self._say(
                    f"stopped at step {st.step}; best adapter (epoch {st.best_epoch}) kept in {self.folder.adapter}"
                )
            write_rank_hash(self.folder.out, self.dist.rank, "end", self.sam)
            seconds = self._elapsed()
            return write_summary(
                self.config,
                self.state,
                self.data,
                self.folder,
                Facts(self.total_steps, self.steps_per_epoch, self.trainable_params, self.base_info),
                dist=self.dist,
                # the starting model may share the cache only where it holds what the base encoder computes
                # (embedding mode: a stem cache's trunk belongs to the trained model)
                validation=self._validation(self.features if self.features.mode == MODE_EMBEDDING else None),
                stop_reason=stop_reason,
                final=final,
                seconds=seconds,
            )
        finally:
            if self._init_group:
                end_group()


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
    ``stopped_early``, ``train_cases``, ``val_cases``, ``val_on_train``, ``adapter``, ``config`` and the
    outcome (``learned``, ``verdict``, Dice per label, ``paired``).

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
