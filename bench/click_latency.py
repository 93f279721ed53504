"""Click latency of the MONAI Label app, end to end, through 3D Slicer's own client.

For each model (default ``tiny`` and ``vit_b``, random weights, input 256) this starts the real
``monailabel start_server`` on 127.0.0.1 with a copy of ``monailabel_app`` and a temporary datastore
holding one synthetic 512x512x100 CT volume (int16 HU, with a label), then measures, as Slicer sends
them (``MONAILabel.py``: ``onClickDeepgrow`` / ``MONAILabelLogic.infer``):

* ``first_click_s``: the first click on the volume (load + window + encode + decode + write + transfer);
* ``repeat_p50_s`` / ``repeat_p95_s``: 20 more clicks on the same slice (decoder only when cached),
  and ``all_repeats_cached``: whether every one of them reported ``embedding: "cached"``;
* ``neighbour_click_s``: a click on slice ``k+1`` once the background prefetch has encoded it;
* ``sam_3d_s``: one ``sam_3d`` request (propagation) from a click, and ``sam_3d_no_iou_stop_s`` the same
  with ``min_iou`` off (random weights predict meaningless IoUs that stop the walk at once);
* ``load_average``: the machine's load when the row was measured (other work slows every number);
* with ``--during-training``: 20 clicks sent 4 at a time while a ``sam_lora`` training run is in
  progress (``during_training``: successes, p50/p95), then the run is stopped.

It prints one JSON line per model. Usage::

    .venv/bin/python bench/click_latency.py [--models tiny,vit_b] [--during-training] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPE = (512, 512, 100)
SPACING = (0.75, 0.75, 2.5)


def slicer_client_module():
    """The Slicer plugin's ``MONAILabelLib/client.py`` as installed with monailabel."""
    import monailabel

    for base in (Path(sys.prefix) / "monailabel", Path(monailabel.__file__).parent):
        path = base / "plugins" / "slicer" / "MONAILabel" / "MONAILabelLib" / "client.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("slicer_monailabel_client", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise SystemExit("the Slicer plugin of monailabel is not installed")


