"""``sam-medical workspace``: the quick start's working copy of the app and the samples (created once)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "workspace",
        help="create or refresh the working copy of the app and the sample volumes that the server uses",
        description=(
            "Create (first call) or refresh the workspace the quick start serves, outside the repository: "
            "ROOT/app (the MONAI Label app's code, refreshed at every call; its model/ and logs/ are kept) "
            "and ROOT/studies (the sample volumes, copied once; your labels and images afterwards). Prints "
            'the folder asked for, so that `monailabel start_server --app "$(sam-medical workspace --print '
            'app)" --studies "$(sam-medical workspace --print studies)"` serves them.'
        ),
    )
    p.add_argument(
        "--root",
        default=None,
        help="workspace folder (default $SAM_MEDICAL_WORKSPACE or ~/.local/share/sam-medical/workspace)",
    )
    p.add_argument(
        "--print", dest="show", choices=("app", "studies", "root"), default="root", help="folder to print"
    )
    return p


def run(args: argparse.Namespace) -> int:
    from sam_medical.quickstart.workspace import (
        prepare_workspace,  # deferred: keeps `sam-medical --help` fast
    )

    paths = prepare_workspace(args.root)
    print(paths[args.show])
    return 0
