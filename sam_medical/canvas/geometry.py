"""Slice geometry: the resize-longest-side-to-256 plus bottom/right zero padding, and its inverse.

This is Segment Anything's own ``ResizeLongestSide`` followed by padding to a square, applied to one
slice ``volume[:, :, k]`` of shape ``(H, W) = (I, J)``:

* scale ``s = size / max(H, W)``; resized shape ``(h, w) = (int(H * s + 0.5), int(W * s + 0.5))``;
* the resized slice sits at the top-left of a ``size x size`` canvas; rows ``h..size`` and columns
  ``w..size`` are zero;
* images are resized bilinearly with antialiasing (PIL, as ``ResizeLongestSide.apply_image`` does),
  labels with nearest neighbour.

Points: voxel ``(i, j)`` has its centre at ``(i + 0.5, j + 0.5)`` in source pixel units. In model
pixel-index units this is ``y = (i + 0.5) * h / H - 0.5``, ``x = (j + 0.5) * w / W - 0.5`` (SAM's
prompt encoder adds the 0.5 back). Training prompts are taken from pixel indices of the 256 mask, so
both sides agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

MODEL_SLICE_SIZE = 256


@dataclass(frozen=True)
class SliceGeometry:
    """Maps between a source slice ``(height, width) = (I, J)`` and the padded ``size x size`` canvas."""

    height: int
    width: int
    size: int = MODEL_SLICE_SIZE

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"slice shape must be positive, got {self.height}x{self.width}")

    @property
    def scale(self) -> float:
        """``size / max(height, width)``."""
        return self.size / max(self.height, self.width)

    @property
    def resized_shape(self) -> tuple[int, int]:
        """``(h, w)``: the slice's shape on the canvas, before padding."""
        s = self.scale
        return (max(1, int(self.height * s + 0.5)), max(1, int(self.width * s + 0.5)))

    # --- arrays ---------------------------------------------------------------------------------
    def image_to_model(self, slice_u8: np.ndarray) -> np.ndarray:
        """``(H, W)`` or ``(H, W, 3)`` uint8 -> ``(size, size, 3)`` uint8, bilinear, zero-padded."""
        if slice_u8.dtype != np.uint8:
            raise TypeError("image_to_model expects uint8")
        gray = slice_u8 if slice_u8.ndim == 2 else slice_u8[..., 0]
        out = np.zeros((self.size, self.size), np.uint8)
        h, w = self.resized_shape
        out[:h, :w] = _resize_u8(gray, (h, w), Image.BILINEAR)
        return np.repeat(out[..., None], 3, axis=2)

    def label_to_model(self, label: np.ndarray) -> np.ndarray:
        """``(H, W)`` integer label -> ``(size, size)`` uint8, nearest neighbour, zero-padded."""
        if label.size and int(label.max()) > 255:
            raise ValueError("label values above 255 do not fit the uint8 slice format")
        out = np.zeros((self.size, self.size), np.uint8)
        h, w = self.resized_shape
        out[:h, :w] = _resize_u8(label.astype(np.uint8, copy=False), (h, w), Image.NEAREST)
        return out

    def label_from_model(self, label: np.ndarray) -> np.ndarray:
        """``(size, size)`` label on the canvas -> ``(H, W)`` uint8 at the source resolution (nearest)."""
        h, w = self.resized_shape
        return _resize_u8(
            np.ascontiguousarray(label[:h, :w]).astype(np.uint8), (self.height, self.width), Image.NEAREST
        )

    def logits_from_model(self, logits: np.ndarray) -> np.ndarray:
        """``(size, size)`` float logits on the canvas -> ``(H, W)`` float32, bilinear. Threshold at 0."""
        h, w = self.resized_shape
        crop = np.ascontiguousarray(logits[:h, :w], dtype=np.float32)
        img = Image.fromarray(crop, mode="F").resize((self.width, self.height), Image.BILINEAR)
        return np.asarray(img, dtype=np.float32)

    # --- prompts --------------------------------------------------------------------------------
    def point_to_model(self, i: float, j: float) -> tuple[float, float]:
        """Source voxel ``(i, j)`` -> SAM point ``(x, y)`` in canvas pixel-index units."""
        h, w = self.resized_shape
        return ((j + 0.5) * w / self.width - 0.5, (i + 0.5) * h / self.height - 0.5)

    def box_to_model(self, i0: float, i1: float, j0: float, j1: float) -> tuple[float, float, float, float]:
        """Inclusive voxel ranges ``i0..i1`` x ``j0..j1`` -> SAM box ``(x0, y0, x1, y1)`` on the canvas."""
        x0, y0 = self.point_to_model(min(i0, i1), min(j0, j1))
        x1, y1 = self.point_to_model(max(i0, i1), max(j0, j1))
        return (x0, y0, x1, y1)

    def point_from_model(self, x: float, y: float) -> tuple[float, float]:
        """Inverse of :meth:`point_to_model`: canvas ``(x, y)`` -> source ``(i, j)`` (continuous)."""
        h, w = self.resized_shape
        return ((y + 0.5) * self.height / h - 0.5, (x + 0.5) * self.width / w - 0.5)

    def as_dict(self) -> dict:
        return {
            "slice_shape": [self.height, self.width],
            "size": self.size,
            "scale": self.scale,
            "resized_shape": list(self.resized_shape),
            "pad": "bottom/right with zeros",
        }


def _resize_u8(arr: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    if arr.shape == hw:
        return np.array(arr, dtype=np.uint8, copy=True)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L")
    return np.asarray(img.resize((hw[1], hw[0]), resample), dtype=np.uint8)
