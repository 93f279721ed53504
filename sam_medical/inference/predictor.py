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

Threads: the image encoder runs under one lock (one encode at a time, whoever asks: a click or the
prefetcher) and the mask decoder under another, so a click whose embedding is cached never waits for a
background encode. The prefetcher does not start a new encode while a click is being served. The model
is never modified here (a new adapter version means a new :class:`VolumePredictor` over a new model).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sam_medical.canvas.geometry import SliceGeometry
from sam_medical.errors import UserInputError
from sam_medical.inference.caches import CacheKey, EmbeddingCache
from sam_medical.inference.decoding import canvas_logits, check_multimask, decode_prompts
from sam_medical.inference.engines import Engine, TorchEngine
from sam_medical.inference.prefetch import Prefetcher
from sam_medical.inference.volume_slices import (
    PreparedVolume,
    as_points,
    canvas_prompt,
    check_points_inside,
    check_slice_index,
    clip_box,
)
from sam_medical.model import forward as sf
from sam_medical.volume.intensity import resolve_window, window_options
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
        prefetch_queue: at most this many slices wait for background encoding.
        prefetch_threads: torch intra-op threads of the background encodes (the clicks keep the rest).
        decode_threads: intra-op threads of the (small) mask decoder; 1 avoids OpenMP barrier stalls
            when a background encode holds the other cores (None: leave the thread's setting).
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
        prefetch_queue: int = 16,
        prefetch_threads: int = 1,
        decode_threads: int | None = 1,
        engine: Engine | None = None,
    ) -> None:
        self.sam = sam
        self.engine: Engine = engine if engine is not None else TorchEngine(sam)
        emb_h, emb_w = sam.prompt_encoder.image_embedding_size
        self._embedding_bytes = 4 * int(sam.prompt_encoder.embed_dim) * int(emb_h) * int(emb_w)  # fp32
        self.model_version = str(model_version)
        self.cache = cache if cache is not None else EmbeddingCache(256 << 20)
        self.window = window
        self.multimask = check_multimask(multimask)
        self.decode_threads = decode_threads
        self.modality, self.window_name = window_options(window)
        self._window_tag = self.window_name or self.modality
        self._encode_lock = threading.Lock()
        self._decode_lock = threading.Lock()
        self._prepared: OrderedDict[str, PreparedVolume] = OrderedDict()
        self._prepared_lock = threading.Lock()
        self._active_clicks = 0
        self._active_lock = threading.Lock()
        self._prefetcher = Prefetcher(
            self, prefetch_queue, prefetch_threads, f"prefetch-{self.model_version}"
        )
        self.encoder_calls = 0

    # -- volumes -------------------------------------------------------------------------------
    def prepare(self, image_key: str, volume: Volume) -> PreparedVolume:
        """The volume with its window resolved (once per ``image_key``; the last 16 are remembered)."""
        with self._prepared_lock:
            prep = self._prepared.get(image_key)
            if prep is not None and prep.volume is volume:
                self._prepared.move_to_end(image_key)
                return prep
        i_size, j_size, _ = volume.shape
        window = resolve_window(volume.array, self.modality, self.window_name)
        prep = PreparedVolume(image_key, volume, window, SliceGeometry(i_size, j_size))
        with self._prepared_lock:
            self._prepared[image_key] = prep
            while len(self._prepared) > 16:
                self._prepared.popitem(last=False)
        return prep

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
    def _encode(self, prep: PreparedVolume, ks: Sequence[int]) -> torch.Tensor:
        """Embeddings ``(len(ks), C, h, h)`` of slices ``ks``, in one engine call."""
        canvas = torch.from_numpy(np.stack([prep.canvas(k) for k in ks]))  # (B, 256, 256, 3) uint8
        with torch.inference_mode():
            emb = self.engine.encode(sf.canvas_to_input(self.sam, canvas))
        self.encoder_calls += 1
        return emb

    def embed(self, image_key: str, volume: Volume, k: int) -> tuple[torch.Tensor, str]:
        """Embedding ``(1, C, h, h)`` of slice ``k``, and ``"cached"`` or ``"computed"``."""
        prep = self.prepare(image_key, volume)
        k = check_slice_index(k, volume.shape[2])
        return self._embed_prepared(prep, k)

    def _embed_prepared(self, prep: PreparedVolume, k: int) -> tuple[torch.Tensor, str]:
        key = self.cache_key(prep.image_key, k)
        emb = self.cache.get(key)
        if emb is not None:
            return emb, EMBEDDING_CACHED
        with self._encode_lock:
            emb = self.cache.peek(key)  # the prefetcher may have finished it while we waited
            if emb is not None:
                return emb, EMBEDDING_CACHED
            emb = self._encode(prep, [k])
            self.cache.put(key, emb)
        return emb, EMBEDDING_COMPUTED

    def encode_missing(self, prep: PreparedVolume, ks: Sequence[int]) -> int:
        """Encode the slices of ``ks`` not cached yet, ``encode_batch`` at a time; return how many."""
        done = 0
        with self._encode_lock:
            todo = [
                k
                for k in dict.fromkeys(int(k) for k in ks)
                if self.cache_key(prep.image_key, k) not in self.cache
            ]
            step = max(1, self.encode_batch)
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                emb = self._encode(prep, chunk)
                for i, k in enumerate(chunk):
                    self.cache.put(
                        self.cache_key(prep.image_key, k), emb if len(chunk) == 1 else emb[i : i + 1].clone()
                    )
                done += len(chunk)
        return done

    def encode_ahead(self, image_key: str, volume: Volume, ks: Iterable[int]) -> int:
        """Encode slices ``ks`` (inside the volume, not cached yet) now, in batches of
        :attr:`encode_batch`: what 3D propagation calls before walking onto them when batching pays
        (on a GPU). Returns how many slices were encoded."""
        prep = self.prepare(image_key, volume)
        depth = volume.shape[2]
        return self.encode_missing(prep, [k for k in ks if 0 <= int(k) < depth])

    # -- decoder -------------------------------------------------------------------------------
    def _checked_prompts(
        self,
        volume: Volume,
        k: int,
        fg_points_ij: Iterable[Sequence[float]] | None,
        bg_points_ij: Iterable[Sequence[float]] | None,
        box_ij: Sequence[float] | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[int, np.ndarray, np.ndarray, tuple[int, int, int, int] | None]:
        """``(k, fg (N, 2), bg (N, 2), clipped box or None)`` after the checks of :meth:`segment_slice`."""
        i_size, j_size, k_size = volume.shape
        k = check_slice_index(k, k_size)
        fg = as_points(fg_points_ij, "foreground")
        bg = as_points(bg_points_ij, "background")
        check_points_inside(fg, (i_size, j_size), "foreground")
        check_points_inside(bg, (i_size, j_size), "background")
        box = clip_box(box_ij, (i_size, j_size)) if box_ij is not None and len(box_ij) else None
        if not len(fg) and not len(bg) and box is None:
            raise UserInputError(
                f"no prompt for slice {k}: give at least one foreground/background point [i, j, {k}] or an ROI"
            )
        low_size = sf.low_res_size(self.sam)
        if mask_input is not None and tuple(mask_input.shape) != (1, 1, low_size, low_size):
            raise ValueError(
                f"mask_input must be (1, 1, {low_size}, {low_size}), got {tuple(mask_input.shape)}"
            )
        return k, fg, bg, box

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
            ``"computed"``), ``model_version``, ``timings`` (seconds: ``encode``, ``decode``, ``post``,
            ``total``), ``box_ij`` (the clipped box or None), ``low_res_logits`` (a ``(1, 1, L, L)``
            tensor, e.g. for the next slice's ``mask_input``; not JSON).

        Raises:
            UserInputError: slice out of range, a point outside the slice, a box entirely outside, no
                prompt at all.
        """
        t0 = time.perf_counter()
        k, fg, bg, box = self._checked_prompts(volume, k, fg_points_ij, bg_points_ij, box_ij, mask_input)
        with self.busy():
            prep = self.prepare(image_key, volume)
            t1 = time.perf_counter()
            emb, state = self._embed_prepared(prep, k)
            t2 = time.perf_counter()
            prompt = canvas_prompt(prep.geometry, fg, bg, box, mask_input)
            with self._decode_lock, torch.inference_mode(), _intra_op_threads(self.decode_threads):
                (decoded,) = decode_prompts(self.engine, emb, [prompt], self.multimask)
                logits_256 = canvas_logits(decoded)  # (256, 256)
            t3 = time.perf_counter()
            mask = prep.geometry.logits_from_model(logits_256) > 0  # (I, J)
        t4 = time.perf_counter()
        timings = {
            "prepare": t1 - t0,
            "encode": t2 - t1,
            "decode": t3 - t2,
            "post": t4 - t3,
            "total": t4 - t0,
        }
        info = {
            "iou": decoded.iou,
            "embedding": state,
            "model_version": self.model_version,
            "slice": k,
            "box_ij": list(box) if box is not None else None,
            "timings": {name: round(s, 4) for name, s in timings.items()},
            "low_res_logits": decoded.low_res_logits,
        }
        return mask, info

    # -- prefetch ------------------------------------------------------------------------------
    def prefetch(self, image_key: str, volume: Volume, ks: Iterable[int]) -> int:
        """Encode slices ``ks`` in a background daemon thread; return how many were queued.

        Slices already cached or outside the volume are skipped; give ``ks`` nearest first
        (:func:`neighbours`). A new call cancels the slices still waiting from earlier calls (the user
        moved on). At most :meth:`prefetch_room` slices are queued (the cache budget) and the queue is
        bounded: extra slices are dropped.
        The worker waits while a click is being served, so it never delays one by more than the
        encode already running.
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
