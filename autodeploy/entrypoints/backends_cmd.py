"""``autodeploy backends``: the installed attention backends (built-in and plugins) with their capabilities.

Lists what each backend declares (``AttentionBackend.describe``: devices, dtypes, metadata fields, CUDA-graph
grade, cache layout, passes, ...) and whether it can run on this machine, so a plugin author can check that an
install worked and a user can see what ``backend="auto"`` chooses from.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import torch


def collect(device: str) -> list[dict[str, Any]]:
    """One plain-data row per registered backend, with its availability on ``device``."""
    from autodeploy.backends import get_backend, list_backends

    rows = []
    dev = torch.device(device)
    for name in list_backends():
        backend = get_backend(name)
        ok, why = backend.available(dev, explicit=False)
        rows.append({"name": name, **backend.describe(), "available": {"device": dev.type, "auto": ok, "why": why}})
    return rows


def render(rows: list[dict[str, Any]], out: TextIO) -> None:
    for row in rows:
        avail = row["available"]
        state = "available" if avail["auto"] else f"not chosen automatically: {avail['why']}"
        out.write(f"{row['name']}  ({row['module']}; on {avail['device']}: {state})\n")
        for key, value in row.items():
            if key in ("name", "module", "available"):
                continue
            if isinstance(value, (list, tuple)):
                value = ", ".join(map(str, value)) or "-"
            out.write(f"    {key:<18} {value}\n")


def run(args: argparse.Namespace) -> int:
    rows = collect(args.device)
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        render(rows, sys.stdout)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The subcommand's own flags (the CLI registers it in ``cli.SUBCOMMANDS``)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to check availability on")
    p.add_argument("--json", action="store_true", help="print JSON")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autodeploy backends", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv or []))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
