"""``sam-medical download``: fetch an official SAM checkpoint into the cache (MD5-verified) and print its path."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sam_medical.model.checkpoints import (  # deferred: keeps `sam-medical --help` fast
        CACHE_ENV,
        OFFICIAL_CHECKPOINTS,
        URL_BASE,
    )

    p = subparsers.add_parser(
        "download",
        help="download an official SAM checkpoint (MD5-verified) and print its path",
        description=(
            "Download an official Segment Anything checkpoint into the cache folder, verify its MD5 and "
            "print its path. A file already in the cache is verified and not downloaded again. Offline, "
            "download the file elsewhere and put it in the cache folder under its official name."
        ),
    )
    p.add_argument("--model", required=True, choices=tuple(OFFICIAL_CHECKPOINTS), help="official model")
    p.add_argument(
        "--cache-dir", default=None, help=f"cache folder (default: ${CACHE_ENV} or ~/.cache/sam_medical)"
    )
    p.add_argument("--url-base", default=URL_BASE, help=f"where the files live (default {URL_BASE})")
    return p


def run(args: argparse.Namespace) -> int:
    from sam_medical.model.checkpoints import resolve_checkpoint  # deferred: keeps `sam-medical --help` fast

    path, _ = resolve_checkpoint(args.model, cache_dir=args.cache_dir, download=True, url_base=args.url_base)
    print(path)
    return 0
