"""Checks in front of MONAI Label's endpoints, and a 4xx JSON answer instead of a 500 for bad requests.

MONAI Label (0.8.5) builds its FastAPI ``app`` in ``monailabel.app`` and parses requests inside its
endpoint functions, where a malformed form field (``params={not json``, ``params=[1,2,3]``), an empty
``?image=``, or a label for an unknown image becomes an HTTP 500. :func:`install` (called once by the
app in the server process, from ``on_init_complete``) adds, in front of MONAI Label's own routes, routes
with the same paths and parameters that check a request and then call MONAI Label's endpoint function:

* ``POST /infer/{model}``: ``params`` must be a JSON object that does not set ``image``, ``model``,
  ``session`` or where results are saved; the image is a datastore id, the file the client uploads with
  this request, or the image of the client's own session (:data:`lib.infers.base.TRUSTED_IMAGE` tells
  the app which path this request may read; nothing else is ever opened);
* ``POST /train/{model}`` (and ``POST /train/``): the options are checked by the app
  (``check_train_request``) before the run is accepted, so a bad option is a 422 at once;
* ``GET /train/``: the task records without stack frames or source lines in their ``details``;
* ``PUT /datastore/image``, ``PUT /datastore/label`` and the ``info`` updates: form fields must be JSON
  objects, ids and tags plain names, uploads volume files (the datastore checks the rest:
  :mod:`lib.datastore`);
* ``PUT /session/``: archives are not unpacked (a tar file may write outside the session folder).

It also adds exception handlers: a user's mistake (``UserInputError``), invalid JSON and MONAI Label's
"not found" errors become 4xx JSON answers; anything else a 500 JSON answer without a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.endpoints import datastore as datastore_endpoints
from monailabel.endpoints import infer as infer_endpoints
from monailabel.endpoints import session as session_endpoints
from monailabel.endpoints import train as train_endpoints
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import remove_file

from sam_medical.errors import UserInputError, one_line

from .datastore import check_name, refuse, volume_extension
from .infers.base import TRUSTED_IMAGE

logger = logging.getLogger(__name__)

#: Request keys a client may not set through ``params``: they choose what is read or where it is saved.
RESERVED_INFER_KEYS = frozenset({"image", "model", "session", "save_label", "label_tag"})
MAX_FILENAME = 255

router = APIRouter()
user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
annotator_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
admin_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))


def json_object(text: str | None, field: str) -> dict[str, Any]:
    """The form field ``field`` parsed as a JSON object (empty: ``{}``), else a 422 saying what it is."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise refuse(422, f"{field} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise refuse(422, f"{field} must be a JSON object {{...}}, got {type(value).__name__}")
    return value


def upload_extension(upload: UploadFile, what: str) -> str:
    """The volume extension of an uploaded file's name (checked before the upload is copied anywhere)."""
    name = upload.filename or ""
    if len(name) > MAX_FILENAME:
        raise refuse(422, f"{what} file name is longer than {MAX_FILENAME} characters")
    return volume_extension(name, what)


# -- infer ---------------------------------------------------------------------------------------


@router.post("/infer/{model}", include_in_schema=False)
async def infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: infer_endpoints.ResultType | None = None,
    user: User = user_role,
) -> Any:
    """``POST /infer/{model}``, checked (see the module docstring), then MONAI Label's ``run_inference``."""
    p = json_object(params, "params")
    reserved = sorted(RESERVED_INFER_KEYS & set(p))
    if reserved:
        raise refuse(422, f"params may not set {', '.join(reserved)}: the image is given by ?image=ID")
    if label is not None:
        raise refuse(422, "these models take no label file; send points or an ROI in params")
    trusted = None
    if file is not None:  # the client's own volume, for this request only
        ext = upload_extension(file, "image")
        with tempfile.NamedTemporaryFile(prefix="sam_medical_upload_", suffix=ext, delete=False) as out:
            shutil.copyfileobj(file.file, out)
        background_tasks.add_task(remove_file, out.name)
        image = trusted = out.name
        session_id = ""  # the uploaded file is the image (as the Slicer client never sends both)
    elif session_id:
        check_name(session_id, "session id")
        sessions = app_instance().sessions()
        session = sessions.get_session(session_id) if sessions else None
        if not session:
            raise refuse(404, f"session {session_id!r} does not exist (it may have expired)")
        trusted = session.image
    elif not image:
        raise refuse(422, "no image: give a datastore image id (?image=ID)")
    token = TRUSTED_IMAGE.set(trusted)
    try:
        return infer_endpoints.run_inference(
            background_tasks, model, image, session_id, json.dumps(p), None, None, output
        )
    finally:
        TRUSTED_IMAGE.reset(token)


