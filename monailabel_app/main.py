"""MONAI Label app serving sam_medical's SAM to 3D Slicer. Wiring only; the work is in ``lib/``.

Start it (binds only where ``--host`` says)::

    monailabel start_server --app "$(sam-medical workspace --print app)" \\
        --studies "$(sam-medical workspace --print studies)" --conf model tiny --host 127.0.0.1 --port 8000

(the server writes into the app folder and the datastore it serves: the workspace is a working copy of
this app and of the sample volumes outside the repository).

Tasks: ``sam_2d`` (deepgrow, 2D: a click -> that slice), ``sam_3d`` (deepgrow, 3D: a prompt -> the
object through the volume), ``sam_lora`` (train on the final labels: fine-tunes the mask decoder and, with
``lora_rank`` > 0, LoRA adapters on the encoder's q and v; hot-swapped when published).
Settings: ``--conf KEY VALUE`` (see ``lib/settings.py``; the training options come from
``sam_medical.training.config``).
"""

from __future__ import annotations

import logging
from typing import Any

from lib.datastore import GuardedDatastore, refuse
from lib.infers.base import check_infer_request
from lib.infers.encode_ahead import EncodeAhead, install_download_hook, opened_sample
from lib.infers.sam_2d import Sam2D
from lib.infers.sam_3d import Sam3D
from lib.served_model import ServedModel
from lib.settings import SamAppConfig
from lib.trainers.sam_lora import SamLoraTrain
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from sam_medical.errors import UserInputError

logger = logging.getLogger(__name__)


class MyApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.sam_config = SamAppConfig.from_conf(app_dir, conf, studies)  # label names from the datastore
        for note in self.sam_config.labels_notes:
            logger.warning(f"label names: {note}")
        self.served = ServedModel(self.sam_config)  # built once, shared by sam_2d and sam_3d
        self.encode_ahead = EncodeAhead(self.served)  # an opened image is encoded in the background
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="sam_medical",
            description="Segment Anything for medical volumes (fine-tuning in the loop)",
            version="0.1.0",
        )

    def init_datastore(self) -> Datastore:
        """A local datastore that guards its files (``lib/datastore.py``); remote datastores as MONAI Label's."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return GuardedDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {"sam_2d": Sam2D(self.served), "sam_3d": Sam3D(self.served)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"sam_lora": SamLoraTrain(self.sam_config)}

    def on_init_complete(self) -> None:
        # only the server calls this (not the training subprocess): build the model now, so that a
        # missing checkpoint or an offline download is reported at start, not at the first click
        self.served.load()
        # imported here: the server's FastAPI routes; MONAI Label's training subprocess builds this app too
        # and never serves, so it does not load them
        from lib import http_guard

        http_guard.install()  # checked routes and 4xx answers in front of MONAI Label's endpoints
        install_download_hook(self.encode_ahead)  # Slicer downloading an image opens it
        super().on_init_complete()

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """Segment a datastore image (or the file/session image this request brought): nothing else."""
        uri = check_infer_request(request, self._infers, datastore or self.datastore())
        if uri is not None:  # an id: read the datastore's own file, never a path named like the id
            request = {**request, "image": uri}
        return super().infer(request, datastore)

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's next sample; Slicer opens the image it names, so its slices are encoded ahead."""
        sample = super().next_sample(request)
        opened_sample(self.encode_ahead, sample)
        return sample

    def check_train_request(self, model: str, params: dict[str, Any]) -> None:
        """Check a training request before MONAI Label schedules it (``lib/http_guard.py`` calls this).

        Raises:
            HTTPException: 404 for an unknown train task; 422 for an option it refuses.
        """
        task = self._trainers.get(model)
        if task is None:
            raise refuse(404, f"unknown train task {model!r}; available: {', '.join(self._trainers)}")
        check = getattr(task, "check_request", None)
        if check is not None:
            try:
                check(params)
            except UserInputError as exc:
                raise refuse(422, str(exc)) from None

    def train(self, request: dict[str, Any]) -> Any:
        """Run a train task. In MONAI Label's training subprocess, a refused run ends with one log line
        and exit code 2 (no traceback in ``GET /train/``); in the server (``run_sync``) it is a 422."""
        try:
            return super().train(request)
        except UserInputError as exc:
            if self._server_mode:
                raise
            logger.error(f"{request.get('model')}: {exc}")
            raise SystemExit(2) from None
