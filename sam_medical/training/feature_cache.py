"""Cache what the frozen part of the image encoder computes, so that training encodes each slice once.

Fine-tuning leaves most of the encoder frozen, and its training slices do not change from epoch to epoch
(only their prompts do). So the frozen computation is done once per slice and kept:

* **embedding** mode: nothing in the encoder trains (decoder-only fine-tuning). The image embedding
  ``(C, h, h)`` itself is cached; a training step runs only the prompt encoder and the mask decoder;
* **stem** mode: LoRA adapts the encoder's attention blocks, and the family can split its encoder into a
  frozen *stem* before the first adapted block and a *trunk* after it (LiteMedSAM: the patch embedding
  and the convolutional stage 1, about 40% of the encoder's time, whose output is ``(16384, 128)`` per
  slice). The stem output is cached; the trunk runs with gradients;
* **none**: no split is known (ViT SAM's stem is a patch embedding, not worth caching).

Entries are keyed by ``(case file uid, slice index)`` (what :class:`sam_medical.training.dataset.NpzSliceDataset`
items carry), held on the CPU in a least-recently-used store bounded by bytes; a miss recomputes, so a data
set larger than the budget still trains, only slower. With a ``disk_dir``, entries are also written there
(atomically, one file per slice, in a folder named after ``identity``: the frozen layers' weights), so that
later runs on the same slice files -- another fold, another recipe, a retraining in the app -- read them
instead of encoding again. Nothing here changes the numbers: the cached tensor is exactly what the frozen
layers return for that slice.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sam_medical.atomic import atomic_path
from sam_medical.model import forward as sf
from sam_medical.model.registry import family_of, load_callable

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

MODE_EMBEDDING = "embedding"
MODE_STEM = "stem"
MODE_NONE = "none"


def encoder_trains(sam: Sam) -> bool:
    """True when some parameter of the image encoder has ``requires_grad``."""
    return any(p.requires_grad for p in sam.image_encoder.parameters())


def stem_split(
    sam: Sam,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None:
    """``(stem, trunk)`` with ``trunk(stem(x)) == sam.image_encoder(x)`` and a stem that holds no trainable
    parameter, or None when the family has no such split."""
    spec = family_of(sam).encoder_split
    if spec is None:
        return None
    stem, trunk, stem_modules = load_callable(spec)(sam)
    if any(p.requires_grad for m in stem_modules for p in m.parameters()):
        return None
    return stem, trunk


class FeatureCache:
    """See the module docstring. ``max_bytes`` bounds the cached tensors in memory (0: cache nothing);
    ``disk_dir`` (optional) keeps them across runs, under ``identity`` (what the frozen layers are)."""

    def __init__(
        self, sam: Sam, max_bytes: int, disk_dir: str | Path | None = None, identity: str = ""
    ) -> None:
        self.max_bytes = int(max_bytes)
        self.split = None
        if not encoder_trains(sam):
            self.mode = MODE_EMBEDDING
        else:
            self.split = stem_split(sam)
            self.mode = MODE_STEM if self.split is not None else MODE_NONE
        self._data: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.disk_reads = 0
        self.disk: Path | None = None
        if disk_dir is not None and self.mode != MODE_NONE:
            tag = hashlib.sha1(f"{self.mode}|{identity}".encode()).hexdigest()[:16]
            self.disk = Path(disk_dir) / f"{self.mode}-{tag}"
            self.disk.mkdir(parents=True, exist_ok=True)

    def _disk_path(self, key: Hashable) -> Path | None:
        if self.disk is None:
            return None
        return self.disk / (hashlib.sha1(repr(key).encode()).hexdigest()[:24] + ".pt")

    def _read_disk(self, key: Hashable) -> torch.Tensor | None:
        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            return None
        if not isinstance(value, torch.Tensor) or not bool(torch.isfinite(value).all()):
            return None
        self.disk_reads += 1
        return value

    def _write_disk(self, key: Hashable, value: torch.Tensor) -> None:
        path = self._disk_path(key)
        if path is not None and not path.exists():
            with atomic_path(path) as tmp:
                torch.save(value, tmp)

    def _get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return value

    def _put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.element_size() * value.nelement()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.element_size() * old.nelement()
            while self._data and self._bytes + size > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= evicted.element_size() * evicted.nelement()
            self._data[key] = value
            self._bytes += size

    def _frozen(self, sam: Sam, images: torch.Tensor, keys: Sequence[Hashable]) -> torch.Tensor:
        """The frozen computation for a batch, from the cache where present: ``(B, ...)`` on the model's device."""
        device = sam.pixel_mean.device
        found = [self._get(k) for k in keys]
        for i, f in enumerate(found):
            if f is None and (value := self._read_disk(keys[i])) is not None:
                found[i] = value
                self._put(keys[i], value)
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            with torch.no_grad():
                x = sf.canvas_to_input(sam, images[missing])
                out = sam.image_encoder(x) if self.mode == MODE_EMBEDDING else self.split[0](x)
            for j, i in enumerate(missing):
                value = out[j].detach().to("cpu").contiguous()
                found[i] = value
                self._put(keys[i], value)
                self._write_disk(keys[i], value)
        return torch.stack([f for f in found]).to(device, non_blocking=True)

    def embed(self, sam: Sam, images: torch.Tensor, keys: Sequence[Hashable] | None) -> torch.Tensor:
        """Image embeddings ``(B, C, h, h)`` of canvases ``images (B, 256, 256, 3)`` uint8.

        ``keys`` (one per image) identify the slices; without them (or in mode ``none``) the encoder runs
        in full. Gradients flow through whatever is not cached.
        """
        if keys is None or self.mode == MODE_NONE or self.max_bytes <= 0:
            return sf.encode(sam, sf.canvas_to_input(sam, images))
        frozen = self._frozen(sam, images, keys)
        return frozen if self.mode == MODE_EMBEDDING else self.split[1](frozen)

    def stats(self) -> dict[str, int | str]:
        with self._lock:
            return {
                "mode": self.mode,
                "entries": len(self._data),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "disk_reads": self.disk_reads,
                "disk": str(self.disk) if self.disk else None,
            }