# -- train ---------------------------------------------------------------------------------------


def check_train(model: str, params: dict[str, Any]) -> None:
    """Let the app check a training request before it is scheduled (404 unknown task, 422 bad option)."""
    check = getattr(app_instance(), "check_train_request", None)
    if check is not None:
        check(model, params)


@router.post("/train/{model}", include_in_schema=False)
async def train_model(
    model: str,
    params: dict | None = None,
    run_sync: bool | None = False,
    enqueue: bool | None = False,
    user: User = admin_role,
) -> Any:
    """``POST /train/{model}``: options checked first, then MONAI Label's ``run_model``."""
    check_train(model, params or {})
    return train_endpoints.run_model(model, params, run_sync, enqueue)


@router.post("/train/", include_in_schema=False)
async def train_all(
    params: dict | None = None, run_sync: bool | None = False, user: User = admin_role
) -> Any:
    """``POST /train/`` (every train task): each task's options checked first, then MONAI Label's ``run``."""
    params = params or {}
    trainers = app_instance().info().get("trainers", {})
    for model in trainers:
        own = params.get(model) if isinstance(params.get(model), dict) else {}
        check_train(model, {**own, **{k: v for k, v in params.items() if k not in trainers}})
    return train_endpoints.run(params, run_sync)


#: Lines of a Python traceback: the header, ``File "...", line N`` frames, source lines and markers.
_TRACEBACK_LINE = re.compile(
    r"^(\s|Traceback \(most recent call last\)|During handling of the above exception|"
    r"The above exception was the direct cause)"
)
#: The logger's ``(module:lineno)`` location in MONAI Label's log format.
_LOG_LOCATION = re.compile(r"\(([\w.]+):\d+\) - ")


def clean_details(lines: Any) -> list[str]:
    """A task's output lines without traceback frames, source lines or source line numbers."""
    out = []
    for line in lines or []:
        text = str(line)
        if not text.strip() or _TRACEBACK_LINE.match(text):
            continue
        out.append(_LOG_LOCATION.sub(r"(\1) - ", text))
    return out


def clean_task(task: Any) -> Any:
    """A copy of a task record (or a list of them) with :func:`clean_details` applied."""
    if isinstance(task, list):
        return [clean_task(t) for t in task]
    if isinstance(task, dict) and "details" in task:
        return {**task, "details": clean_details(task["details"])}
    return task


@router.get("/train/", include_in_schema=False)
async def train_status(all: bool = False, check_if_running: bool = False, user: User = user_role) -> Any:
    """``GET /train/``: MONAI Label's task records, their output without stack frames."""
    return clean_task(train_endpoints.status(all, check_if_running))


# -- datastore -----------------------------------------------------------------------------------


@router.put("/datastore/", include_in_schema=False)
@router.put("/datastore/image", include_in_schema=False)
async def add_image(
    background_tasks: BackgroundTasks,
    image: str | None = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = annotator_role,
) -> Any:
    """``PUT /datastore/image``: fields checked, then MONAI Label's ``add_image`` (datastore checks)."""
    p = json_object(params, "params")
    upload_extension(file, "image")
    if image:
        check_name(image, "image id")
    return datastore_endpoints.add_image(background_tasks, image, json.dumps(p), file, user.username)


@router.put("/datastore/label", include_in_schema=False)
async def save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = "final",
    label: UploadFile = File(...),
    user: User = annotator_role,
) -> Any:
    """``PUT /datastore/label``: fields checked, then MONAI Label's ``save_label`` (datastore checks)."""
    p = json_object(params, "params")
    check_name(image, "image id")
    check_name(tag or "final", "label tag")
    upload_extension(label, "label")
    return datastore_endpoints.save_label(background_tasks, image, json.dumps(p), tag, label, user.username)


