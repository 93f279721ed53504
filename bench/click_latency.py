"""Click latency of the MONAI Label app, end to end, through 3D Slicer's own client, per runtime.

For each model (``tiny`` and ``vit_b`` with random weights, ``medsam_lite`` with its real weights; input
256) and each runtime (``--runtimes torch,onnx``: fp32 PyTorch beside the exported runtime) this starts
the real ``monailabel start_server`` on 127.0.0.1 with a copy of ``monailabel_app`` and a temporary
datastore holding one synthetic 512x512x100 CT volume (int16 HU, with a label). The servers of one model
run side by side and every timed phase alternates between them (a rotating order, each click taken when
no server has a background encode in flight), so that the machine's changing load hits them alike.
Requests are built as Slicer builds them (``MONAILabel.py``: ``onClickDeepgrow`` /
``MONAILabelLogic.infer``); the prompt is a click for the SAM models and an ROI box around the organ for
``medsam_lite`` (trained with boxes only). Measured:

* ``server_start_s``, and ``runtime``: what serves, the export's digest and what making it cost
  (``export_s``: export + verification against PyTorch, cold cache; ``cache_load_s``: loading it again);
* ``first_click_s``: the first request on the volume (load + window + encode + decode + write + transfer);
* ``new_slice_p50_s`` / ``new_slice_max_s``: requests on ``--new-slices`` slices never seen before
  (encode + decode; what "a first click on a new slice" costs);
* ``repeat_p50_s`` / ``repeat_p95_s``: 20 more requests on one slice (decoder only when cached), and
  ``all_repeats_cached``;
* ``neighbour_click_s``: a request on slice ``k+1`` once the background prefetch has encoded it;
* ``walk``: a user stepping slice by slice with ``--think`` seconds between requests: how often the
  slice's embedding was ready (prefetched), and the latency p50/max;
* ``sam_3d_s``: one ``sam_3d`` request with the IoU stop off (``min_iou`` -1, the lowest accepted), so the walk covers the
  organ (80 of the 100 slices), with its slice count and its cached/computed embeddings;
* ``load_average``: the machine's load while the row was measured (other work slows every number);
* with ``--during-training``: 20 requests sent 4 at a time while a ``sam_lora`` training run is in
  progress (``during_training``), then the run is stopped.

It prints one JSON line per model and runtime, then, with two runtimes or more, one ``compare`` line per
model: each figure of the first runtime (the baseline) divided by the same figure of every other one.
Usage::

    .venv/bin/python bench/click_latency.py [--models tiny,vit_b,medsam_lite] [--runtimes torch,onnx]
        [--during-training] [--keep DIR]
    # on a GPU: fp32 beside fp16/bf16 autocast (prefetch and propagation then encode 8 slices a batch)
    .venv/bin/python bench/click_latency.py --models medsam_lite --device cuda --runtimes torch,torch:fp16,torch:bf16
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


def write_datastore(root: Path) -> np.ndarray:
    """Write ``root/ct.nii.gz`` and ``root/labels/final/ct.nii.gz``; return the label ``(I, J, K)``."""
    from sam_medical.volume.io import Volume, write_volume

    image, label = synthetic_ct()
    ref = Volume(image, SPACING, (-190.0, -190.0, -400.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_volume(image, ref, root / "ct.nii.gz")
    write_volume(label, ref, root / "labels" / "final" / "ct.nii.gz")
    return label


#: The organ's centre voxel ``(i, j)`` on every slice, and the slice clicked first.
CENTRE = (200, 200)
K0 = SHAPE[2] // 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: Path, studies: Path, conf: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
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
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server {conf} exited:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/info/", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"server {conf} did not start:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the process group this script started
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Server:
    """One running server of one model and runtime, with Slicer's client and its prompt kind."""

    def __init__(self, model: str, runtime: str, proc: subprocess.Popen, url: str, client, label: np.ndarray):
        self.model, self.runtime, self.proc, self.url, self.client = model, runtime, proc, url, client
        self.label = label
        self.box_prompts = model == "medsam_lite"  # trained with boxes only: Slicer's ROI

    def sam(self) -> dict:
        return self.client.info()["models"]["sam_2d"]["sam"]

    def idle(self, timeout: float = 600.0) -> None:
        """Wait until no background encode is queued or running."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            prefetch = self.sam().get("prefetch") or {}
            if not prefetch.get("in_flight"):
                return
            time.sleep(0.2)

    def params(self, k: int, jitter: int = 0, is_3d: bool = False, **config) -> dict:
        """A request as the plugin builds it: a click at the organ's centre, or an ROI box around it."""
        i, j = CENTRE
        params = {"label": "object", "foreground": [], "background": [], "adapter": "current", **config}
        if self.box_prompts:
            ii, jj = np.nonzero(self.label[:, :, k])
            params["roi"] = [
                int(ii.min()) - 3 + jitter % 3,
                int(ii.max()) + 3,
                int(jj.min()) - 3,
                int(jj.max()) + 3 - jitter % 2,
                k,
                k,
            ]
        else:
            params["foreground"] = [[i + jitter % 7 - 3, j + jitter % 5 - 2, k]]
        if not is_3d:
            params["slice"] = k
        params["result_extension"] = ".nrrd"
        params["result_dtype"] = "uint8"
        return params

    def request(self, k: int, jitter: int = 0, is_3d: bool = False, **config) -> tuple[float, dict]:
        """``(seconds end to end, answer)`` of one request on slice ``k``."""
        t0 = time.perf_counter()
        result_file, out = self.client.infer(
            "sam_3d" if is_3d else "sam_2d", "ct", self.params(k, jitter, is_3d, **config)
        )
        seconds = time.perf_counter() - t0
        os.unlink(result_file)
        return seconds, out


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4)


