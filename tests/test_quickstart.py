"""The quick start serves a workspace outside the repository: trying it leaves the repository as it was.

The README's main command is ``monailabel start_server --app "$(sam-medical workspace --print app)"
--studies "$(sam-medical workspace --print studies)" ...``. This test runs that workspace command (into a
temporary root instead of ``~/.local/share``), starts the real server on it, and does what a first-time
user does from Slicer: upload an image, submit a label, click. Afterwards no file of the repository
(ignored ones included: ``monailabel_app/model``, ``logs``, ``sample_volumes/datastore_v2.json``...)
was added, removed or changed.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from slicer_harness import REPO, running_server, slicer_infer

from sam_medical.cli.main import main

pytestmark = pytest.mark.server

SKIP_PARTS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def repo_snapshot() -> dict[str, str]:
    """Relative path -> SHA-256 of every file of the repository (ignored files too), caches aside."""
    out = {}
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if path.is_file() and not (set(rel.parts) & SKIP_PARTS):
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def git_status() -> str | None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    proc = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--ignored"], capture_output=True, text=True
    )
    lines = [ln for ln in proc.stdout.splitlines() if not ({*Path(ln[3:]).parts} & SKIP_PARTS)]
    return "\n".join(lines) if proc.returncode == 0 else None


def workspace(root: Path, what: str, capsys) -> Path:
    assert main(["workspace", "--root", str(root), "--print", what]) == 0
    return Path(capsys.readouterr().out.strip())


def test_quick_start_leaves_the_repository_unchanged(tmp_path, request, capsys):
    before, status_before = repo_snapshot(), git_status()
    root = tmp_path / "ws"
    app, studies = workspace(root, "app", capsys), workspace(root, "studies", capsys)
    assert app == root / "app" and studies == root / "studies"
    assert (app / "main.py").read_bytes() == (REPO / "monailabel_app" / "main.py").read_bytes()
    samples = sorted(p.name for p in (REPO / "sample_volumes").glob("*.nii.gz"))
    assert sorted(p.name for p in studies.glob("*.nii.gz")) == samples

    new_image = tmp_path / "my_scan.nii.gz"
    shutil.copy(REPO / "sample_volumes" / "phantom_003.nii.gz", new_image)
    label = REPO / "sample_volumes" / "labels" / "final" / "phantom_003.nii.gz"
    with running_server(
        tmp_path, studies, {"model": "tiny", "prefetch_slices": "0"}, request, app=app
    ) as srv:
        client = srv["client"]
        assert client.upload_image(str(new_image), "my_scan")["image"] == "my_scan"
        client.save_label("my_scan", str(label), params={"label_info": [{"name": "object", "idx": 1}]})
        _, _, out = slicer_infer(srv, "sam_2d", "my_scan", fg=[[100, 84, 16]], slice_index=16)
        assert out["slice"] == 16
    assert (studies / "my_scan.nii.gz").read_bytes() == new_image.read_bytes()
    assert (studies / "labels" / "final" / "my_scan.nii.gz").read_bytes() == label.read_bytes()
    assert (app / "logs").is_dir() and (
        app / "model"
    ).is_dir()  # the server wrote here, not in the repository

    assert repo_snapshot() == before
    assert git_status() == status_before

    # the next start refreshes the app's code and keeps the user's datastore
    (app / "main.py").write_text("# stale\n")
    assert workspace(root, "studies", capsys) == studies
    assert (app / "main.py").read_bytes() == (REPO / "monailabel_app" / "main.py").read_bytes()
    assert (studies / "my_scan.nii.gz").is_file()


def test_workspace_mistakes_are_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["workspace", "--root", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the workspace") and err.count("\n") == 1
    assert main(["workspace", "--root", str(REPO / "monailabel_app" / "ws")]) == 2
    assert "may not be inside the app folder" in capsys.readouterr().err
