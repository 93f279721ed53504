"""Stateful per-slice predictor for serving: cached image embeddings, prompts in voxel indices.

This is the serving counterpart of ``segment_anything.SamPredictor``, for volumes:

* the volume stays in stored IJK order ``(I, J, K)`` (:mod:`sam_medical.volume.io`); slice ``k`` is
  ``volume[:, :, k]``, an image of height ``I`` (rows ``i``) and width ``J`` (columns ``j``);
* every slice goes through exactly the preprocessing of training (:mod:`sam_medical.canvas.preprocess`): the
  intensity window is resolved **once per volume** (:func:`sam_medical.volume.intensity.resolve_window`), then
  ``SliceGeometry.image_to_model(window.apply(slice))`` makes the ``256 x 256 x 3`` canvas;
* a click ``[i, j, k]`` is the SAM point ``(x, y) = SliceGeometry.point_to_model(i, j)`` (``x`` from
  ``j``, ``y`` from ``i``); an ROI ``i0..i1 x j0..j1`` is the box ``box_to_model(i0, i1, j0, j1)``;
* the low-resolution logits are brought back to the canvas (:func:`sam_forward.logits_to_canvas`),
  then to ``(I, J)`` (:meth:`SliceGeometry.logits_from_model`) and thresholded at 0.

Image embeddings ``(1, C, h, h)`` are kept in an :class:`EmbeddingCache`, a thread-safe,
byte-bounded LRU keyed by ``(image key, k, model version)``: a second click on a slice only runs the
mask decoder (milliseconds) instead of the image encoder. :meth:`VolumePredictor.prefetch` encodes
neighbouring slices in a daemon thread, so that moving to the next slice is fast too.

The encoder and the decoder are run by an :class:`~sam_medical.inference.engines.Engine` (``engine``): PyTorch
itself by default, or the model exported to ONNX (:mod:`sam_medical.inference.onnx_runtime`), swapped in with
:meth:`VolumePredictor.set_engine` once verified. Engines are verified to give the same masks, so the
embeddings cached under a model version serve whichever engine runs it.

Threads: the image encoder runs under one lock (one encode at a time, whoever asks: a click or the
prefetcher) and the mask decoder under another, so a click whose embedding is cached never waits for a
background encode. The prefetcher does not start a new encode while a click is being served. The model
is never modified here (a new adapter version means a new :class:`VolumePredictor` over a new model).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sam_medical.canvas.geometry import SliceGeometry
from sam_medical.errors import UserInputError
from sam_medical.inference.engines import Engine, TorchEngine
from sam_medical.model import forward as sf
from sam_medical.volume.intensity import WINDOW_PRESETS, IntensityWindow, parse_window, resolve_window
from sam_medical.volume.io import Volume, load_volume

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

#: ``(image key, slice index k, model version)``.
CacheKey = tuple[str, int, str]

EMBEDDING_CACHED = "cached"
EMBEDDING_COMPUTED = "computed"


# --- window option --------------------------------------------------------------------------------


def window_options(window: str | None) -> tuple[str, str | None]:
    """The app/CLI ``window`` option -> ``(modality, window)`` for :func:`resolve_window`.

    * ``"auto"`` (or empty): modality detected per volume; CT gets the default abdomen window
      (L40/W400), MR the 0.5-99.5 percentile clip -- exactly what ``sam-medical preprocess`` does by
      default;
    * ``"ct"`` / ``"mr"``: force the modality (CT with the default window);
    * a preset (``abdomen``, ``soft_tissue``, ``bone``, ``lung``) or ``"L,W"``: a CT window.

    Training in the app preprocesses with the same pair, so what the model learns is what it is asked.

    Raises:
        UserInputError: an unknown preset or a malformed ``L,W``.
    """
    text = (window or "auto").strip().lower()
    if text == "auto":
        return "auto", None
    if text in ("ct", "mr"):
        return text, None
    if text in WINDOW_PRESETS:
        return "ct", text
    parse_window(text)  # validates "L,W" (raises UserInputError with the accepted forms)
    return "ct", text


# --- caches ---------------------------------------------------------------------------------------


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes held by the elements of ``t``."""
    return int(t.element_size() * t.nelement())


