"""MONAI Label app serving sam_medical's SAM to 3D Slicer. Wiring only; the work is in ``lib/``.

Start it (binds only where ``--host`` says)::

    monailabel start_server --app monailabel_app --studies sample_volumes --conf model tiny \\
        --host 127.0.0.1 --port 8000

Tasks: ``sam_2d`` (deepgrow, 2D: a click -> that slice), ``sam_3d`` (deepgrow, 3D: a prompt -> the
object through the volume), ``sam_lora`` (train: LoRA on the final labels, hot-swapped when published).
Settings: ``--conf KEY VALUE`` (see ``lib/configs/sam.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from lib.configs.sam import SamAppConfig
from lib.infers.base import check_infer_request
from lib.infers.sam_2d import Sam2D
from lib.infers.sam_3d import Sam3D
from lib.served_model import ServedModel
from lib.trainers.sam_lora import SamLoraTrain
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


class MyApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.sam_config = SamAppConfig.from_conf(app_dir, conf)
        self.served = ServedModel(self.sam_config)  # built once, shared by sam_2d and sam_3d
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="sam_medical",
            description="Segment Anything for medical volumes (LoRA fine-tuning in the loop)",
            version="0.1.0",
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {"sam_2d": Sam2D(self.served), "sam_3d": Sam3D(self.served)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"sam_lora": SamLoraTrain(self.sam_config)}

    def on_init_complete(self) -> None:
        # only the server calls this (not the training subprocess): build the model now, so that a
        # missing checkpoint or an offline download is reported at start, not at the first click
        self.served.load()
        super().on_init_complete()

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        sessions = self.sessions()
        check_infer_request(
            request, self._infers, datastore or self.datastore(), [sessions.store_path] if sessions else []
        )
        return super().infer(request, datastore)
