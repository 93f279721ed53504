"""Official Segment Anything checkpoints: MD5 table, cache folder, verified atomic download.

The official files (``sam_vit_b_01ec64.pth`` ...) are published at :data:`URL_BASE`. A file that carries an
official name must have the official MD5, whether it was downloaded or given by the user; anything else
is refused with a message that says so. A download streams into a temporary name beside the final one
(:func:`sam_medical.atomic.atomic_path`) and is verified *before* the rename, so a cut or corrupt
download never looks like a checkpoint.

Checkpoints with other names (a user's own fine-tuned full model) are allowed; their structure is
checked when they are loaded (:mod:`sam_medical.model.build`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError
from sam_medical.model.registry import FAMILIES

#: model name -> (official file name, MD5 hex digest), from the model registry.
OFFICIAL_CHECKPOINTS: dict[str, tuple[str, str]] = {
    name: (str(fam.weights.file_name), str(fam.weights.digest))
    for name, fam in FAMILIES.items()
    if fam.weights.kind == "official"
}

URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"

#: Environment variable that overrides :func:`default_cache_dir`.
CACHE_ENV = "SAM_MEDICAL_CACHE"

_CHUNK = 1 << 20  # 1 MiB

# (algorithm, resolved path, size, mtime_ns) -> digest: hashing ViT-H (2.5 GB) takes seconds, do it once
# per process.
_DIGEST_MEMO: dict[tuple[str, str, int, int], str] = {}


def file_digest(path: str | os.PathLike, algorithm: str, chunk_size: int = _CHUNK) -> str:
    """Hex digest (``"md5"``, ``"sha256"``, ...) of a file, read in chunks (memoised on path, size and
    modification time)."""
    path = Path(path)
    st = path.stat()
    key = (algorithm, str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _DIGEST_MEMO:
        return _DIGEST_MEMO[key]
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    _DIGEST_MEMO[key] = digest.hexdigest()
    return _DIGEST_MEMO[key]


def md5_file(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """MD5 hex digest of a file (the official SAM checkpoints are published with theirs)."""
    return file_digest(path, "md5", chunk_size)


def sha256_file(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """SHA-256 hex digest of a file (what we pin for packaged weights)."""
    return file_digest(path, "sha256", chunk_size)


def default_cache_dir() -> Path:
    """``$SAM_MEDICAL_CACHE`` if set, else ``~/.cache/sam_medical``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sam_medical"


def official_name(name: str) -> str:
    """The official file name of model ``name`` (``vit_b`` -> ``sam_vit_b_01ec64.pth``)."""
    if name not in OFFICIAL_CHECKPOINTS:
        raise UserInputError(
            f"there is no official checkpoint for model {name!r}; official ones are {', '.join(OFFICIAL_CHECKPOINTS)}"
        )
    return OFFICIAL_CHECKPOINTS[name][0]


def official_model_of_file(path: str | os.PathLike) -> str | None:
    """The model name whose official file name is ``path``'s name, or None."""
    file_name = Path(path).name
    for model, (fname, _) in OFFICIAL_CHECKPOINTS.items():
        if fname == file_name:
            return model
    return None


def verify_official(path: str | os.PathLike, name: str) -> str:
    """Check that ``path`` has the MD5 of model ``name``'s official file; return the digest.

    Raises:
        UserInputError: the file is missing or its digest differs from the official one.
    """
    path = Path(path)
    fname, expected = OFFICIAL_CHECKPOINTS[name][0], OFFICIAL_CHECKPOINTS[name][1]
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} does not exist")
    got = md5_file(path)
    if got != expected:
        raise UserInputError(
            f"checkpoint {path} has MD5 {got} but the official {fname} has {expected}; "
            "the file is corrupt, partial or not the official one"
        )
    return got


def _manual_hint(fname: str, url: str, final: Path) -> str:
    return (
        f"download {url} on a machine with internet access and put it at {final} "
        f"(or pass its path with --checkpoint)"
    )