@router.put("/datastore/image/info", include_in_schema=False)
async def update_image_info(image: str, info: str = Form("{}"), user: User = annotator_role) -> Any:
    return datastore_endpoints.update_image_info(image, json.dumps(json_object(info, "info")), user.username)


@router.put("/datastore/label/info", include_in_schema=False)
async def update_label_info(label: str, tag: str, info: str = Form("{}"), user: User = annotator_role) -> Any:
    info = json.dumps(json_object(info, "info"))
    return datastore_endpoints.update_label_info(label, tag, info, user.username)


@router.put("/datastore/updatelabelinfo", include_in_schema=False)
async def update_label_info_old(
    label: str, tag: str, params: str = Form("{}"), user: User = annotator_role
) -> Any:
    info = json.dumps(json_object(params, "params"))
    return datastore_endpoints.update_label_info(label, tag, info, user.username)


# -- sessions ------------------------------------------------------------------------------------


@router.put("/session/", include_in_schema=False)
async def create_session(
    background_tasks: BackgroundTasks,
    uncompress: bool = False,
    expiry: int = 0,
    files: list[UploadFile] = File(...),
    user: User = user_role,
) -> Any:
    """``PUT /session/``: no archives (unpacking a tar file can write outside the session folder)."""
    if uncompress:
        raise refuse(422, "archives are not unpacked by this server: upload the volume file itself")
    return session_endpoints.create_session(background_tasks, uncompress, expiry, files)


# -- exception handlers --------------------------------------------------------------------------


async def user_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": one_line(str(exc))}, status_code=422)


async def invalid_json(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"the request holds invalid JSON: {one_line(str(exc))}"}, status_code=422)


async def monailabel_error(request: Request, exc: Exception) -> JSONResponse:
    msg = one_line(str(getattr(exc, "msg", exc)))
    if isinstance(exc, ImageNotFoundException | LabelNotFoundException):
        return JSONResponse({"detail": msg}, status_code=404)
    if getattr(exc, "error", None) == MONAILabelError.INVALID_INPUT:
        return JSONResponse({"detail": msg}, status_code=422)
    logger.error(f"MONAI Label error on {request.method} {request.url.path}: {msg}")
    return JSONResponse({"detail": msg}, status_code=500)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Last resort (a bug): a JSON 500 without traceback; the traceback goes to the server log."""
    logger.exception(f"internal error on {request.method} {request.url.path}", exc_info=exc)
    return JSONResponse(
        {"detail": f"internal error ({type(exc).__name__}); the server log has the details"}, status_code=500
    )


HANDLERS: tuple[tuple[type[BaseException], Any], ...] = (
    (UserInputError, user_error),
    (json.JSONDecodeError, invalid_json),
    (MONAILabelException, monailabel_error),
    (Exception, internal_error),
)


def install(fastapi_app: Any = None) -> bool:
    """Put the checked routes in front of MONAI Label's and register the exception handlers.

    ``fastapi_app`` defaults to ``monailabel.app.app`` (the server's). Returns False (and changes
    nothing) outside the server, where that module is not loaded, or when already installed.
    """
    if fastapi_app is None:
        module = sys.modules.get("monailabel.app")
        if module is None:
            return False
        fastapi_app = module.app
    if getattr(fastapi_app.state, "sam_medical_guard", False):
        return False
    before = list(fastapi_app.router.routes)
    fastapi_app.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    added = fastapi_app.router.routes[len(before) :]
    fastapi_app.router.routes[:] = [*added, *before]  # first match wins: ours
    for exc_type, handler in HANDLERS:
        fastapi_app.add_exception_handler(exc_type, handler)
    fastapi_app.middleware_stack = None  # rebuilt with the handlers at the next request
    fastapi_app.state.sam_medical_guard = True
    logger.info(f"sam_medical: checked routes installed in front of MONAI Label's ({len(added)} routes)")
    return True
