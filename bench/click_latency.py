"""Click latency of the MONAI Label app end to end, through 3D Slicer's own client (issue 19). One JSON line.

The real ``monailabel start_server`` runs on 127.0.0.1 with a copy of ``monailabel_app`` and a temporary
datastore holding a synthetic 512x512x100 CT (int16 HU, a liver-like organ as label 1) and a copy of it
that is only opened. Requests are built as Slicer builds them (``MONAILabel.py``: ``onClickDeepgrow``):
an ROI box around the organ for ``medsam_lite`` (trained with boxes only), a click for the others
(``--prompt``). In one run, measured:

* ``torch_encoder_alone_s``: the plain fp32 PyTorch image encoder, no server, all cores (p50);
* with background encoding on (``prefetch_slices`` 4 and the whole volume ahead) and off
  (``prefetch_slices`` 0), one server after the other (a server's background work never slows the
  other's clicks):

  * ``first_click_s``: the first request on the volume (load, window, encode, decode, write);
  * ``far_3s_p50_s`` / ``far_12s_p50_s``: the first click on a far slice never encoded, 3 s and 12 s
    after a click elsewhere (``--trials`` each; slices from the volume's ends inwards, where encoding
    ahead from the centre arrives last; ``far_cached`` counts those that were ready anyway);
  * ``repeat_p50_s``: ``--repeats`` more clicks on one slice (the decoder only);
  * ``stages_far_p50`` / ``stages_repeat_p50``: each stage of the answer's ``latency`` (seconds, p50)
    and ``http``: the client's time less the server's ``total`` (HTTP, MONAI Label, transfer);

* ``ready``: on the server with background encoding, the copy is opened as Slicer opens a volume it
  does not hold (``GET /datastore/image``); after 5, 10 and 20 s of scrolling the share of its slices
  already encoded, and whether the first click on the centre slice (at 10 s) found it ready;
* with ``--decode-only``: only ``click_decode_ms_p50``, the decode stage (``latency.decode``, ms) of one
  foreground click on a cached slice, with the server's ``--conf`` (e.g. a click strategy).

Timings on a shared machine are noisy: measure on a quiet one. Usage::

    .venv/bin/python bench/click_latency.py [--model medsam_lite] [--trials 4] [--conf KEY VALUE ...]
    .venv/bin/python bench/click_latency.py --model medsam_lite --decode-only --conf multimask auto
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPE = (512, 512, 100)
SPACING = (0.75, 0.75, 2.5)


def slicer_client_module():
    """The Slicer plugin's ``MONAILabelLib/client.py`` as installed with monailabel (under the venv's root)."""
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
    """``root/ct.nii.gz`` with ``root/labels/final/ct.nii.gz``, and ``root/ct_open.nii.gz`` (the same
    voxels, another file: opened only); returns the label ``(I, J, K)``."""
    from sam_medical.volume.io import Volume, write_volume

    image, label = synthetic_ct()
    ref = Volume(image, SPACING, (-190.0, -190.0, -400.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    (root / "labels" / "final").mkdir(parents=True, exist_ok=True)
    write_volume(image, ref, root / "ct.nii.gz")
    write_volume(image, ref, root / "ct_open.nii.gz")
    write_volume(label, ref, root / "labels" / "final" / "ct.nii.gz")
    return label


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: Path, studies: Path, conf: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """``monailabel start_server`` on 127.0.0.1 (a new process group); ``(process, url)`` once it answers."""
    port = free_port()
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(app)]
    cmd += ["--studies", str(studies)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
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


#: The organ's centre voxel ``(i, j)`` on every slice; the centre slice.
CENTRE = (200, 200)
K_CENTRE = SHAPE[2] // 2


def pct(values: list[float], q: float = 50) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


class Server:
    """One running server with Slicer's client; requests as the plugin builds them."""

    def __init__(self, proc, url: str, client, label: np.ndarray, box: bool) -> None:
        self.proc, self.url, self.client, self.label, self.box = proc, url, client, label, box

    def params(self, k: int, jitter: int = 0, box: bool | None = None) -> dict:
        params = {"label": "object", "foreground": [], "background": [], "slice": k}
        if self.box if box is None else box:
            ii, jj = np.nonzero(self.label[:, :, k])
            if not len(ii):  # outside the organ: a box around where it would be
                ii, jj = np.array([150, 250]), np.array([150, 250])
            lo_i, hi_i, lo_j, hi_j = int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max())
            params["roi"] = [lo_i - 3 + jitter % 3, hi_i + 3, lo_j - 3, hi_j + 3 - jitter % 2, k, k]
        else:
            i, j = CENTRE
            params["foreground"] = [[i + jitter % 7 - 3, j + jitter % 5 - 2, k]]
        params["result_extension"] = ".nrrd"
        params["result_dtype"] = "uint8"
        return params

    def click(
        self, k: int, jitter: int = 0, image: str = "ct", box: bool | None = None
    ) -> tuple[float, dict]:
        """``(seconds end to end, answer)`` of one ``sam_2d`` request on slice ``k``."""
        t0 = time.perf_counter()
        result_file, out = self.client.infer("sam_2d", image, self.params(k, jitter, box))
        seconds = time.perf_counter() - t0
        os.unlink(result_file)
        return seconds, out

    def prefetch(self) -> dict:
        return self.client.info()["models"]["sam_2d"]["sam"].get("prefetch") or {}

    def idle(self, timeout: float = 900.0) -> None:
        """Wait until no background encode is queued or running."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.prefetch().get("in_flight"):
            time.sleep(0.5)


def far_slices(count: int) -> list[int]:
    """``count`` slices from the volume's ends inwards (0, 99, 1, 98, ...), where encoding ahead from
    the centre arrives last."""
    ends = [k for step in range(SHAPE[2] // 2) for k in (step, SHAPE[2] - 1 - step)]
    return ends[:count]


def stages(answers: list[tuple[float, dict]]) -> dict:
    """p50 of each ``latency`` stage, and ``http`` (the client's seconds less the server's total)."""
    names = sorted({name for _, out in answers for name in out["latency"]})
    out = {name: pct([a["latency"].get(name, 0.0) for _, a in answers]) for name in names}
    out["http"] = pct([s - a["latency"]["total"] for s, a in answers])
    return out


def far_clicks(server: Server, args, targets: list[int]) -> dict:
    """First clicks on far slices ``targets``, 3 s and 12 s after a click elsewhere (near the centre)."""
    rows: dict[str, list[tuple[float, dict]]] = {"3": [], "12": []}
    n = 0
    for delay in (3, 12):
        for _ in range(args.trials):
            server.click(K_CENTRE - 8 + 4 * (n % 5), jitter=n)  # elsewhere: near the centre
            time.sleep(delay)
            rows[str(delay)].append(server.click(targets[n], jitter=n))
            n += 1
    out: dict = {}
    for delay, answers in rows.items():
        computed = [(s, a) for s, a in answers if a["embedding"] == "computed"]
        out[f"far_{delay}s_p50_s"] = pct([s for s, _ in computed])
        out[f"far_{delay}s_all_s"] = [round(s, 3) for s, _ in answers]
        out[f"far_{delay}s_cached"] = len(answers) - len(computed)
        out[f"far_{delay}s_wait_p50_s"] = pct([a["latency"].get("wait", 0.0) for _, a in computed])
        out.setdefault("_far", []).extend(computed)
    return out


def measure(server: Server, args, targets: list[int]) -> dict:
    first_s, first = server.click(K_CENTRE)
    row = {"first_click_s": round(first_s, 4), "first_click_latency": first["latency"]}
    row.update(far_clicks(server, args, targets))
    far = row.pop("_far")
    repeats = [server.click(K_CENTRE, jitter=r + 1) for r in range(args.repeats)]
    row["repeat_p50_s"] = pct([s for s, _ in repeats])
    row["repeat_all_cached"] = all(a["embedding"] == "cached" for _, a in repeats)
    row["stages_far_p50"] = stages(far)
    row["stages_repeat_p50"] = stages(repeats)
    row["prefetch"] = server.prefetch()
    return row


def ready_share(server: Server, open_id: str, depth: int) -> dict:
    """Open ``open_id`` as Slicer downloads it; the share of its slices encoded after 5, 10, 20 s (the
    background encode of another image in flight at the open, if any, counts too: at most 1 slice)."""
    base = server.prefetch().get("encoded", 0)
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"{server.url}/datastore/image?image={open_id}", timeout=60) as r:
        r.read()
    out: dict = {}
    for at in (5, 10, 20):
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        out[f"share_{at}s"] = round((server.prefetch().get("encoded", 0) - base) / depth, 3)
        if at == 10:
            seconds, answer = server.click(K_CENTRE, image=open_id)
            out["centre_ready_10s"] = answer["embedding"] == "cached"
            out["centre_click_10s_s"] = round(seconds, 4)
    return out


def torch_encoder_alone(model: str, repeats: int) -> float:
    """p50 seconds of the plain fp32 PyTorch image encoder on one canvas, all cores, no server."""
    import torch

    from sam_medical.model import forward as sf
    from sam_medical.model.build import build_sam

    torch.set_num_threads(os.cpu_count() or 1)
    sam, _ = build_sam(model, image_size=256, random_weights=model != "medsam_lite")
    canvas = torch.randint(
        0, 255, (1, 256, 256, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    times = []
    with torch.inference_mode():
        x = sf.canvas_to_input(sam.eval(), canvas)
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            sf.encode(sam, x)
            times.append(time.perf_counter() - t0)
    return pct(times[1:])


def serve(work: Path, name: str, args, conf: dict[str, str], label: np.ndarray) -> Server:
    """A server of ``args.model`` with ``conf`` over a fresh copy of the app (the export cache is shared)."""
    app = work / f"app_{name}"
    shutil.copytree(
        REPO / "monailabel_app", app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__")
    )
    full = {
        "model": args.model,
        "use_pretrained_model": "true" if args.model == "medsam_lite" else "false",
        "image_size": "256",
        "export_dir": str(work / "exports"),
        **dict(args.conf or []),
        **conf,
    }
    proc, url = start_server(app, work / "studies", full, app / "server.log")
    client = slicer_client_module().MONAILabelClient(url, tmpdir=str(work))
    box = args.prompt == "box" or (args.prompt == "auto" and args.model == "medsam_lite")
    return Server(proc, url, client, label, box)


def decode_only(work: Path, args, label: np.ndarray) -> dict:
    """``click_decode_ms_p50``: the decode stage of one foreground click on a cached slice."""
    server = serve(work, "decode", args, {"prefetch_slices": "0"}, label)
    try:
        server.click(K_CENTRE, box=False)  # the slice is encoded once
        answers = [server.click(K_CENTRE, jitter=r + 1, box=False) for r in range(args.repeats)]
        cached = all(a["embedding"] == "cached" for _, a in answers)
        decode_ms = [1000 * a["latency"]["decode"] for _, a in answers]
        return {
            "click_decode_ms_p50": pct(decode_ms),
            "click_decode_ms_all": [round(v, 1) for v in decode_ms],
            "click_total_p50_s": pct([s for s, _ in answers]),
            "all_cached": cached,
            "strategy": answers[-1][1].get("strategy"),
        }
    finally:
        stop_server(server.proc)


def both_servers(work: Path, args, label: np.ndarray) -> dict:
    """The same measurements with background encoding off, then on (one server at a time), and the
    ready share on the latter."""
    targets = far_slices(2 * args.trials)
    out: dict = {}
    for name, prefetch in (("prefetch_off", "0"), ("prefetch_on", str(args.prefetch))):
        t0 = time.perf_counter()
        server = serve(work, name, args, {"prefetch_slices": prefetch}, label)
        try:
            row = {"server_start_s": round(time.perf_counter() - t0, 1), "load_average": [os.getloadavg()[0]]}
            row.update(measure(server, args, targets))
            if prefetch != "0":
                row["ready"] = ready_share(server, "ct_open", SHAPE[2])
            row["runtime"] = server.client.info()["models"]["sam_2d"]["sam"].get("runtime")
            row["load_average"].append(os.getloadavg()[0])
            out[name] = row
        finally:
            stop_server(server.proc)
    off, on = out["prefetch_off"], out["prefetch_on"]
    if off.get("far_3s_p50_s") and on.get("far_3s_p50_s"):
        out["far_3s_on_over_off"] = round(on["far_3s_p50_s"] / off["far_3s_p50_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="medsam_lite")
    parser.add_argument(
        "--prompt", choices=("auto", "box", "click"), default="auto", help="auto: box for medsam_lite"
    )
    parser.add_argument("--trials", type=int, default=4, help="far-slice clicks per delay (3 s, 12 s)")
    parser.add_argument("--repeats", type=int, default=10, help="repeat clicks on one slice")
    parser.add_argument("--prefetch", type=int, default=4, help="--conf prefetch_slices of the 'on' server")
    parser.add_argument(
        "--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="more server --conf (repeatable)"
    )
    parser.add_argument("--decode-only", action="store_true", help="only click_decode_ms_p50")
    parser.add_argument(
        "--keep", default=None, help="work folder to keep (default: a temporary one, removed)"
    )
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="click_latency_"))
    work.mkdir(parents=True, exist_ok=True)
    row: dict = {
        "bench": "click_latency",
        "command": "bench/click_latency.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "volume": list(SHAPE),
        "cpus": os.cpu_count(),
        "load_average_start": round(os.getloadavg()[0], 2),
    }
    try:
        label = write_datastore(work / "studies")
        if args.decode_only:
            row.update(decode_only(work, args, label))
        else:
            row["torch_encoder_alone_s"] = torch_encoder_alone(args.model, 5)
            row.update(both_servers(work, args, label))
            far = row["prefetch_on"].get("far_3s_p50_s")
            if far:
                row["speedup_far_3s_vs_torch_encoder"] = round(row["torch_encoder_alone_s"] / far, 2)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