def download_official(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    url_base: str = URL_BASE,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Download model ``name``'s official checkpoint into ``cache_dir`` and return its path.

    The file is streamed in 1 MiB chunks into a temporary name beside the final one, with a tqdm
    progress bar on stderr (``progress=None``: only on a terminal). Its length and MD5 are checked
    before it is renamed to the official file name; on any failure nothing is left behind.

    Args:
        name: ``vit_b``, ``vit_l`` or ``vit_h``.
        cache_dir: destination folder (default :func:`default_cache_dir`).
        url_base: where the files live (a mirror, or a ``file://`` folder); the file name is appended.
        timeout: seconds to wait on the connection and on each read.
        progress: show a progress bar (None: when stderr is a terminal).

    Raises:
        UserInputError: no connection (names the file, the URL and where to put it by hand), a cut
            download, or an MD5 mismatch.
    """
    official_name(name)  # validates the name
    fname, expected = OFFICIAL_CHECKPOINTS[name]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / fname
    url = url_base if url_base.endswith("/") else url_base + "/"
    url += fname
    disable = (not sys.stderr.isatty()) if progress is None else (not progress)
    try:
        with atomic_path(final) as tmp:
            received, total, got = _stream(url, tmp, timeout, fname, disable)
            if total is not None and received != total:
                raise UserInputError(
                    f"download of {fname} from {url} was cut after {received} of {total} bytes; "
                    f"nothing was saved. Run it again, or {_manual_hint(fname, url, final)}"
                )
            if got != expected:
                raise UserInputError(
                    f"downloaded {fname} from {url} has MD5 {got} but the official {fname} has {expected}; "
                    f"the file is corrupt, partial or not the official one and was not saved. "
                    f"Try again, or {_manual_hint(fname, url, final)}"
                )
    except UserInputError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserInputError(
            f"could not download {fname} from {url} ({reason}); nothing was saved. "
            f"If this machine is offline, {_manual_hint(fname, url, final)}"
        ) from exc
    except OSError as exc:  # disk full, permission denied on the cache folder...
        raise UserInputError(f"could not write {final} while downloading {url}: {exc}") from exc
    _DIGEST_MEMO[("md5", str(final.resolve()), final.stat().st_size, final.stat().st_mtime_ns)] = expected
    return final


def _stream(url: str, target: Path, timeout: float, desc: str, disable: bool) -> tuple[int, int | None, str]:
    """Copy ``url`` to ``target`` in chunks with a progress bar; ``(bytes received, Content-Length or None,
    MD5 hex digest)``."""
    from tqdm import tqdm  # a progress bar only when downloading: keeps --help fast

    digest = hashlib.md5()
    received = 0
    with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None and length.isdigit() else None
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=disable
        ) as bar:
            while block := response.read(_CHUNK):
                out.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
    return received, total, digest.hexdigest()


def resolve_checkpoint(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    url_base: str = URL_BASE,
) -> tuple[Path, str]:
    """Find the checkpoint file for model ``name``; return ``(path, md5)``.

    Order: an explicit ``checkpoint`` path (it must exist; if it carries an official file name its MD5
    must be the official one) -> the official file in ``cache_dir`` (verified) -> a download (when
    ``download``) -> a :class:`UserInputError` that says where to put the file.

    Any explicit path is accepted for any model name (a fine-tuned full model); its structure is checked
    when it is loaded.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise UserInputError(f"checkpoint {path} does not exist")
        if not path.is_file():
            raise UserInputError(f"checkpoint {path} is not a file")
        owner = official_model_of_file(path)
        if owner is not None:
            if owner != name:
                raise UserInputError(
                    f"checkpoint {path} is named as the official {owner} file, but model {name} was asked for"
                )
            return path, verify_official(path, name)
        return path, md5_file(path)

    fname = official_name(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache / fname
    if cached.is_file():
        try:
            return cached, verify_official(cached, name)
        except UserInputError as exc:
            raise UserInputError(f"{exc}. Delete it to download it again") from exc
    if not download:
        raise UserInputError(
            f"no checkpoint for {name}: {cached} does not exist and downloading is off; "
            f"download {url_base.rstrip('/')}/{fname} and put it there, or pass --checkpoint PATH"
        )
    path = download_official(name, cache, url_base=url_base)
    return path, OFFICIAL_CHECKPOINTS[name][1]