def interleaved(servers: list[Server], fn, rounds: int, settle: bool = True) -> dict[str, list]:
    """``fn(server, round)`` for every round, the servers in a rotating order; ``settle``: each call
    waits until no server has a background encode in flight. Returns the results per runtime."""
    out: dict[str, list] = {s.runtime: [] for s in servers}
    for r in range(rounds):
        for s in servers[r % len(servers) :] + servers[: r % len(servers)]:
            if settle:
                for other in servers:
                    other.idle()
            out[s.runtime].append(fn(s, r))
    return out


def new_slices(count: int) -> list[int]:
    """Slices inside the organ (10..89), 4 apart from each other and from ``K0``'s neighbourhood."""
    ks = [k for k in range(14, 88, 5) if abs(k - K0) > 4]
    step = max(1, len(ks) // max(1, count))
    return ks[::step][:count]


def walk(server: Server, start: int, steps: int, think: float) -> dict:
    """A user stepping up slice by slice, ``think`` seconds between requests."""
    states, times = [], []
    for n in range(steps):
        seconds, out = server.request(start + n)
        states.append(out["embedding"])
        times.append(seconds)
        time.sleep(think)
    return {
        "steps": steps,
        "think_s": think,
        "ready": round(sum(s == "cached" for s in states[1:]) / max(1, steps - 1), 3),
        "p50_s": pct(times[1:], 50),
        "max_s": round(max(times[1:]), 4),
    }


def bench_model(model: str, runtimes: list[str], work: Path, label: np.ndarray, args) -> list[dict]:
    module = slicer_client_module()
    servers: list[Server] = []
    starts: dict[str, float] = {}
    try:
        for variant in runtimes:
            runtime, _, precision = variant.partition(":")
            app = work / f"app_{model}_{variant.replace(':', '_')}"
            shutil.copytree(
                REPO / "monailabel_app",
                app,
                ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"),
            )
            conf = {
                "model": model,
                "use_pretrained_model": "true" if model == "medsam_lite" else "false",
                "image_size": "256",
                "prefetch_slices": str(args.prefetch),
                "torch_threads": str(args.torch_threads),
                "runtime": runtime,
                "precision": precision or "fp32",
                "device": args.device,
                "export_dir": str(work / f"exports_{model}_{runtime}"),  # cold: the export is measured
            }
            t0 = time.perf_counter()
            proc, url = start_server(app, work / "studies", conf, app / "server.log")
            starts[variant] = round(time.perf_counter() - t0, 2)
            servers.append(
                Server(model, variant, proc, url, module.MONAILabelClient(url, tmpdir=str(work)), label)
            )
        loads = [os.getloadavg()]
        first = interleaved(servers, lambda s, r: s.request(K0), 1)
        fresh = new_slices(args.new_slices)
        new = interleaved(servers, lambda s, r: s.request(fresh[r]), len(fresh))
        loads.append(os.getloadavg())
        for s in servers:
            s.idle()
        repeats = interleaved(servers, lambda s, r: s.request(K0, jitter=r + 1), 20, settle=False)
        neighbour = interleaved(servers, lambda s, r: s.request(K0 + 1), 1)
        loads.append(os.getloadavg())
        walks = {}
        walk_start = max([*fresh, K0]) + 5  # slices no earlier request (or its prefetch) touched
        if walk_start + args.walk_steps > 89:
            raise SystemExit(
                "error: --new-slices and --walk-steps leave no untouched slices inside the organ"
            )
        for s in servers:  # one at a time: the other servers stay idle while a user "thinks"
            for other in servers:
                other.idle()
            walks[s.runtime] = walk(s, walk_start, args.walk_steps, args.think)
        loads.append(os.getloadavg())
        sam3d = interleaved(servers, lambda s, r: s.request(K0, is_3d=True, min_iou=-1.0), 1)
        loads.append(os.getloadavg())
        rows = []
        for s in servers:
            rt = s.runtime
            info = s.sam()
            runtime = info.get("runtime") or {}
            first_s, first_out = first[rt][0]
            neighbour_s, neighbour_out = neighbour[rt][0]
            times = [t for t, _ in repeats[rt]]
            new_times = [t for t, _ in new[rt]]
            walk3d_s, walk3d = sam3d[rt][0]
            row = {
                "model": model,
                "runtime": rt,
                "serving": runtime.get("serving"),
                "prompt": "roi box" if s.box_prompts else "click",
                "weights": "LiteMedSAM (real)" if model == "medsam_lite" else "random",
                "volume": list(SHAPE),
                "device": info.get("device"),
                "torch_threads": args.torch_threads or "auto (half the cores)",
                "load_average": [[round(x, 2) for x in la] for la in loads],
                "server_start_s": starts[rt],
                "export_digest": runtime.get("export_digest"),
                "export_s": runtime.get("seconds") if runtime.get("source") == "export" else None,
                "export_timings": runtime.get("timings"),
                "first_click_s": round(first_s, 4),
                "first_click_server": first_out["latency"],
                "new_slice_p50_s": pct(new_times, 50),
                "new_slice_max_s": round(max(new_times), 4),
                "new_slices": len(new_times),
                "new_slice_encode_p50_s": pct([o["latency"]["encode"] for _, o in new[rt]], 50),
                "repeat_p50_s": pct(times, 50),
                "repeat_p95_s": pct(times, 95),
                "repeat_max_s": round(max(times), 4),
                "all_repeats_cached": all(o["embedding"] == "cached" for _, o in repeats[rt]),
                "repeat_decode_p50_s": pct([o["latency"]["decode"] for _, o in repeats[rt]], 50),
                "neighbour_click_s": round(neighbour_s, 4),
                "neighbour_embedding": neighbour_out["embedding"],
                "walk": walks[rt],
                "sam_3d_s": round(walk3d_s, 3),
                "sam_3d_slices": len(walk3d["slices"]),
                "sam_3d_embeddings": walk3d["embeddings"],
                "sam_3d_stopped": walk3d["stopped"],
            }
            if args.during_training:
                row["during_training"] = clicks_during_training(s)
            row["cache_load_s"] = cache_load_seconds(model, work, rt.partition(":")[0])
            rows.append(row)
        return rows
    finally:
        for s in servers:
            stop_server(s.proc)


def cache_load_seconds(model: str, work: Path, runtime: str) -> float | None:
    """Seconds to load the export the server made from its cache (what a restart costs), in process."""
    if runtime not in ("onnx", "openvino"):
        return None
    from sam_medical.inference.export_cache import load_or_export
    from sam_medical.model.build import build_sam

    sam, info = build_sam(model, image_size=256, random_weights=model != "medsam_lite")
    engine = load_or_export(sam, work / f"exports_{model}_{runtime}", info, backend=runtime, threads=1)
    return engine.manifest["load_s"] if engine.manifest["source"] == "cache" else None


COMPARED = (
    "first_click_s",
    "new_slice_p50_s",
    "repeat_p50_s",
    "repeat_p95_s",
    "neighbour_click_s",
    "sam_3d_s",
)


def compare(rows: list[dict]) -> dict:
    """The baseline's figures (the first runtime) divided by every other runtime's: speed-up factors."""
    base = rows[0]
    out = {"compare": base["model"], "baseline": base["runtime"]}
    for row in rows[1:]:
        out[row["runtime"]] = {
            key.removesuffix("_s"): round(base[key] / row[key], 2) for key in COMPARED if row.get(key)
        }
    return out


def clicks_during_training(server: Server) -> dict:
    """Start a training run, wait until it trains, send 20 requests 4 at a time, stop the run."""
    client = server.client
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

    def one(d: int) -> tuple[bool, float]:
        try:
            seconds, _ = server.request(K0 - 2 + d % 5, jitter=d)
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
        "--runtimes",
        default="torch,onnx",
        help="server runtimes side by side, RUNTIME[:PRECISION] (torch:fp16 on CUDA); the first is the baseline",
    )
    parser.add_argument("--device", default="auto", help="server's --conf device (cuda: the GPU figures)")
    parser.add_argument(
        "--during-training", action="store_true", help="also click while a training run is in progress"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="server's --conf torch_threads (0: auto)"
    )
    parser.add_argument("--prefetch", type=int, default=4, help="server's --conf prefetch_slices")
    parser.add_argument(
        "--new-slices", type=int, default=8, help="slices never seen before, clicked once each"
    )
    parser.add_argument("--walk-steps", type=int, default=8, help="slices a simulated user steps through")
    parser.add_argument(
        "--think", type=float, default=1.5, help="seconds the simulated user waits between slices"
    )
    parser.add_argument(
        "--keep", default=None, help="work folder to keep (default: a temporary one, removed)"
    )
    args = parser.parse_args()
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="click_latency_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        studies = work / "studies"
        (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
        label = write_datastore(studies)
        print(
            json.dumps(
                {
                    "command": "bench/click_latency.py " + " ".join(sys.argv[1:]),
                    "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(),
                }
            ),
            flush=True,
        )
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            rows = bench_model(model, runtimes, work, label, args)
            for row in rows:
                print(json.dumps(row), flush=True)
            if len(rows) > 1:
                print(json.dumps(compare(rows)), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
