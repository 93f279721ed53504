"""``sam_lora``: fine-tuning (the default recipe: the mask decoder; LoRA too with ``lora_rank`` > 0) on the
datastore's final labels, validated, published as a new version.

MONAI Label runs ``POST /train/sam_lora`` in a **subprocess** (``monailabel.utils.async_tasks``:
``python -m monailabel.interfaces.utils.app -m train``), which builds the app again and calls this task.
``DELETE /train/`` kills that process. So:

1. the images with a ``final`` label (``datastore.datalist()``, including labels saved from Slicer
   through ``PUT /datastore/label``) are preprocessed with :mod:`sam_medical.canvas.preprocess` -- the same code
   as ``sam-medical preprocess``, with the served ``window`` and the app's label names -- into a
   temporary folder inside ``<app>/model/train/``;
2. :func:`sam_medical.training.trainer.train` trains an adapter (the recipe's mask decoder; LoRA too with
   ``lora_rank`` > 0) on every label value of those maps, on the
   served base model, starting from the currently served adapter when its rank matches (continual
   fine-tuning); its summary gives the validation Dice per label, by name;
3. the adapter is **validated**: with ``publish=if_better`` it is published only when its validation Dice
   gain over the starting model is at least ``publish_margin`` and, with at least ``publish_min_items``
   paired validation items, a one-sided Wilcoxon signed-rank test over those items is significant at
   ``publish_alpha`` (:func:`sam_medical.training.outcome.publish_decision`); it must load into a freshly built
   base model with the base check of :func:`sam_medical.adapters.save_and_load.load_adapter`, and give finite outputs;
4. it is published atomically as a new version (:class:`sam_medical.adapters.store.ModelStore`); the infer
   tasks pick it up at their next request. Earlier versions are kept.

The training subprocess lowers its own scheduling priority (``nice`` 10) so that clicks served while it
runs keep the CPU. A failed, refused or killed run publishes nothing: the served model stays as it was. Progress goes to
``<app>/model/train/status.json`` (atomic rewrites), which :meth:`SamLoraTrain.stats` reads for
``/info/``'s ``train_stats`` (the keys Slicer's progress bar reads: ``epoch``, ``total_epochs``,
``best_metric``, ``total_time`` when finished). When a run ends, the status says whether it was
published and why: ``published``, ``reason`` (one sentence with the numbers), ``publish`` (the rule and
the numbers: ``gain``, ``initial``, ``best``, ``n``, ``p_value``, ``margin``, ``alpha``, ``min_items``),
and ``summary`` (``learned``, ``verdict``, ``val_dice_per_label``, ``initial_val_dice_per_label``,
``paired``, ...).

Request options (Slicer's options table, or the JSON body of ``POST /train/sam_lora``): ``epochs``,
``learning_rate``, ``lora_rank``, ``prompt`` (box, point, box+point, mixed), ``max_steps`` (0: no cap),
``batch_size``, ``train_decoder``, ``val_fraction``, ``val_max_items`` (validation items, evenly spread;
0: all), ``publish`` (``if_better`` or ``always``), ``publish_margin``, ``publish_alpha``,
``publish_min_items``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from sam_medical.adapters.files import read_adapter_meta
from sam_medical.adapters.save_and_load import load_adapter
from sam_medical.adapters.store import ModelStore
from sam_medical.atomic import write_json_atomic
from sam_medical.canvas.preprocess import PreprocessOptions, preprocess_cases
from sam_medical.errors import UserInputError
from sam_medical.model import forward as sam_forward
from sam_medical.training.config import TrainConfig, app_options
from sam_medical.training.outcome import PublishRule, publish_decision
from sam_medical.training.trainer import train
from sam_medical.volume.dataset_layout import CasePair
from sam_medical.volume.intensity import window_options
from sam_medical.volume.io import image_stem

from ..settings import SamAppConfig, build_base_model
from .options import option_table, train_options

logger = logging.getLogger(__name__)

#: Scheduling niceness of the training subprocess (the server's clicks run at normal priority).
TRAIN_NICENESS = 10
#: Run folders kept in ``<app>/model/train`` (log, summary, last state; the slice files are deleted).
KEEP_RUNS = 5
#: The summary keys kept in the train status and in a published version's metadata.
SUMMARY_KEYS = (
    "initial_val_dice",
    "best_val_dice",
    "best_epoch",
    "final_val_dice",
    "steps",
    "seconds",
    "train_cases",
    "val_cases",
    "val_items",
    "learned",
    "verdict",
    "label_names",
    "val_dice_per_label",
    "initial_val_dice_per_label",
    "paired",
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_config(
    app: SamAppConfig, opts: dict[str, Any], work: Path, init: str | None, cases: list[str]
) -> TrainConfig:
    """The :class:`TrainConfig` of a run: every option of the app's table (``opts``, by field name, from
    :func:`.options.train_options`) and the fields the app sets itself (its settings, folders, the served
    adapter to start from)."""
    return TrainConfig(
        data=str(work / "npz"),
        out=str(work / "out"),
        model=app.model,
        checkpoint=app.checkpoint,
        random_weights=not app.use_pretrained_model,
        image_size=app.image_size,
        seed=app.seed,
        device=app.device,
        adapter_init=init,
        cache_dir=str(app.model_dir),
        extra={"source": "monailabel_app sam_lora", "cases": cases},
        **{o.field: opts[o.field] for o in app_options()},
    )


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


class SamLoraTrain(TrainTask):
    """See the module docstring."""

    def __init__(self, config: SamAppConfig) -> None:
        super().__init__(
            f"Fine-tuning of {config.model} on the final labels (default: the mask decoder on cached "
            "embeddings; lora_rank > 0 adds LoRA on the image encoder); published as a new adapter version "
            "that the infer tasks serve at their next request"
        )
        self.app_config = config
        train_options({}, config)  # the --conf training defaults must be a valid request themselves
        self.train_dir = config.model_dir / "train"
        self.status_file = self.train_dir / "status.json"
        self.store = ModelStore(config.model_dir / "adapters")

    def config(self) -> dict[str, Any]:
        return option_table(self.app_config)

    # -- status (read by the server process) -----------------------------------------------------
    def stats(self) -> dict[str, Any]:
        try:
            status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(status, dict):
            return {}
        if status.get("status") == "RUNNING" and not _pid_alive(status.get("pid")):
            status["status"] = "STOPPED"
            status["reason"] = "the training process ended without finishing (stopped or killed)"
        status["versions"] = [v["version"] for v in self.store.list_versions()]
        try:
            current = self.store.current()
        except UserInputError as exc:  # a damaged current.json: the served model reports it too
            current, status["current_error"] = None, str(exc)
        status["current_version"] = current.get("version") if current else None
        return status

    def _write_status(self, status: dict[str, Any]) -> None:
        write_json_atomic(self.status_file, status)

    # -- the run (in the training subprocess) ----------------------------------------------------
    def check_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The run's options (:func:`.options.train_options`); the server calls it before accepting a run.

        Raises:
            UserInputError: an option of the wrong type or out of bounds.
        """
        return train_options(request, self.app_config)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        start = time.time()
        with contextlib.suppress(OSError):
            os.nice(TRAIN_NICENESS)  # this subprocess only: clicks keep the CPU when both want it
        status: dict[str, Any] = {
            "status": "RUNNING",
            "stage": "starting",
            "pid": os.getpid(),
            "start_ts": _now(),
            "epoch": 0,
            "total_epochs": 0,
            "step": 0,
            "best_metric": 0.0,
        }
        self._write_status(status)
        self.train_dir.mkdir(parents=True, exist_ok=True)
        self._prune_runs(keep=KEEP_RUNS - 1)
        work = Path(tempfile.mkdtemp(prefix="run_", dir=self.train_dir))
        try:
            result = self._train(request, datastore, status, work)
            status.update(result)
            status.update(
                {"status": "DONE", "stage": "finished", "total_time": round(time.time() - start, 1)}
            )
            self._write_status(status)
            return status
        except BaseException as exc:
            status.update(
                {
                    "status": "ERROR",
                    "stage": status.get("stage"),
                    "error": str(exc) if isinstance(exc, UserInputError) else f"{type(exc).__name__}: {exc}",
                    "total_time": round(time.time() - start, 1),
                    "published": False,
                }
            )
            self._write_status(status)
            raise
        finally:
            shutil.rmtree(work / "npz", ignore_errors=True)

    def _prune_runs(self, keep: int) -> None:
        """Delete all but the ``keep`` newest run folders (a killed run leaves its folder behind)."""
        runs = sorted(
            (p for p in self.train_dir.glob("run_*") if p.is_dir()), key=lambda p: p.stat().st_mtime
        )
        for old in runs[: max(0, len(runs) - keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def _train(
        self, request: dict[str, Any], datastore: Datastore, status: dict[str, Any], work: Path
    ) -> dict:
        """Preprocess the final labels, train, validate and publish (the steps of the module docstring)."""
        opts = self.check_request(request)
        status.update({"options": opts, "total_epochs": opts["epochs"], "run_dir": str(work)})
        manifest = self._preprocess(datastore, status, work)
        if len(manifest["cases"]) < 2 and opts["val_fraction"] > 0:
            opts["val_fraction"] = 0.0  # one labelled volume: validate on it (reported as val_on_train)
            status["note"] = "only one labelled volume: validation runs on the training volume"
        init, current = self._starting_adapter(opts["lora_rank"], status)
        status.update({"stage": "training", "started_from": current.get("version") if init else "base"})
        self._write_status(status)
        cfg = run_config(self.app_config, opts, work, init, status["cases"])
        summary = train(cfg, progress=True, on_epoch=self._on_epoch(status), on_step=self._on_step(status))
        metrics = {k: summary.get(k) for k in SUMMARY_KEYS}
        status.update({"summary": metrics, "stage": "validating"})
        self._write_status(status)
        return self._publish(summary, metrics, opts, status, work)

    def _preprocess(self, datastore: Datastore, status: dict[str, Any], work: Path) -> dict[str, Any]:
        """The final labels, preprocessed as ``sam-medical preprocess`` does, with the served window and the
        app's label names, into ``work/npz``; returns the manifest."""
        status["stage"] = "preprocessing"
        self._write_status(status)
        pairs = datastore.datalist()
        if not pairs:
            raise UserInputError(
                "no image has a final label yet: save labels (Slicer: Submit Label) before training"
            )
        cases = [CasePair(image_stem(p["image"]), Path(p["image"]), Path(p["label"])) for p in pairs]
        c = self.app_config
        modality, window = window_options(c.window)
        names = dict(c.labels) if c.labels_source != "default" else None  # "object" names no organ
        options = PreprocessOptions(modality=modality, window=window, label_names=names)
        manifest = preprocess_cases(cases, work / "npz", options)
        if not manifest["cases"]:
            raise UserInputError(f"no labelled image could be preprocessed: {manifest['failed']}")
        status.update(
            {
                "cases": [e["case"] for e in manifest["cases"]],
                "failed_cases": manifest["failed"],
                "slices": manifest["totals"]["slices_kept"],
            }
        )
        return manifest

    def _on_step(self, status: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
        """The trainer's step callback: progress into the status, written at most once a second."""
        last_write = [0.0]

        def on_step(rec: dict[str, Any]) -> None:
            status.update({"epoch": rec["epoch"], "step": rec["step"], "loss": rec["loss"]})
            if time.time() - last_write[0] > 1.0:
                last_write[0] = time.time()
                self._write_status(status)

        return on_step

    def _on_epoch(self, status: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
        """The trainer's epoch callback: validation Dice, the best so far and the history into the status."""

        def on_epoch(rec: dict[str, Any]) -> None:
            status.update({"epoch": rec["epoch"], "step": rec["step"], "val_dice": rec["val_dice"]})
            status["best_metric"] = max(float(status.get("best_metric") or 0.0), float(rec["val_dice"]))
            status.setdefault("history", []).append(rec)
            self._write_status(status)

        return on_epoch

    def _publish(
        self,
        summary: dict[str, Any],
        metrics: dict[str, Any],
        opts: dict[str, Any],
        status: dict[str, Any],
        work: Path,
    ) -> dict[str, Any]:
        """Validate (a gain that means something, :mod:`sam_medical.training.outcome`; an adapter that loads
        and runs), then publish as a new version."""
        adapter = summary.get("adapter")
        if not adapter or not Path(adapter).is_file():
            raise UserInputError("training produced no adapter file")
        rule = PublishRule(opts["publish_margin"], opts["publish_alpha"], opts["publish_min_items"])
        decision = publish_decision(summary, opts["publish"], rule)
        status["publish"] = decision
        if not decision["published"]:
            return {"published": False, "version": None, "reason": decision["reason"]}
        check = self._check_adapter(adapter, work)
        status["stage"] = "publishing"
        self._write_status(status)
        version = self.store.publish(adapter, {**metrics, "check": check})
        logger.info(f"sam_lora: published adapter version {version} ({metrics})")
        return {
            "published": True,
            "version": version,
            "reason": decision["reason"],
            "best_metric": summary.get("best_val_dice") or 0.0,
        }

    def _starting_adapter(self, rank: int, status: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """``(adapter path or None, current.json)``: the served adapter when it can be trained on.

        A served adapter of another rank, or one that cannot be read (a damaged ``current.json`` or
        adapter file, which the server refuses to serve too), means starting from the base model.
        """
        try:
            current = self.store.current() or {}
            init = self.store.path_of(current["version"]) if current.get("version") else None
            if init is not None and read_adapter_meta(init)["rank"] != rank:
                init = None
        except UserInputError as exc:
            status["note"] = f"starting from the base model: the served adapter cannot be used ({exc})"
            return None, {}
        return (str(init) if init else None), current

    def _check_adapter(self, adapter: str, work: Path) -> dict[str, Any]:
        """Load the adapter into a freshly built served base model and run one slice through it."""
        sam, base_info = build_base_model(self.app_config)
        meta = load_adapter(sam, adapter, base_info=base_info)
        npz = sorted((work / "npz").glob("*.npz"))
        with np.load(npz[0]) as f:
            img = torch.from_numpy(f["imgs"][:1])
        with torch.inference_mode():
            emb = sam_forward.encode(sam, sam_forward.canvas_to_input(sam, img))
            low, iou = sam_forward.decode(
                sam, emb, sam_forward.PromptBatch(boxes=torch.tensor([[64.0, 64.0, 192.0, 192.0]]))
            )
        if not (torch.isfinite(low).all() and torch.isfinite(iou).all()):
            raise UserInputError("the trained adapter gives non-finite outputs; not published")
        return {"loads": True, "finite": True, "version": meta["version"], "rank": meta["rank"]}
