"""Test harness: the real ``monailabel start_server`` driven by 3D Slicer's own client.

Requests are built exactly as the Slicer plugin builds them (``MONAILabel.py``: ``onClickDeepgrow`` and
``MONAILabelLogic.infer``): ``label``, ``foreground``/``background`` as ``[i, j, k]`` lists, ``roi``,
``slice`` for 2D models, the model's ``config`` values (first element of lists),
``result_extension=".nrrd"``, ``result_dtype="uint8"``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 180


def plugin_dir() -> Path:
    """The Slicer plugin as installed with monailabel (``<venv>/monailabel/plugins/slicer/MONAILabel``)."""
    import monailabel

    candidates = [
        Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel",
        Path(monailabel.__file__).parent / "plugins" / "slicer" / "MONAILabel",
    ]
    for c in candidates:
        if (c / "MONAILabelLib" / "client.py").is_file():
            return c
    pytest.skip(f"the Slicer plugin of monailabel is not installed (looked in {candidates})")


def load_slicer_client():
    """Slicer's own client module (pure Python: stdlib + requests)."""
    path = plugin_dir() / "MONAILabelLib" / "client.py"
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_config(info: dict, model: str) -> dict:
    """``MONAILabelWidget.getParamsFromConfig``: the model's config, lists reduced to their first item."""
    cfg = info["models"][model].get("config", {})
    return {k: v[0] if isinstance(v, list) else v for k, v in cfg.items()}


def slicer_infer(srv, model: str, image: str, *, fg=(), bg=(), roi=None, slice_index=None, label="object"):
    """``onClickDeepgrow`` + ``MONAILabelLogic.infer``; returns ``(label array (I, J, K), sitk image, params)``."""
    import SimpleITK as sitk

    client = srv["client"]
    info = client.info()
    is_3d = info["models"][model].get("dimension", 3) != 2
    params = {"label": label, "foreground": [list(p) for p in fg], "background": [list(p) for p in bg]}
    params["label"] = label
    params.update(model_config(info, model))
    if roi:
        params["roi"] = list(roi)
    if not is_3d:
        params["slice"] = slice_index
    params["result_extension"] = ".nrrd"
    params["result_dtype"] = "uint8"
    result_file, out = client.infer(model, image, params)
    img = sitk.ReadImage(result_file)
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (I, J, K) as the plugin's import sees it
    os.unlink(result_file)
    return arr, img, out


def http_error(exc) -> tuple[int, dict]:
    m = re.match(r"Status: (\d+); Response: (.*)", exc.msg, re.S)
    assert m, exc.msg
    body = m.group(2)
    if body.startswith("b'") or body.startswith('b"'):
        body = body[2:-1]
    return int(m.group(1)), json.loads(body)


@contextlib.contextmanager
def running_server(
    tmp: Path, studies: Path, conf: dict[str, str], request, app: Path | None = None
) -> Iterator[dict]:
    """Start ``monailabel start_server`` on 127.0.0.1; yield url, client and paths.

    It serves ``app``, by default a copy of the repository's app made in ``tmp`` (the server writes into
    its app folder). ONNX exports go to the test session's ``export_cache`` unless ``conf`` names an
    ``export_dir``. The server runs in its own process group and is stopped at the end; its log is
    printed when a test of the calling module failed.
    """
    conf = {"export_dir": str(request.getfixturevalue("export_cache")), **conf}
    if app is None:
        app = tmp / "app"
        shutil.copytree(
            REPO / "monailabel_app", app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__")
        )
    port = free_port()
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # its `python` is ours
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    monailabel = Path(sys.executable).parent / "monailabel"
    cmd = [str(monailabel), "start_server", "--app", str(app), "--studies", str(studies)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log_path = tmp / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    failed_before = request.session.testsfailed
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(url + "/info/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(
                    f"server did not answer /info/ in {START_TIMEOUT} s:\n{log_path.read_text()[-5000:]}"
                )
            time.sleep(1)
        client_module = load_slicer_client()
        yield {
            "url": url,
            "module": client_module,
            "client": client_module.MONAILabelClient(url, tmpdir=str(tmp)),
            "studies": studies,
            "app": app,
            "tmp": tmp,
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # our own process group only (start_new_session)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if request.session.testsfailed > failed_before:
            print("----- server log (tail) -----\n" + log_path.read_text()[-15000:])
