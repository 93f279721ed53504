"""The two caches of serving: image embeddings per slice, and loaded volumes.

* :class:`EmbeddingCache`: embeddings ``(1, C, h, h)`` float32, a thread-safe LRU bounded by bytes, keyed by
  :data:`CacheKey` ``(image key + window option, slice index k, model version)``; shared by the predictors of
  all served model versions.
* :class:`VolumeCache`: volumes ``(I, J, K)`` in stored IJK order (:mod:`sam_medical.volume.io`), keyed by
  file identity (path, mtime, size).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

from sam_medical.errors import UserInputError
from sam_medical.volume.io import Volume, load_volume

#: ``(image key, slice index k, model version)``.
CacheKey = tuple[str, int, str]


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