def synthetic_ct(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(image int16 HU, label uint8)``, both ``(I, J, K)``: a body ellipse with fat, muscle, a spine
    and a liver-like organ (label 1) whose cross-section changes smoothly with ``k``; noise 12 HU."""
    rng = np.random.default_rng(seed)
    i_size, j_size, k_size = SHAPE
    ii, jj = np.meshgrid(
        np.arange(i_size, dtype=np.float32), np.arange(j_size, dtype=np.float32), indexing="ij"
    )
    image = np.empty(SHAPE, np.int16)
    label = np.zeros(SHAPE, np.uint8)
    for k in range(k_size):
        t = k / (k_size - 1)
        sl = np.full((i_size, j_size), -1000.0, np.float32)
        body = ((ii - 256) / 200) ** 2 + ((jj - 256) / 160) ** 2
        sl[body < 1.0] = -100.0
        sl[body < 0.8] = 45.0
        sl[((ii - 256) / 170) ** 2 + ((jj - 256) / 130) ** 2 < 1.0] = -80.0
        sl[((ii - 256) / 22) ** 2 + ((jj - 370) / 22) ** 2 < 1.0] = 600.0  # vertebra
        r = 60 + 35 * np.sin(np.pi * t)
        organ = ((ii - 200) / (r * 1.2)) ** 2 + ((jj - 200) / r) ** 2 < 1.0
        if 0.1 < t < 0.9:
            sl[organ] = 60.0
            label[:, :, k][organ] = 1
        sl += rng.normal(0, 12, sl.shape).astype(np.float32)
        image[:, :, k] = np.clip(sl, -1024, 3000).astype(np.int16)
    return image, label


def write_datastore(root: Path) -> tuple[int, int, int]:
    """Write ``root/ct.nii.gz`` and ``root/labels/final/ct.nii.gz``; return a voxel inside the organ."""
    from sam_medical.volume import Volume, write_volume

    image, label = synthetic_ct()
    ref = Volume(image, SPACING, (-190.0, -190.0, -400.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_volume(image, ref, root / "ct.nii.gz")
    write_volume(label, ref, root / "labels" / "final" / "ct.nii.gz")
    return 200, 200, SHAPE[2] // 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    app: Path, studies: Path, model: str, log: Path, threads: int = 0
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        str(Path(sys.executable).parent / "monailabel"),
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(studies),
    ]
    conf = {"model": model, "use_pretrained_model": "false", "image_size": "256", "prefetch_slices": "4"}
    conf["torch_threads"] = str(threads)
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server for {model} exited:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/info/", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    raise SystemExit(f"server for {model} did not start:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the process group this script started
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def click(
    client, model: str, point: tuple[int, int, int], is_3d: bool = False, **config
) -> tuple[float, dict]:
    """One request as the plugin builds it (``config``: the model's options table); returns
    ``(seconds end to end, answer params)``."""
    i, j, k = point
    params = {"label": "object", "foreground": [[i, j, k]], "background": [], "adapter": "current", **config}
    if not is_3d:
        params["slice"] = k
    params["result_extension"] = ".nrrd"
    params["result_dtype"] = "uint8"
    t0 = time.perf_counter()
    result_file, out = client.infer(model, "ct", params)
    seconds = time.perf_counter() - t0
    os.unlink(result_file)
    return seconds, out


def wait_for_prefetch(client, entries: int, timeout: float = 120.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        stats = client.info()["models"]["sam_2d"]["sam"]["embedding_cache"]
        if stats["entries"] >= entries:
            break
        time.sleep(0.2)
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4)


def bench_model(
    model: str, work: Path, point: tuple[int, int, int], during_training: bool, threads: int = 0
) -> dict:
    module = slicer_client_module()
    app = work / f"app_{model}"
    shutil.copytree(
        REPO / "monailabel_app", app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__")
    )
    t0 = time.perf_counter()
    proc, url = start_server(app, work / "studies", model, work / f"server_{model}.log", threads)
    start_s = time.perf_counter() - t0
    try:
        client = module.MONAILabelClient(url, tmpdir=str(work))
        i, j, k = point
        first_s, first = click(client, "sam_2d", point)
        repeats = [click(client, "sam_2d", (i + d % 7 - 3, j + d % 5 - 2, k)) for d in range(20)]
        times = [t for t, _ in repeats]
        cached = [out["embedding"] == "cached" for _, out in repeats]
        waited = wait_for_prefetch(client, entries=5)
        neighbour_s, neighbour = click(client, "sam_2d", (i, j, k + 1))
        sam3d_s, sam3d = click(client, "sam_3d", (i, j, k), is_3d=True)
        # random weights predict meaningless IoUs: without the IoU stop the walk costs what a real one does
        walk_s, walk = click(client, "sam_3d", (i, j, k), is_3d=True, min_iou=-1e9)
        row = {
            "model": model,
            "image_size": 256,
            "weights": "random",
            "volume": list(SHAPE),
            "torch_threads": threads or "auto (half the cores)",
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "server_start_s": round(start_s, 2),
            "first_click_s": round(first_s, 4),
            "first_click_server": first["latency"],
            "repeat_p50_s": pct(times, 50),
            "repeat_p95_s": pct(times, 95),
            "repeat_max_s": round(max(times), 4),
            "all_repeats_cached": all(cached),
            "speedup_first_over_p50": round(first_s / pct(times, 50), 1),
            "prefetch_wait_s": round(waited, 2),
            "neighbour_click_s": round(neighbour_s, 4),
            "neighbour_embedding": neighbour["embedding"],
            "sam_3d_s": round(sam3d_s, 3),
            "sam_3d_slices": len(sam3d["slices"]),
            "sam_3d_embeddings": sam3d["embeddings"],
            "sam_3d_stopped": sam3d["stopped"],
            "sam_3d_no_iou_stop_s": round(walk_s, 3),
            "sam_3d_no_iou_stop_slices": len(walk["slices"]),
            "sam_3d_no_iou_stop_embeddings": walk["embeddings"],
        }
        if during_training:
            row["during_training"] = clicks_during_training(client, point)
        return row
    finally:
        stop_server(proc)


def clicks_during_training(client, point: tuple[int, int, int]) -> dict:
    """Start a training run, wait until it trains, send 20 clicks 4 at a time, stop the run."""
    client.train_start("sam_lora", {"epochs": 1, "max_steps": 1000, "val_max_items": 4, "batch_size": 2})
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 300:
        stats = client.info()["train_stats"].get("sam_lora", {})
        if stats.get("status") == "RUNNING" and stats.get("stage") == "training":
            break
        if stats.get("status") in ("ERROR", "DONE", "STOPPED") and not client.train_status(
            check_if_running=True
        ):
            return {"error": f"training ended before the clicks: {stats.get('status')} {stats.get('error')}"}
        time.sleep(0.5)
    i, j, k = point

    def one(d: int) -> tuple[bool, float]:
        try:
            seconds, out = click(client, "sam_2d", (i + d % 5, j, k - 2 + d % 5))
            return True, seconds
        except Exception:  # noqa: BLE001 - counted as a failure
            return False, 0.0

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(20)))
    running = client.train_status(check_if_running=True)
    stage = client.info()["train_stats"].get("sam_lora", {}).get("stage")
    client.train_stop()
    ok = [s for good, s in results if good]
    return {
        "clicks": len(results),
        "succeeded": len(ok),
        "p50_s": pct(ok, 50) if ok else None,
        "p95_s": pct(ok, 95) if ok else None,
        "training_still_running_after": bool(running),
        "training_stage": stage,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,vit_b")
    parser.add_argument(
        "--during-training", action="store_true", help="also click while a training run is in progress"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="server's --conf torch_threads (0: auto)"
    )
    parser.add_argument(
        "--keep", default=None, help="work folder to keep (default: a temporary one, removed)"
    )
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="click_latency_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        studies = work / "studies"
        (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
        point = write_datastore(studies)
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            row = bench_model(model, work, point, args.during_training, args.torch_threads)
            print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
