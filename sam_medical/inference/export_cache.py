"""The export cache: one verified export per model version, in ``<cache>/<digest>/``, loaded or made.

A folder holds ``encoder.onnx``, ``decoder.onnx`` and ``manifest.json``; its digest (:func:`export_key`)
covers the base weights' digest, the adapter's version and file digest, the export format, opset,
exporter, torch and runtime versions. A folder is built under a temporary name and renamed when
complete; a cached export whose manifest or file digests do not match, or that a runtime cannot open, is
rebuilt, never served. A fresh export is verified (:mod:`sam_medical.inference.export_check`) before it is
cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sam_medical.atomic import write_json_atomic
from sam_medical.inference import onnx_export
from sam_medical.inference.export_check import verify_engine, warm_up
from sam_medical.inference.onnx_engine import OnnxEngine, runtime_versions
from sam_medical.inference.onnx_export import (
    DECODER_FILE,
    ENCODER_FILE,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    EXPORTER,
    OPSET,
    ExportError,
)
from sam_medical.model import forward as sf
from sam_medical.model.checkpoints import sha256_file

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


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


def _load_cached(
    folder: Path, key: str, sam: Sam, backend: str, threads: int, t0: float
) -> OnnxEngine | None:
    """The cached export in ``folder`` when it is intact and runs (warmed up), else None (logged)."""
    try:
        manifest = _check_cached(folder, key)
        engine = OnnxEngine(folder, sf.input_size(sam), threads, backend, manifest)
        warm_up(engine, sam)
    except Exception as exc:  # noqa: BLE001 - anything wrong with a cached export means: rebuild it
        logger.warning(f"sam_medical: cached export {folder} is not used ({exc}); exporting again")
        return None
    engine.manifest = {**manifest, "source": "cache", "load_s": round(time.perf_counter() - t0, 3)}
    return engine


def _export_verified(sam: Sam, tmp: Path, key: str, parts: dict, backend: str, threads: int) -> OnnxEngine:
    """Export ``sam`` into ``tmp``, open it, verify it and write its manifest (raises ExportMismatch)."""
    timings = onnx_export.export_onnx(sam, tmp)
    t1 = time.perf_counter()
    engine = OnnxEngine(tmp, sf.input_size(sam), threads, backend)
    timings["session_s"] = round(time.perf_counter() - t1, 3)
    t1 = time.perf_counter()
    verification = verify_engine(engine, sam)
    timings["verify_s"] = round(time.perf_counter() - t1, 3)
    engine.manifest = {
        "format": EXPORT_FORMAT,
        "key": key,
        **parts,
        "files": {name: sha256_file(tmp / name) for name in (ENCODER_FILE, DECODER_FILE)},
        "timings": timings,
        "verification": verification,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(tmp / MANIFEST_FILE, engine.manifest)
    return engine


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
    if folder.exists():
        engine = _load_cached(folder, key, sam, backend, threads, t0)
        if engine is not None:
            return engine
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", suffix=".part", dir=cache))
    try:
        engine = _export_verified(sam, tmp, key, parts, backend, threads)
        _replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the sessions hold the graphs in memory; they were made from the files now in ``folder``
    engine.manifest = {**engine.manifest, "source": "export", "load_s": round(time.perf_counter() - t0, 3)}
    verification = engine.manifest["verification"]
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
