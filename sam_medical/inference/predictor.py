"""Stateful per-slice predictor for serving: cached image embeddings, prompts in voxel indices.

This is the serving counterpart of ``segment_anything.SamPredictor``, for volumes:

* the volume stays in stored IJK order ``(I, J, K)`` (:mod:`sam_medical.volume.io`); slice ``k`` is
  ``volume[:, :, k]``, an image of height ``I`` (rows ``i``) and width ``J`` (columns ``j``);
* every slice goes through exactly the preprocessing of training (:mod:`sam_medical.canvas.preprocess`): the
  intensity window is resolved **once per volume** (:func:`sam_medical.volume.intensity.resolve_window`), then
  ``SliceGeometry.image_to_model(window.apply(slice))`` makes the ``256 x 256 x 3`` canvas;
* a click ``[i, j, k]`` is the SAM point ``(x, y) = SliceGeometry.point_to_model(i, j)`` (``x`` from
  ``j``, ``y`` from ``i``); an ROI ``i0..i1 x j0..j1`` is the box ``box_to_model(i0, i1, j0, j1)``;
* the prompt is decoded by :func:`sam_medical.inference.decoding.decode_prompts` (the ``multimask`` rule
  picks one of SAM's masks); the low-resolution logits are brought back to the canvas, then to ``(I, J)``
  (:meth:`SliceGeometry.logits_from_model`) and thresholded at 0.

Image embeddings ``(1, C, h, h)`` are kept in an :class:`~sam_medical.inference.caches.EmbeddingCache`
keyed by ``(image key, k, model version)``: a second click on a slice only runs the mask decoder
(milliseconds) instead of the image encoder. :meth:`VolumePredictor.prefetch` encodes neighbouring slices
in a daemon thread (:mod:`sam_medical.inference.prefetch`), so that moving to the next slice is fast too.

The encoder and the decoder are run by an :class:`~sam_medical.inference.engines.Engine` (``engine``): PyTorch
itself by default, or the model exported to ONNX (:mod:`sam_medical.inference.onnx_engine`), swapped in with
:meth:`VolumePredictor.set_engine` once verified. Engines are verified to give the same masks, so the
embeddings cached under a model version serve whichever engine runs it.

Threads: one encode runs at a time (:class:`~sam_medical.inference.preemption.EncoderGate`), and a click
that needs one stops the background encode in flight, so a click never waits for background work (the
stopped slice is encoded again later). The mask decoder runs under its own lock, so a click whose
embedding is cached never waits for an encode. The prefetcher starts no encode while a request is
served. The model is never modified here (a new adapter version means a new :class:`VolumePredictor`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sam_medical.inference.caches import CacheKey, EmbeddingCache
from sam_medical.inference.decoding import DIRECT, CanvasPrompt, Decoded, canvas_logits, check_multimask
from sam_medical.inference.engines import Engine, TorchEngine
from sam_medical.inference.preemption import EncoderGate, encode_stoppable, make_stoppable
from sam_medical.inference.prefetch import Prefetcher
from sam_medical.inference.strategies import decode_prompts
from sam_medical.inference.volume_slices import (
    PreparedVolume,
    PreparedVolumes,
    canvas_prompt,
    check_prompts,
    check_slice_index,
)
from sam_medical.model import forward as sf
from sam_medical.volume.intensity import window_options
from sam_medical.volume.io import Volume

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

EMBEDDING_CACHED = "cached"
EMBEDDING_COMPUTED = "computed"


# --- the predictor ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads in *this* thread (an OpenMP per-thread setting)."""
    previous = torch.get_num_threads()
    if not count or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class VolumePredictor:
    """Segments slices of volumes with one SAM model version, caching image embeddings.

    Args:
        sam: the model (eval mode; LoRA merged or not). It is never modified here.
        model_version: identifies the weights (``"base"`` or an adapter version); part of every cache
            key, so embeddings of another version are never used.
        cache: the embedding cache (may be shared between predictors of several versions).
        window: the ``window`` option (:func:`window_options`).
        multimask: the rule picking among SAM's masks (:func:`~sam_medical.inference.decoding.check_multimask`):
            ``"off"`` (default): SAM's single-mask output (as trained); ``"auto"``: three masks and the
            best predicted IoU when the prompt is a lone click (SAM's advice for ambiguous prompts; the
            app's ``--conf multimask auto``); ``"on"``: that for every prompt.
        prefetch_queue: at most this many slices wait for background encoding (the cache budget,
            :meth:`prefetch_room`, bounds them too).
        prefetch_threads: torch intra-op threads of the background encodes (the clicks keep the rest).
        decode_threads: intra-op threads of the (small) mask decoder; 1 avoids OpenMP barrier stalls
            when a background encode holds the other cores (None: leave the thread's setting).
        click_strategy: how clicks are decoded (:func:`~sam_medical.inference.strategies.click_strategy`):
            ``"direct"`` (default) or ``"click_to_box"`` (a box-only model's clicks become boxes).
        engine: what runs the encoder and decoder (default: :class:`~sam_medical.inference.engines.TorchEngine`
            over ``sam``).
    """

    def __init__(
        self,
        sam: Sam,
        model_version: str,
        cache: EmbeddingCache | None = None,
        *,
        window: str = "auto",
        multimask: bool | str = "off",
        prefetch_queue: int = 4096,
        prefetch_threads: int = 1,
        decode_threads: int | None = 1,
        engine: Engine | None = None,
        click_strategy: str = DIRECT,
    ) -> None:
        self.sam = sam
        self.engine: Engine = engine if engine is not None else TorchEngine(sam)
        emb_h, emb_w = sam.prompt_encoder.image_embedding_size
        self._embedding_bytes = 4 * int(sam.prompt_encoder.embed_dim) * int(emb_h) * int(emb_w)  # fp32
        self.model_version = str(model_version)
        self.cache = cache if cache is not None else EmbeddingCache(256 << 20)
        self.window = window
        self.multimask = check_multimask(multimask)
        self.click_strategy = str(click_strategy)
        self.decode_threads = decode_threads
        self.modality, self.window_name = window_options(window)
        self._window_tag = self.window_name or self.modality
        self._gate = EncoderGate()
        make_stoppable(sam.image_encoder)  # a background PyTorch encode can be stopped by a click
        self._decode_lock = threading.Lock()
        self._prepared = PreparedVolumes(self.modality, self.window_name)
        self._active_clicks = 0
        self._active_lock = threading.Lock()
        self._prefetcher = Prefetcher(
            self, prefetch_queue, prefetch_threads, f"prefetch-{self.model_version}"
        )
        self.encoder_calls = 0

    # -- volumes -------------------------------------------------------------------------------
    def prepare(self, image_key: str, volume: Volume) -> PreparedVolume:
        """The volume with its window resolved (once per ``image_key``; the last 16 are remembered)."""
        return self._prepared.get(image_key, volume)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Mark a request in progress: the prefetcher starts no new encode until it ends.

        :meth:`segment_slice` does this itself; a server wraps the whole request (segment, write the
        answer) so that background encodes do not compete with it for the CPU.
        """
        with self._active_lock:
            self._active_clicks += 1
        try:
            yield
        finally:
            with self._active_lock:
                self._active_clicks -= 1

    def cache_key(self, image_key: str, k: int) -> CacheKey:
        """``(image key + window option, k, model version)``."""
        return (f"{image_key}|window={self._window_tag}", int(k), self.model_version)

    @property
    def requests_active(self) -> bool:
        """True while a request is in progress (:meth:`busy`): the prefetcher waits."""
        return self._active_clicks > 0

    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    # -- engine ---------------------------------------------------------------------------------
    def set_engine(self, engine: Engine) -> None:
        """Run the encoder and decoder with ``engine`` from now on (a verified export of the same model);
        an encode or decode already running finishes with the engine it started with."""
        self.engine = engine

    @property
    def encode_batch(self) -> int:
        """Slices per encoder call worth batching (the engine's: 1 on the CPU)."""
        return int(getattr(self.engine, "encode_batch", 1))

    # -- encoder -------------------------------------------------------------------------------
    def _encode(
        self, prep: PreparedVolume, ks: Sequence[int], times: dict[str, float] | None = None
    ) -> torch.Tensor:
        """Embeddings ``(len(ks), C, h, h)`` of slices ``ks``, in one engine call (stopped by a click when
        run in the background); ``times`` gets the ``canvas`` and ``encode`` seconds."""
        t0 = time.perf_counter()
        canvas = torch.from_numpy(np.stack([prep.canvas(k) for k in ks]))  # (B, 256, 256, 3) uint8
        images = sf.canvas_to_input(self.sam, canvas)
        t1 = time.perf_counter()
        with torch.inference_mode():
            emb = encode_stoppable(self.engine, images)
        self.encoder_calls += 1
        if times is not None:
            times.update(canvas=t1 - t0, encode=time.perf_counter() - t1)
        return emb

    def embed(self, image_key: str, volume: Volume, k: int) -> tuple[torch.Tensor, str]:
        """Embedding ``(1, C, h, h)`` of slice ``k``, and ``"cached"`` or ``"computed"``."""
        prep = self.prepare(image_key, volume)
        k = check_slice_index(k, volume.shape[2])
        return self._embed_prepared(prep, k)

    def _embed_prepared(
        self, prep: PreparedVolume, k: int, times: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, str]:
        """The cached embedding, else encoded now, before any background encode (``times``: ``wait``,
        the seconds until the encoder was free, plus ``canvas`` and ``encode``)."""
        key = self.cache_key(prep.image_key, k)
        emb = self.cache.get(key)
        if emb is not None:
            return emb, EMBEDDING_CACHED
        with self._gate.foreground([key]) as waited:
            if times is not None:
                times["wait"] = waited
            emb = self.cache.peek(key)  # the background encode of this very slice may have finished it
            if emb is not None:
                return emb, EMBEDDING_CACHED
            emb = self._encode(prep, [k], times)
            self.cache.put(key, emb)
        return emb, EMBEDDING_COMPUTED

    def _put_all(self, prep: PreparedVolume, ks: Sequence[int], emb: torch.Tensor) -> None:
        for i, k in enumerate(ks):
            self.cache.put(self.cache_key(prep.image_key, k), emb if len(ks) == 1 else emb[i : i + 1].clone())

    def _missing(self, prep: PreparedVolume, ks: Iterable[int]) -> list[int]:
        return [
            k
            for k in dict.fromkeys(int(k) for k in ks)
            if self.cache_key(prep.image_key, k) not in self.cache
        ]

    def encode_missing(self, prep: PreparedVolume, ks: Sequence[int]) -> int:
        """Encode the slices of ``ks`` not cached yet, ``encode_batch`` at a time, now (before any
        background encode); return how many."""
        todo = self._missing(prep, ks)
        with self._gate.foreground([self.cache_key(prep.image_key, k) for k in todo]):
            todo = self._missing(prep, todo)
            step = max(1, self.encode_batch)
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                self._put_all(prep, chunk, self._encode(prep, chunk))
        return len(todo)

    def encode_background(self, prep: PreparedVolume, ks: Sequence[int]) -> int:
        """The prefetcher's encode of the slices of ``ks`` not cached yet (one engine call); return how many.

        Raises:
            Preempted: a click needs the encoder (at once, or mid-way: nothing is cached then).
        """
        todo = self._missing(prep, ks)
        if not todo:
            return 0
        with self._gate.background([self.cache_key(prep.image_key, k) for k in todo]):
            todo = self._missing(prep, todo)
            if todo:
                self._put_all(prep, todo, self._encode(prep, todo))
        return len(todo)

    def encode_ahead(self, image_key: str, volume: Volume, ks: Iterable[int]) -> int:
        """Encode slices ``ks`` (inside the volume, not cached yet) now, in batches of
        :attr:`encode_batch`: what 3D propagation calls before walking onto them when batching pays
        (on a GPU). Returns how many slices were encoded."""
        prep = self.prepare(image_key, volume)
        depth = volume.shape[2]
        return self.encode_missing(prep, [k for k in ks if 0 <= int(k) < depth])

    # -- decoder -------------------------------------------------------------------------------
    def segment_slice(
        self,
        image_key: str,
        volume: Volume,
        k: int,
        fg_points_ij: Iterable[Sequence[float]] | None = None,
        bg_points_ij: Iterable[Sequence[float]] | None = None,
        box_ij: Sequence[float] | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Segment slice ``k`` from voxel-index prompts (:func:`decode_prompts`, :attr:`multimask` rule).

        Args:
            image_key: identifies the volume's content (e.g. :meth:`VolumeCache.key_of`).
            volume: ``(I, J, K)``; ``k``: the slice index.
            fg_points_ij, bg_points_ij: ``[(i, j), ...]`` foreground / background clicks on slice ``k``.
            box_ij: ``(i0, i1, j0, j1)``, inclusive voxel ranges in any order; clipped to the slice.
            mask_input: ``(1, 1, L, L)`` low-resolution logits of an earlier prediction.

        Returns:
            ``mask (I, J) bool`` and ``info``: ``iou`` (predicted), ``embedding`` (``"cached"`` /
            ``"computed"``), ``model_version``, ``timings`` (seconds: ``prepare`` (checks, window),
            ``wait`` (for the encoder), ``canvas``, ``encode`` (0 when cached), ``decode``, ``map_back``
            (logits to the ``(I, J)`` mask), ``total``), ``box_ij`` (the clipped box or None),
            ``low_res_logits`` (``(1, 1, L, L)``, e.g. the next slice's ``mask_input``; not JSON).

        Raises:
            UserInputError: slice out of range, a point outside the slice, a box entirely outside, no
                prompt at all.
        """
        t0 = time.perf_counter()
        low = sf.low_res_size(self.sam)
        k, fg, bg, box = check_prompts(volume.shape, k, fg_points_ij, bg_points_ij, box_ij, mask_input, low)
        times: dict[str, float] = {"wait": 0.0, "canvas": 0.0, "encode": 0.0}
        with self.busy():
            prep = self.prepare(image_key, volume)
            t1 = time.perf_counter()
            emb, state = self._embed_prepared(prep, k, times)
            t2 = time.perf_counter()
            decoded = self._decode(prep, k, canvas_prompt(prep.geometry, fg, bg, box, mask_input), emb)
            logits_256 = canvas_logits(decoded)  # (256, 256)
            t3 = time.perf_counter()
            mask = prep.geometry.logits_from_model(logits_256) > 0  # (I, J)
        t4 = time.perf_counter()
        times.update(prepare=t1 - t0, decode=t3 - t2, map_back=t4 - t3, total=t4 - t0)
        info = {
            "iou": decoded.iou,
            "strategy": decoded.strategy,
            "candidates": decoded.candidates,
            "embedding": state,
            "model_version": self.model_version,
            "slice": k,
            "box_ij": list(box) if box is not None else None,
            "timings": {name: round(s, 4) for name, s in times.items()},
            "low_res_logits": decoded.low_res_logits,
        }
        return mask, info

    def _decode(self, prep: PreparedVolume, k: int, prompt: CanvasPrompt, emb: torch.Tensor) -> Decoded:
        """The one answer to ``prompt`` on slice ``k`` (:func:`decode_prompts`; a click strategy also
        gets the slice's canvas, its image places the boxes)."""
        if prompt.n_points and self.click_strategy != DIRECT:
            image = prep.canvas(k)[..., 0]
            prompt = dataclasses.replace(prompt, strategy=self.click_strategy, image=image)
        with self._decode_lock, torch.inference_mode(), _intra_op_threads(self.decode_threads):
            (decoded,) = decode_prompts(self.engine, emb, [prompt], self.multimask)
        return decoded

    # -- prefetch ------------------------------------------------------------------------------
    def prefetch(self, image_key: str, volume: Volume, ks: Iterable[int]) -> int:
        """Encode slices ``ks`` in a background daemon thread; return how many were queued.

        Slices already cached or outside the volume are skipped; give ``ks`` nearest first
        (:func:`neighbours`). A new call cancels the slices still waiting from earlier calls (the user
        moved on). At most :meth:`prefetch_room` slices are queued (the cache budget) and the queue is
        bounded: extra slices are dropped.
        The worker starts no encode while a click is served, and a click that needs an encode stops
        the one running (:class:`~sam_medical.inference.preemption.EncoderGate`).
        """
        if self._prefetcher.closed:
            return 0
        return self._prefetcher.submit(self.prepare(image_key, volume), ks, self.prefetch_room())

    def prefetch_room(self) -> int:
        """How many slices a prefetch may encode within the embedding cache's budget: as many embeddings
        as it holds, less one for the slice being clicked (so prefetching never evicts it)."""
        return max(0, self.cache.max_bytes // self._embedding_bytes - 1)

    def cancel_prefetch(self) -> None:
        """Forget every slice still waiting to be encoded."""
        self._prefetcher.cancel()

    def prefetch_idle(self, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` seconds for the prefetch queue to drain; True when it is empty."""
        return self._prefetcher.idle(timeout)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._prefetcher.closed

    def close(self) -> None:
        """Stop the prefetch worker for good (pending slices are dropped; segmenting still works)."""
        self._prefetcher.close()

    def stats(self) -> dict[str, Any]:
        """Cache statistics plus prefetch counters and the number of image-encoder runs."""
        return {
            **self.cache.stats(),
            "encoder_calls": self.encoder_calls,
            "engine": getattr(self.engine, "name", type(self.engine).__name__),
            "prefetch": self._prefetcher.describe(),
        }
