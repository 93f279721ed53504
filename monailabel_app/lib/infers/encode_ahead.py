"""Encode ahead: when an image is opened, its slices are encoded in the background, centre first.

How the app sees an image being opened in 3D Slicer (``MONAILabel.py``, ``onNextSampleButton``):

* ``POST /activelearning/{strategy}`` (:meth:`MONAILabelApp.next_sample`) names the next image; Slicer
  loads it from the returned ``path`` when that file is on its machine,
* else it downloads it: ``GET /datastore/image?image=ID`` (:func:`install_download_hook` puts a route in
  front of MONAI Label's that tells :class:`EncodeAhead` before answering with MONAI Label's own);
* the first infer request on an image that was not opened either way (``sam_2d`` then queues the whole
  volume after the clicked slice's neighbours, :func:`~lib.infers.sam_2d.prefetch_order`).

:meth:`EncodeAhead.opened` loads the volume (the shared :class:`~sam_medical.inference.caches.VolumeCache`)
on its own daemon thread and queues every slice, centre outwards
(:func:`~sam_medical.inference.volume_slices.centre_out`), on the served predictor's prefetcher: within
the embedding cache's budget, and a click always stops a background encode it would wait for
(:mod:`sam_medical.inference.preemption`). Nothing happens when ``prefetch_slices`` is 0.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from fastapi import APIRouter, Depends
from monailabel.config import settings
from monailabel.endpoints import datastore as datastore_endpoints
from monailabel.endpoints.user.auth import RBAC, User

from sam_medical.inference.volume_slices import centre_out

from ..served_model import ServedModel

logger = logging.getLogger(__name__)


class EncodeAhead:
    """Background encoding of opened images (see the module docstring); the latest open wins."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self._lock = threading.Lock()
        self._pending: str | None = None
        self._thread: threading.Thread | None = None
        self.opened_count = 0

    def opened(self, path: str) -> None:
        """The image file at ``path`` was opened: encode its slices in the background (returns at once)."""
        if not self.served.config.prefetch_slices:
            return
        with self._lock:
            self._pending = str(path)
            self.opened_count += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="sam-medical-encode-ahead", daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                path, self._pending = self._pending, None
                if path is None:
                    self._thread = None
                    return
            try:
                self._queue_slices(path)
            except Exception as exc:  # noqa: BLE001 - a background convenience: log and carry on
                logger.warning(f"sam_medical: encode ahead of {path} skipped ({type(exc).__name__}: {exc})")

    def _queue_slices(self, path: str) -> None:
        predictor = self.served.predictor()
        image_key, volume, _ = self.served.volumes.load(path)
        queued = predictor.prefetch(image_key, volume, centre_out(volume.shape[2]))
        logger.info(f"sam_medical: image opened, {queued} slices queued for background encoding: {path}")


def install_download_hook(encode_ahead: EncodeAhead, fastapi_app: Any = None) -> bool:
    """Put ``GET /datastore/image`` in front of MONAI Label's: it calls ``encode_ahead.opened`` with the
    image's file, then answers exactly as MONAI Label does. Returns False outside the server."""
    if fastapi_app is None:
        module = sys.modules.get("monailabel.app")
        if module is None:
            return False
        fastapi_app = module.app
    router = APIRouter()

    @router.get("/datastore/image", include_in_schema=False)
    async def download_image(
        image: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
    ) -> Any:
        answer = datastore_endpoints.download_image(image)  # its checks and errors, unchanged
        path = getattr(answer, "path", None)
        if path:
            encode_ahead.opened(str(path))
        return answer

    before = list(fastapi_app.router.routes)
    fastapi_app.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    added = fastapi_app.router.routes[len(before) :]
    fastapi_app.router.routes[:] = [*added, *before]  # first match wins: ours
    return True


def opened_sample(encode_ahead: EncodeAhead, sample: Any) -> None:
    """After ``next_sample`` (``{"id", "path", ...}``): Slicer opens the image at ``path`` (loads or downloads it)."""
    if isinstance(sample, dict) and sample.get("path"):
        encode_ahead.opened(str(sample["path"]))
