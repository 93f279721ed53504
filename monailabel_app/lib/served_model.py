"""The one model the app serves, shared by ``sam_2d`` and ``sam_3d``; follows the published adapter.

:class:`ServedModel` owns:

* the base SAM, built **once** (:func:`sam_medical.model.build.build_sam`; official checkpoints are cached in
  ``<app>/model/``), never modified afterwards;
* the adapter store ``<app>/model/adapters`` (:class:`sam_medical.adapters.store.ModelStore`), whose
  ``current.json`` the train task rewrites when it publishes a version;
* one :class:`~sam_medical.inference.predictor.VolumePredictor` per served version over its own model object (a
  deep copy of the base with the adapter loaded and merged), all sharing one byte-bounded embedding
  cache whose keys hold the version;
* a cache of loaded volumes (:class:`~sam_medical.inference.caches.VolumeCache`);
* the runtime of each version (:class:`.served_export.ServedRuntime`).

Runtime (``--conf runtime``): every predictor starts on PyTorch (:class:`~sam_medical.inference.engines.TorchEngine`).
With ``onnx``/``openvino`` (``auto`` on the CPU), a background worker then loads the version's export
from the cache, or exports, verifies and caches it (:func:`sam_medical.inference.export_cache.load_or_export`: the
digest covers the base weights, the adapter file, the exporter and runtime versions), and swaps it into
the predictor. At server start :meth:`ServedModel.load` waits for it, so the first click already runs
the export; after a hot swap the new version answers at once on PyTorch (identical masks) and moves to its
export when that is ready. An export that cannot be made or disagrees with PyTorch is not served: the
version stays on PyTorch and ``/info/`` says why (``runtime.error``).

Hot swap: at every request :meth:`ServedModel.predictor` compares ``current.json``'s ``(mtime, size)``
with what it last saw (one ``stat``). When it changed, the new version is loaded into a **new** model
object and predictor, then swapped in; a request already running keeps the predictor it started with.
A version that fails to load is reported (``adapter_error`` in ``/info/``) and the previous one stays.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from sam_medical.adapters.inject import merge_lora
from sam_medical.adapters.save_and_load import load_adapter
from sam_medical.adapters.store import NO_ADAPTER, ModelStore, check_version_id
from sam_medical.device import resolve_device
from sam_medical.errors import UserInputError, library_detail
from sam_medical.inference.caches import EmbeddingCache, VolumeCache
from sam_medical.inference.decoding import check_multimask
from sam_medical.inference.engines import TorchEngine, resolve_runtime
from sam_medical.inference.export_cache import adapter_identity
from sam_medical.inference.export_check import warm_up
from sam_medical.inference.onnx_export import ExportError
from sam_medical.inference.predictor import VolumePredictor
from sam_medical.inference.strategies import click_strategy, weights_trained_prompts
from sam_medical.model.registry import get_family

from .served_export import ServedRuntime
from .settings import SamAppConfig, build_base_model

logger = logging.getLogger(__name__)

BASE_VERSION = "base"
#: Versions asked for explicitly by a request (``adapter`` param), kept besides the current one.
EXTRA_VERSIONS = 2


def serving_threads(requested: int, device: torch.device) -> int:
    """Torch intra-op threads of the serving thread: ``requested``, or (0) half the CPU cores on the CPU.

    With every core, a core taken by anything else (the background prefetch, a training run, Slicer)
    stalls each OpenMP barrier of the encoder: measured on 2 busy cores, ViT-B at 256 took 3.7 s per
    slice with 2 threads and 0.75 s with 1.
    """
    if requested:
        return int(requested)
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 2) // 2)


class ServedModel:
    """See the module docstring. Thread-safe; cheap to query (``describe``) before the model is built."""

    def __init__(self, config: SamAppConfig) -> None:
        self.config = config
        self.store = ModelStore(config.model_dir / "adapters")
        self.cache = EmbeddingCache(config.embedding_cache_mb << 20)
        self.volumes = VolumeCache(config.volume_cache_mb << 20)
        self._lock = threading.RLock()
        self._base: Any = None
        self.base_info: dict[str, Any] | None = None
        self.device: torch.device | None = None
        self._current: VolumePredictor | None = None
        self._current_meta: dict[str, Any] = {}
        self._signature: Any = "unset"
        self._extra: OrderedDict[str, VolumePredictor] = OrderedDict()
        self.adapter_error: str | None = None
        self.load_seconds: float | None = None
        self.torch_threads: int | None = None
        self.runtimes = ServedRuntime(config.runtime, config.exports_dir)

    # -- building ------------------------------------------------------------------------------
    def load(self) -> None:
        """Build the base model (once), apply ``--conf adapter`` if given, load the current version.

        Raises:
            UserInputError: unknown model, missing/corrupt checkpoint, offline download, bad adapter id.
        """
        with self._lock:
            if self._base is None:
                cfg = self.config
                t0 = time.perf_counter()
                self.device = resolve_device(cfg.device)
                self.runtimes.runtime = resolve_runtime(cfg.runtime, self.device, cfg.precision)
                self.torch_threads = serving_threads(cfg.torch_threads, self.device)
                self.runtimes.threads = self.torch_threads
                torch.set_num_threads(self.torch_threads)  # an OpenMP per-thread setting: this serving thread
                try:
                    sam, info = build_base_model(cfg)
                except UserInputError as exc:
                    message = (
                        f"sam_medical cannot serve model {cfg.model}: {exc}. In the app, give a weights file with "
                        "--conf checkpoint PATH, or use --conf use_pretrained_model false (seeded random weights)"
                    )
                    logger.error(message)
                    raise UserInputError(message) from None
                self._base = sam.to(self.device).eval()
                self.base_info = info
                self._warm_up(self._base)
                self.load_seconds = round(time.perf_counter() - t0, 3)
                logger.info(f"sam_medical: base model {info} built in {self.load_seconds} s on {self.device}")
                if cfg.adapter:
                    picked = self.store.select(cfg.adapter)  # raises for unknown/bad ids
                    logger.info(f"sam_medical: --conf adapter {cfg.adapter} selected: {picked}")
            self._follow_current()
        self.wait_runtime()  # the first click runs on the export (loaded from the cache, or made now)

    @staticmethod
    def _warm_up(sam: Any) -> bool:
        """One encode + decode on a test canvas: one-time allocations happen now, not at the first click.
        Returns whether every output was finite (an adapter that overflows is refused)."""
        try:
            warm_up(TorchEngine(sam), sam)
        except ExportError:
            return False
        return True

    def _base_predictor(self) -> VolumePredictor:
        return self._make_predictor(self._base, BASE_VERSION)

    def _make_predictor(
        self,
        sam: Any,
        version: str,
        adapter: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> VolumePredictor:
        """A predictor on PyTorch; with an exported runtime, its export is attached in the background.

        ``adapter``: ``{"version", "sha256"}`` of the merged adapter file (None for the base model);
        ``meta``: that adapter's metadata (its ``trained_prompts`` choose the click strategy).
        """
        pred = VolumePredictor(
            sam,
            version,
            self.cache,
            window=self.config.window,
            multimask=self.multimask_rule(meta),
            engine=TorchEngine(sam, precision=self.config.precision),
            click_strategy=click_strategy(self.trained_prompts(meta), self.config.click_strategy),
        )
        self.runtimes.attach(pred, self.base_info or {}, adapter)
        return pred

    @property
    def runtime(self) -> str | None:
        """The resolved runtime (``torch``, ``onnx`` or ``openvino``; None before :meth:`load`)."""
        return self.runtimes.runtime

    def wait_runtime(self, version: str | None = None, timeout: float | None = None) -> bool:
        """Wait until ``version`` (default: the current one) runs on its runtime, or failed to; True when done."""
        return self.runtimes.wait(version or self.current_version, timeout)

    def runtime_status(self, version: str | None = None) -> dict[str, Any]:
        """``{"requested", "runtime", "serving", "state", "export_digest", ...}`` of ``version`` (default current)."""
        return self.runtimes.status(version or self.current_version)

    def _load_version(self, version: str) -> VolumePredictor:
        """A new model object: the base copied, adapter ``version`` loaded (checked) and merged.

        Raises:
            UserInputError: unknown version; an adapter file that is damaged (wrong metadata types,
                NaN weights...), made for another base model, or whose outputs are not finite.
        """
        path = self.store.path_of(version)
        sam = copy.deepcopy(self._base)
        try:
            meta = load_adapter(sam, path, base_info=self.base_info)
            merge_lora(sam)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # UserInputError is a ValueError
            if isinstance(exc, UserInputError):
                raise
            raise UserInputError(f"adapter {version} cannot be loaded ({library_detail(exc)})") from None
        sam.eval()
        if not self._warm_up(sam):
            raise UserInputError(f"adapter {version} gives NaN or infinite outputs; it is refused")
        logger.info(
            f"sam_medical: adapter {version} loaded (rank {meta['rank']}, val_dice {meta.get('val_dice')})"
        )
        adapter = adapter_identity(path, version) if self.runtimes.exported else None
        return self._make_predictor(sam, version, adapter, meta)

    def multimask_rule(self, meta: dict[str, Any] | None = None) -> str:
        """``--conf multimask``; ``model`` (the default): ``auto`` (SAM's three masks for a lone click, the
        one with the best predicted IoU) for weights trained as SAM trains, with clicks and fed-back masks
        (``trained_prompts`` holds ``mask``: SAM, adapters made with click rounds), else ``off``."""
        if self.config.multimask == "model":
            return "auto" if "mask" in self.trained_prompts(meta) else "off"
        return check_multimask(self.config.multimask, "--conf multimask")

    def trained_prompts(self, meta: dict[str, Any] | None = None) -> tuple[str, ...]:
        """The prompt kinds the served weights learned: an adapter's recorded ``trained_prompts``, else the
        model family's (none for random weights)."""
        family = get_family(self.config.model).trained_prompts
        return weights_trained_prompts(family, self.config.random_weights, meta)

    def _follow_current(self) -> None:
        """Swap in the version ``current.json`` names, if it changed since the last look.

        A ``current.json`` that cannot be used (unparsable, empty, not an object, a malformed version)
        or a version that cannot be served leaves the previous version serving; ``adapter_error`` (in
        ``/info/``) says why until ``current.json`` changes again.
        """
        sig = self.store.signature()
        if sig == self._signature and self._current is not None:
            return
        with self._lock:
            if sig == self._signature and self._current is not None:
                return
            old = self._current
            serving = old.model_version if old is not None else BASE_VERSION
            error = None
            try:
                current = self.store.current() or {}
                version = current.get("version") or BASE_VERSION
                if version != BASE_VERSION:
                    check_version_id(version)
            except UserInputError as exc:
                error = f"{exc}; still serving {serving}"
                current, version = {"version": None if serving == BASE_VERSION else serving}, serving
            if old is None or old.model_version != version:
                try:
                    new = self._base_predictor() if version == BASE_VERSION else self._load_version(version)
                except UserInputError as exc:
                    error = f"adapter {version} could not be served: {exc}; still serving {serving}"
                    new = old if old is not None else self._base_predictor()
                self._current = new
                if old is not None and old is not new:
                    old.close()
                    if old.model_version not in self._extra:
                        self.cache.discard_version(old.model_version)
            if error:
                logger.error(f"sam_medical: {error}")
            self.adapter_error = error
            self._current_meta = current
            self._signature = sig

    # -- serving -------------------------------------------------------------------------------
    def predictor(self, adapter: str | None = None) -> VolumePredictor:
        """The predictor for this request: the current version, or ``adapter`` (a version or ``none``).

        Raises:
            UserInputError: an unknown or malformed ``adapter`` version.
        """
        if self._base is None:
            self.load()
        self._follow_current()
        current = self._current
        assert current is not None
        if adapter in (None, "", "current"):
            return current
        wanted = BASE_VERSION if adapter in (NO_ADAPTER, BASE_VERSION) else check_version_id(adapter)
        if wanted == current.model_version:
            return current
        with self._lock:
            pred = self._extra.get(wanted)
            if pred is None:
                pred = self._base_predictor() if wanted == BASE_VERSION else self._load_version(wanted)
                self._extra[wanted] = pred
                while len(self._extra) > EXTRA_VERSIONS:
                    _, dropped = self._extra.popitem(last=False)
                    dropped.close()
                    if dropped.model_version != self._current.model_version:
                        self.cache.discard_version(dropped.model_version)
            else:
                self._extra.move_to_end(wanted)
            return pred

    @property
    def current_version(self) -> str | None:
        return self._current.model_version if self._current is not None else None

    def model_line(self) -> str:
        """One line naming the served model for task descriptions: family, digest, licence, training prompts."""
        fam = get_family(self.config.model)
        if self.config.random_weights:
            return f"{fam.title}, seeded random weights"
        digest = fam.describe()["weights_digest"]
        source = (
            f"weights {digest[:19]}..."
            if digest and not self.config.checkpoint
            else "weights from --conf checkpoint"
        )
        return f"{fam.title} ({source}; {fam.license}; trained with prompts: {fam.prompts_trained})"

    def weights_note(self) -> str:
        """What a user must know about the served weights (the family's note; '' when nothing)."""
        if self.config.random_weights:
            return (
                "RANDOM WEIGHTS, not pretrained (use_pretrained_model=false or model tiny): for benchmarks and "
                "tests only"
            )
        return get_family(self.config.model).note

    def describe(self) -> dict[str, Any]:
        """For ``/info/``: base model, weights, served version, known versions, caches (no model build)."""
        cfg = self.config
        family = get_family(cfg.model).describe()
        out: dict[str, Any] = {
            "model": cfg.model,
            "title": family["title"],
            "provenance": family["provenance"],
            "license": family["license"],
            "prompts_trained": family["prompts_trained"],
            "click_strategy": self._current.click_strategy if self._current is not None else None,
            "weights_digest": (self.base_info or {}).get("weights_digest") or family["weights_digest"],
            "image_size": cfg.image_size,
            "random_weights": cfg.random_weights,
            "weights": (
                f"seeded random weights (seed {cfg.seed}), not pretrained"
                if cfg.random_weights
                else f"checkpoint {self.base_info.get('checkpoint') if self.base_info else cfg.checkpoint or 'official'}"
            ),
            "note": self.weights_note(),
            "window": cfg.window,
            "labels": dict(cfg.labels),
            "labels_source": cfg.labels_source,
            "device": str(self.device) if self.device else cfg.device,
            "torch_threads": self.torch_threads,
            "runtime": self.runtime_status(),
            "prefetch": self._current.stats()["prefetch"] if self._current is not None else None,
            "loaded": self._base is not None,
            "model_version": self.current_version,
            "adapter_error": self.adapter_error,
            "versions": [v["version"] for v in self.store.list_versions()],
            "embedding_cache": self.cache.stats(),
        }
        if self.base_info:
            out["base"] = self.base_info
        return out