class EmbeddingCache:
    """Thread-safe LRU of image embeddings, bounded by the bytes of the tensors it holds.

    Keys are :data:`CacheKey` tuples ``(image_key, k, model_version)``; values are embeddings
    ``(1, C, h, h)`` (any tensor works). Inserting beyond ``max_bytes`` evicts the least recently
    used entries; a tensor larger than ``max_bytes`` on its own is not stored. ``get`` counts hits and
    misses; ``peek`` does not.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The tensor under ``key`` (now the most recently used), or None. Counts a hit or a miss."""
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def peek(self, key: Hashable) -> torch.Tensor | None:
        """Like :meth:`get` without touching the statistics or the LRU order."""
        with self._lock:
            return self._data.get(key)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def put(self, key: Hashable, value: torch.Tensor) -> bool:
        """Store ``value`` under ``key`` (replacing any), evicting LRU entries to stay within budget.

        Returns False (and stores nothing) when ``value`` alone is larger than ``max_bytes``.
        """
        size = tensor_nbytes(value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= tensor_nbytes(old)
            if size > self.max_bytes:
                return False
            while self._data and self._bytes + size > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= tensor_nbytes(evicted)
                self.evictions += 1
            self._data[key] = value
            self._bytes += size
            return True

    def discard(self, predicate: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key satisfies ``predicate``; return how many were removed."""
        with self._lock:
            doomed = [k for k in self._data if predicate(k)]
            for k in doomed:
                self._bytes -= tensor_nbytes(self._data.pop(k))
            return len(doomed)

    def discard_version(self, model_version: str) -> int:
        """Remove the embeddings made by model version ``model_version`` (the key's third item)."""
        return self.discard(lambda k: isinstance(k, tuple) and len(k) == 3 and k[2] == model_version)

    def clear(self) -> None:
        """Remove everything and reset the statistics."""
        with self._lock:
            self._data.clear()
            self._bytes = 0
            self.hits = self.misses = self.evictions = 0

    def stats(self) -> dict[str, int]:
        """``{"hits", "misses", "evictions", "entries", "bytes", "max_bytes"}``."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "entries": len(self._data),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
            }


class VolumeCache:
    """Thread-safe LRU of loaded volumes, keyed by file identity, bounded by array bytes.

    :meth:`load` returns ``(image_key, volume, state)``. The image key is
    ``"<real path>@<mtime_ns>:<size>"``: a file replaced on disk gets a new key, so nothing cached for
    the old content (embeddings included) is ever used for the new one. Loading happens outside the
    lock (two threads may load the same new file at once; both get a correct volume).
    """

    def __init__(self, max_bytes: int = 2 << 30, loader: Callable[[str], Volume] = load_volume) -> None:
        self.max_bytes = int(max_bytes)
        self._loader = loader
        self._data: OrderedDict[str, Volume] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key_of(path: str | os.PathLike) -> str:
        """The image key of the file at ``path`` (raises :class:`UserInputError` if it is missing)."""
        p = Path(path)
        try:
            real = os.path.realpath(p)
            st = os.stat(real)
        except OSError:
            raise UserInputError(f"image file not found: {p}") from None
        return f"{real}@{st.st_mtime_ns}:{st.st_size}"

    def load(self, path: str | os.PathLike) -> tuple[str, Volume, str]:
        """``(image_key, volume, "cached" | "loaded")`` for the image at ``path``.

        Raises:
            UserInputError: missing, corrupt or unsupported file (from :func:`load_volume`).
        """
        key = self.key_of(path)
        with self._lock:
            vol = self._data.get(key)
            if vol is not None:
                self._data.move_to_end(key)
                self.hits += 1
                return key, vol, "cached"
            self.misses += 1
        vol = self._loader(str(path))
        size = int(vol.array.nbytes)
        with self._lock:
            if key not in self._data and size <= self.max_bytes:
                while self._data and self._bytes + size > self.max_bytes:
                    _, old = self._data.popitem(last=False)
                    self._bytes -= int(old.array.nbytes)
                self._data[key] = vol
                self._bytes += size
        return key, vol, "loaded"

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "entries": len(self._data),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
            }

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


# --- prepared volumes ------------------------------------------------------------------------------


@dataclass
class PreparedVolume:
    """A volume with its intensity window resolved once; makes canvases on demand.

    ``volume.array`` is ``(I, J, K)``; :meth:`canvas` returns slice ``k`` as a ``(256, 256, 3)`` uint8
    canvas, exactly as :func:`sam_medical.canvas.preprocess.volume_to_slices` makes training slices.
    """

    image_key: str
    volume: Volume
    window: IntensityWindow
    geometry: SliceGeometry

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.shape

    def canvas(self, k: int) -> np.ndarray:
        """Slice ``k`` -> ``(256, 256, 3)`` uint8 canvas (windowed, resized, zero-padded)."""
        kji = self.volume.array.transpose(2, 1, 0)  # contiguous (K, J, I) view
        return self.geometry.image_to_model(self.window.apply(kji[int(k)].T))


# --- prompt checks ---------------------------------------------------------------------------------


def _as_points(points: Iterable[Sequence[float]] | None, what: str) -> np.ndarray:
    """``[(i, j), ...]`` -> ``(N, 2)`` float64 (extra coordinates, e.g. ``k``, are refused)."""
    if points is None:
        return np.zeros((0, 2), np.float64)
    try:
        arr = np.asarray([[float(v) for v in p] for p in points], dtype=np.float64)
    except (TypeError, ValueError):
        raise UserInputError(f"{what} points must be lists of numbers [i, j], got {points!r}") from None
    if arr.size == 0:
        return np.zeros((0, 2), np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise UserInputError(f"{what} points must be [i, j] pairs, got {points!r}")
    if not np.isfinite(arr).all():
        raise UserInputError(f"{what} points must be finite numbers, got {points!r}")
    return arr


def check_slice_index(k: Any, depth: int) -> int:
    """``k`` as an int in ``0..depth-1``, else :class:`UserInputError`."""
    try:
        kk = int(k)
        if kk != float(k):
            raise ValueError
    except (TypeError, ValueError):
        raise UserInputError(f"slice index must be an integer, got {k!r}") from None
    if not 0 <= kk < depth:
        raise UserInputError(f"slice {kk} is outside the volume: it has {depth} slices (0..{depth - 1})")
    return kk


def check_points_inside(points: np.ndarray, shape_ij: tuple[int, int], what: str) -> None:
    """Refuse points outside ``0..I-1 x 0..J-1`` with a message naming the first offender."""
    h, w = shape_ij
    bad = (points[:, 0] < 0) | (points[:, 0] > h - 1) | (points[:, 1] < 0) | (points[:, 1] > w - 1)
    if bad.any():
        i, j = points[np.flatnonzero(bad)[0]]
        raise UserInputError(
            f"{what} point [i={i:g}, j={j:g}] is outside the slice: i must be in 0..{h - 1} and j in 0..{w - 1}"
        )


def clip_box(box_ij: Sequence[float], shape_ij: tuple[int, int]) -> tuple[int, int, int, int]:
    """ROI ``(i0, i1, j0, j1)`` in any order -> ordered, rounded and clipped to the slice.

    Raises:
        UserInputError: malformed, or entirely outside the slice.
    """
    try:
        vals = [float(v) for v in box_ij]
    except (TypeError, ValueError):
        raise UserInputError(f"box must be 4 numbers [i0, i1, j0, j1], got {box_ij!r}") from None
    if len(vals) != 4 or not np.isfinite(vals).all():
        raise UserInputError(f"box must be 4 finite numbers [i0, i1, j0, j1], got {box_ij!r}")
    h, w = shape_ij
    i0, i1 = sorted(vals[0:2])
    j0, j1 = sorted(vals[2:4])
    if i1 < 0 or i0 > h - 1 or j1 < 0 or j0 > w - 1:
        raise UserInputError(
            f"box i {i0:g}..{i1:g}, j {j0:g}..{j1:g} is entirely outside the slice (i 0..{h - 1}, j 0..{w - 1})"
        )
    ci0, ci1 = int(round(max(0.0, i0))), int(round(min(h - 1.0, i1)))
    cj0, cj1 = int(round(max(0.0, j0))), int(round(min(w - 1.0, j1)))
    return ci0, ci1, cj0, cj1


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


@dataclass
class _PrefetchStats:
    queued: int = 0
    encoded: int = 0
    skipped: int = 0
    dropped: int = 0
    cancelled: int = 0


@dataclass
class _Job:
    generation: int
    prepared: PreparedVolume
    k: int


class VolumePredictor:
    """Segments slices of volumes with one SAM model version, caching image embeddings.

    Args:
        sam: the model (eval mode; LoRA merged or not). It is never modified here.
        model_version: identifies the weights (``"base"`` or an adapter version); part of every cache
            key, so embeddings of another version are never used.
        cache: the embedding cache (may be shared between predictors of several versions).
        window: the ``window`` option (:func:`window_options`).
        multimask: ``False``: SAM's single-mask output (as trained); ``"auto"``: three masks and the best
            predicted IoU when the prompt is a single point (SAM's advice for ambiguous prompts).
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
        multimask: bool | str = False,
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
        self.multimask = multimask
        self.prefetch_threads = prefetch_threads
        self.decode_threads = decode_threads
        self.modality, self.window_name = window_options(window)
        self._window_tag = self.window_name or self.modality
        self._encode_lock = threading.Lock()
        self._decode_lock = threading.Lock()
        self._prepared: OrderedDict[str, PreparedVolume] = OrderedDict()
        self._prepared_lock = threading.Lock()
        self._active_clicks = 0
        self._active_lock = threading.Lock()
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max(1, int(prefetch_queue)))
        self._generation = 0
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.prefetch_stats = _PrefetchStats()
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

    def _embed_many(self, prep: PreparedVolume, ks: Sequence[int]) -> int:
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
        return self._embed_many(prep, [k for k in ks if 0 <= int(k) < depth])

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
        """Segment slice ``k`` from voxel-index prompts.

        Args:
            image_key: identifies the volume's content (e.g. :meth:`VolumeCache.key_of`).
            volume: ``(I, J, K)``.
            k: slice index.
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
        i_size, j_size, k_size = volume.shape
        k = check_slice_index(k, k_size)
        fg = _as_points(fg_points_ij, "foreground")
        bg = _as_points(bg_points_ij, "background")
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

        with self.busy():
            prep = self.prepare(image_key, volume)
            t1 = time.perf_counter()
            emb, state = self._embed_prepared(prep, k)
            t2 = time.perf_counter()
            geom = prep.geometry
            points = labels = boxes = None
            if len(fg) or len(bg):
                xy = [geom.point_to_model(i, j) for i, j in np.concatenate([fg, bg])]
                points = torch.tensor([xy], dtype=torch.float32)  # (1, N, 2) canvas (x, y)
                labels = torch.tensor([[1] * len(fg) + [0] * len(bg)], dtype=torch.int64)
            if box is not None:
                boxes = torch.tensor([geom.box_to_model(*box)], dtype=torch.float32)  # (1, 4)
            multimask = (
                self.multimask == "auto" and boxes is None and mask_input is None and len(fg) + len(bg) == 1
            )
            with self._decode_lock, torch.inference_mode(), _intra_op_threads(self.decode_threads):
                low, iou = self.engine.decode(
                    emb,
                    points=points,
                    point_labels=labels,
                    boxes=boxes,
                    mask_inputs=mask_input,
                    multimask_output=bool(multimask),
                )
                best = int(torch.argmax(iou[0])) if multimask else 0
                low = low[:, best : best + 1].float()  # (1, 1, L, L)
                canvas_logits = sf.logits_to_canvas(low)[0, 0].cpu().numpy()  # (256, 256)
            t3 = time.perf_counter()
            logits = geom.logits_from_model(canvas_logits)  # (I, J)
            mask = logits > 0
        t4 = time.perf_counter()
        info = {
            "iou": float(iou[0, best]),
            "embedding": state,
            "model_version": self.model_version,
            "slice": k,
            "box_ij": list(box) if box is not None else None,
            "timings": {
                "prepare": round(t1 - t0, 4),
                "encode": round(t2 - t1, 4),
                "decode": round(t3 - t2, 4),
                "post": round(t4 - t3, 4),
                "total": round(t4 - t0, 4),
            },
            "low_res_logits": low.detach().cpu(),
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
        if self._closed:
            return 0
        prep = self.prepare(image_key, volume)
        k_size = volume.shape[2]
        with self._active_lock:
            self._generation += 1
            gen = self._generation
        self._drop_pending()  # the user moved on: what earlier calls queued must not fill the queue
        self._ensure_worker()
        queued = 0
        room = self.prefetch_room()
        for k in ks:
            k = int(k)
            if not 0 <= k < k_size or self.cache_key(image_key, k) in self.cache:
                continue
            if queued >= room:  # within the cache budget: never evict what was just encoded
                self.prefetch_stats.dropped += 1
                continue
            try:
                self._queue.put_nowait(_Job(gen, prep, k))
                queued += 1
            except queue.Full:
                self.prefetch_stats.dropped += 1
        self.prefetch_stats.queued += queued
        return queued

    def prefetch_room(self) -> int:
        """How many slices a prefetch may encode within the embedding cache's budget: as many embeddings
        as it holds, less one for the slice being clicked (so prefetching never evicts it)."""
        return max(0, self.cache.max_bytes // self._embedding_bytes - 1)

    def cancel_prefetch(self) -> None:
        """Forget every slice still waiting to be encoded."""
        with self._active_lock:
            self._generation += 1
        self._drop_pending()

    def _drop_pending(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self.prefetch_stats.cancelled += 1
            self._queue.task_done()

    def prefetch_idle(self, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` seconds for the prefetch queue to drain; True when it is empty."""
        deadline = time.monotonic() + timeout
        while True:
            if self._queue.unfinished_tasks == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._stop.clear()
            self._worker = threading.Thread(
                target=self._prefetch_loop, name=f"prefetch-{self.model_version}", daemon=True
            )
            self._worker.start()

    def _next_jobs(self, first: _Job) -> list[_Job]:
        """``first`` and, when the engine batches (a GPU), more waiting jobs for the same volume."""
        jobs = [first]
        while len(jobs) < self.encode_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            if job.prepared is not first.prepared:
                break
        return jobs

    def _prefetch_loop(self) -> None:
        # intra-op threads are a per-thread setting (OpenMP): background encodes use few cores and
        # leave the others to the clicks
        torch.set_num_threads(max(1, int(self.prefetch_threads)))
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            jobs = self._next_jobs(first)
            try:
                live = []
                for job in jobs:
                    if job.generation != self._generation:
                        self.prefetch_stats.cancelled += 1
                    elif self.cache_key(job.prepared.image_key, job.k) in self.cache:
                        self.prefetch_stats.skipped += 1
                    else:
                        live.append(job)
                if not live:
                    continue
                while self._active_clicks and not self._stop.is_set():
                    time.sleep(0.002)
                if self._stop.is_set():
                    break
                groups: dict[int, list[_Job]] = {}
                for job in live:
                    groups.setdefault(id(job.prepared), []).append(job)
                for group in groups.values():
                    encoded = self._embed_many(group[0].prepared, [job.k for job in group])
                    self.prefetch_stats.encoded += encoded
                    self.prefetch_stats.skipped += len(group) - encoded
            except Exception:  # noqa: BLE001 - a background encode must never kill the worker
                self.prefetch_stats.skipped += len(jobs)
            finally:
                for _ in jobs:
                    self._queue.task_done()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Stop the prefetch worker for good (pending slices are dropped; segmenting still works)."""
        self._closed = True
        self._stop.set()
        self.cancel_prefetch()

    def stats(self) -> dict[str, Any]:
        """Cache statistics plus prefetch counters and the number of image-encoder runs."""
        ps = self.prefetch_stats
        return {
            **self.cache.stats(),
            "encoder_calls": self.encoder_calls,
            "engine": getattr(self.engine, "name", type(self.engine).__name__),
            "prefetch": {
                "queued": ps.queued,
                "encoded": ps.encoded,
                "skipped": ps.skipped,
                "dropped": ps.dropped,
                "cancelled": ps.cancelled,
                "pending": self._queue.qsize(),
                "in_flight": self._queue.unfinished_tasks,
            },
        }


def neighbours(k: int, count: int, depth: int) -> list[int]:
    """Up to ``count`` slice indices nearest to ``k`` inside ``0..depth-1``: ``k+1, k-1, k+2, k-2, ...``."""
    out: list[int] = []
    step = 1
    while len(out) < count and step < depth:
        for cand in (k + step, k - step):
            if 0 <= cand < depth and len(out) < count:
                out.append(cand)
        step += 1
    return out
