"""Official checkpoint table, verified atomic download (local HTTP server / file:// URLs), resolution."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from sam_medical.cli.main import main
from sam_medical.errors import UserInputError
from sam_medical.model import checkpoints as ck

FNAME = "sam_vit_b_01ec64.pth"
PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # > the 1 MiB chunk: several reads
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


@pytest.fixture
def official_vit_b(monkeypatch):
    """Pretend PAYLOAD is the official ViT-B file."""
    monkeypatch.setitem(ck.OFFICIAL_CHECKPOINTS, "vit_b", (FNAME, PAYLOAD_MD5))
    return PAYLOAD


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output quiet
        pass

    def do_GET(self) -> None:
        route, _, name = self.path.strip("/").partition("/")
        if name != FNAME:
            self.send_error(404)
            return
        body = PAYLOAD if route != "bad" else bytes(reversed(PAYLOAD))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if route == "cut":  # the connection dies half way
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_official_table_names_carry_their_digest_prefix():
    assert set(ck.OFFICIAL_CHECKPOINTS) == {"vit_b", "vit_l", "vit_h"}
    for fname, md5 in ck.OFFICIAL_CHECKPOINTS.values():
        assert len(md5) == 32 and int(md5, 16) >= 0
        assert fname.endswith(f"_{md5[:6]}.pth")
    assert ck.URL_BASE == "https://dl.fbaipublicfiles.com/segment_anything/"


def test_md5_file_is_chunked_and_right(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(PAYLOAD)
    assert ck.md5_file(f, chunk_size=4096) == PAYLOAD_MD5
    f.write_bytes(PAYLOAD[:-1])  # memo is keyed on size/mtime: a changed file is hashed again
    assert ck.md5_file(f) == hashlib.md5(PAYLOAD[:-1]).hexdigest()


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM_MEDICAL_CACHE", str(tmp_path / "c"))
    assert ck.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SAM_MEDICAL_CACHE")
    assert ck.default_cache_dir() == Path.home() / ".cache" / "sam_medical"


def test_download_verifies_and_renames(official_vit_b, server, tmp_path):
    cache = tmp_path / "cache"
    path = ck.download_official("vit_b", cache, url_base=f"{server}/good/", progress=False)
    assert path == cache / FNAME
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(cache) == [FNAME]


def test_download_md5_mismatch_is_refused_and_leaves_nothing(official_vit_b, server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(UserInputError, match="MD5 .* official sam_vit_b_01ec64.pth") as err:
        ck.download_official("vit_b", cache, url_base=f"{server}/bad", progress=False)
    assert "corrupt, partial or not the official one" in str(err.value)
    assert not (cache / FNAME).exists()
    assert _leftovers(cache) == []


def test_cut_download_leaves_no_checkpoint(official_vit_b, server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(UserInputError, match="cut|could not download"):
        ck.download_official("vit_b", cache, url_base=f"{server}/cut/", progress=False)
    assert _leftovers(cache) == []


def test_offline_error_names_file_url_and_manual_place(official_vit_b, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(UserInputError) as err:
        ck.download_official("vit_b", cache, url_base="http://127.0.0.1:9/", timeout=5, progress=False)
    msg = str(err.value)
    assert FNAME in msg and "http://127.0.0.1:9/" + FNAME in msg and str(cache / FNAME) in msg
    assert "\n" not in msg
    assert _leftovers(cache) == []


def test_resolve_downloads_once_then_uses_the_cache(official_vit_b, tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    (src / FNAME).write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    path, md5 = ck.resolve_checkpoint("vit_b", cache_dir=cache, url_base=src.as_uri())
    assert (path, md5) == (cache / FNAME, PAYLOAD_MD5)
    (src / FNAME).unlink()  # the second call must not need the mirror
    assert ck.resolve_checkpoint("vit_b", cache_dir=cache, url_base=src.as_uri()) == (
        cache / FNAME,
        PAYLOAD_MD5,
    )


def test_resolve_refuses_a_corrupt_cached_or_given_official_file(official_vit_b, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / FNAME).write_bytes(PAYLOAD[:1000])
    with pytest.raises(UserInputError, match="corrupt, partial or not the official one"):
        ck.resolve_checkpoint("vit_b", cache_dir=cache)
    with pytest.raises(UserInputError, match="has MD5"):
        ck.resolve_checkpoint("vit_b", checkpoint=cache / FNAME)
    # an official vit_b file offered for vit_l
    with pytest.raises(UserInputError, match="official vit_b file"):
        ck.resolve_checkpoint("vit_l", checkpoint=cache / FNAME)


def test_resolve_explicit_own_file_and_missing_cases(tmp_path):
    own = tmp_path / "my_finetuned_vit_b.pth"
    own.write_bytes(b"whatever")
    assert ck.resolve_checkpoint("vit_b", checkpoint=own) == (own, hashlib.md5(b"whatever").hexdigest())
    with pytest.raises(UserInputError, match="does not exist"):
        ck.resolve_checkpoint("vit_b", checkpoint=tmp_path / "nope.pth")
    with pytest.raises(UserInputError, match=r"downloading is off.*--checkpoint"):
        ck.resolve_checkpoint("vit_b", cache_dir=tmp_path / "empty", download=False)
    with pytest.raises(UserInputError, match="no official checkpoint"):
        ck.resolve_checkpoint("tiny")


def test_download_command_prints_the_path(official_vit_b, tmp_path, capsys):
    src = tmp_path / "mirror"
    src.mkdir()
    (src / FNAME).write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    argv = ["download", "--model", "vit_b", "--cache-dir", str(cache), "--url-base", src.as_uri()]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(cache / FNAME)

    offline = [
        "download",
        "--model",
        "vit_b",
        "--cache-dir",
        str(tmp_path / "c2"),
        "--url-base",
        "http://127.0.0.1:9/",
    ]
    assert main(offline) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and FNAME in err
