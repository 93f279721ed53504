"""Intensity normalisation to uint8: CT windows and MR percentile clipping.

* CT: a window ``(level, width)`` maps ``[level - width/2, level + width/2]`` linearly onto ``[0, 255]``
  and clips outside. Presets: ``abdomen`` L40/W400 (default, MedSAM's), ``soft_tissue`` L50/W350,
  ``bone`` L400/W1800, ``lung`` L-600/W1500, or any ``L,W``.
* MR: clipped to the 0.5 and 99.5 percentiles of the volume's nonzero voxels (all voxels if none are
  nonzero), then mapped linearly onto ``[0, 255]``.
* ``auto``: CT when the volume holds clearly negative intensities (the 0.5 percentile is below -100,
  i.e. fat or air in Hounsfield units); MR otherwise.

The window is decided once per volume, so every slice of a volume uses the same mapping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sam_medical.errors import UserInputError

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
}
DEFAULT_WINDOW = "abdomen"
MODALITIES = ("ct", "mr", "auto")
MR_PERCENTILES = (0.5, 99.5)
AUTO_CT_THRESHOLD = -100.0


@dataclass(frozen=True)
class IntensityWindow:
    """``lo`` maps to 0 and ``hi`` to 255; values outside are clipped."""

    lo: float
    hi: float
    modality: str
    name: str

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Any-shape float array -> uint8 of the same shape."""
        scale = 255.0 / max(self.hi - self.lo, 1e-6)
        out = (np.asarray(values, dtype=np.float32) - np.float32(self.lo)) * np.float32(scale)
        np.clip(out, 0.0, 255.0, out=out)
        return np.rint(out, out=out).astype(np.uint8)

    def as_dict(self) -> dict:
        return asdict(self)


def parse_window(window: str | tuple[float, float] | None) -> tuple[str, float, float]:
    """``"abdomen"`` / ``"40,400"`` / ``(40, 400)`` -> ``(name, level, width)``."""
    if window is None or window == "":
        window = DEFAULT_WINDOW
    if isinstance(window, (tuple, list)):
        level, width = float(window[0]), float(window[1])
        name = f"L{level:g}/W{width:g}"
    elif window in WINDOW_PRESETS:
        level, width = WINDOW_PRESETS[window]
        name = window
    else:
        parts = str(window).replace(" ", "").split(",")
        try:
            level, width = (float(p) for p in parts)
        except ValueError:
            raise UserInputError(
                f"unknown window {window!r}: use one of {', '.join(WINDOW_PRESETS)} or LEVEL,WIDTH (e.g. 40,400)"
            ) from None
        name = f"L{level:g}/W{width:g}"
    if not np.isfinite([level, width]).all() or width <= 0:
        raise UserInputError(f"window width must be a positive number, got {width:g}")
    return name, level, width


def detect_modality(values: np.ndarray) -> str:
    """``"ct"`` if the volume holds clearly negative values (Hounsfield units), else ``"mr"``."""
    return "ct" if float(np.percentile(_subsample(values), 0.5)) < AUTO_CT_THRESHOLD else "mr"


def _subsample(values: np.ndarray, target: int = 2_000_000) -> np.ndarray:
    """A strided 1D sample of about ``target`` voxels (no full copy of a large volume)."""
    arr = np.asarray(values)
    step = 1
    while arr.size / step**arr.ndim > target:
        step += 1
    if arr.ndim:
        arr = arr[(slice(None, None, step),) * arr.ndim]
    return np.asarray(arr, dtype=np.float32).ravel()


def resolve_window(
    values: np.ndarray, modality: str = "auto", window: str | tuple | None = None
) -> IntensityWindow:
    """Decide the uint8 mapping for a whole volume ``values`` (any shape)."""
    modality = (modality or "auto").lower()
    if modality not in MODALITIES:
        raise UserInputError(f"unknown modality {modality!r}: use ct, mr or auto")
    if modality == "auto":
        modality = detect_modality(values)
    if modality == "ct":
        name, level, width = parse_window(window)
        return IntensityWindow(lo=level - width / 2.0, hi=level + width / 2.0, modality="ct", name=name)
    flat = _subsample(values)
    nonzero = flat[flat != 0]
    ref = nonzero if nonzero.size else flat
    lo, hi = (float(v) for v in np.percentile(ref, MR_PERCENTILES))
    if hi <= lo:
        hi = lo + 1.0
    return IntensityWindow(lo=lo, hi=hi, modality="mr", name="percentile_0.5_99.5")


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
