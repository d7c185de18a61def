#!/usr/bin/env python
"""Fetch the public RAVEL splits (HyperDAS format) into a local folder.

The splits are the Hugging Face ``datasets`` folders the HyperDAS authors publish in
their repository (``experiments/RAVEL/data/<domain>_<attribute>_{train,test}``, each
with ``state.json``, ``dataset_info.json`` and ``data-*.arrow``). This script lists
them through the GitHub contents API, downloads every file (following Git LFS pointers
to the media host), checks that each split opens with ``datasets.load_from_disk`` and
has RAVEL's columns, and moves it into place atomically (a split folder is either
complete or absent).

    python scripts/download_ravel.py                       # -> ../shared/ravel (the default data dir)
    python scripts/download_ravel.py --out data/ravel --only city_country_test

Needs internet access; not run by the tests (its parsing helpers are tested on local files).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterable, List, Optional

REPO = "jiudingsun01/HyperDAS"
BRANCH = "main"
DATA_PATH = "experiments/RAVEL/data"
API = "https://api.github.com/repos/{repo}/contents/{path}?ref={ref}"
RAW = "https://raw.githubusercontent.com/{repo}/{ref}/{path}"
MEDIA = "https://media.githubusercontent.com/media/{repo}/{ref}/{path}"
LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
DOMAINS = ("city", "nobel_prize_winner", "occupation", "physical_object", "verb")
SPLIT_RE = re.compile(r"^(%s)(_[a-z0-9_]+)?_(train|test)$" % "|".join(DOMAINS))
REQUIRED_COLUMNS = (
    "input_prefix", "input_suffix", "counterfactual_input_prefix", "counterfactual_input_suffix",
    "edit_instruction", "entity", "counterfactual_entity", "target", "counterfactual_target",
    "attribute_type", "domain", "attribute", "verify_text",
)


# ----------------------------------------------------------------------- parsing (tested)

def split_names(listing: Iterable[dict]) -> List[str]:
    """Split folder names from a GitHub contents listing (entries with "name" and "type")."""
    return sorted(e["name"] for e in listing if e.get("type") == "dir" and SPLIT_RE.match(e.get("name", "")))


def data_files(state_json: str) -> List[str]:
    """The arrow file names a ``state.json`` of a saved dataset refers to."""
    state = json.loads(state_json)
    files = [f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise ValueError("state.json lists no data files")
    for name in files:
        if "/" in name or name.startswith("."):
            raise ValueError(f"unexpected data file name in state.json: {name!r}")
    return files


def is_lfs_pointer(content: bytes) -> bool:
    return content[: len(LFS_MAGIC)] == LFS_MAGIC


def check_split(folder: Path) -> int:
    """Open a downloaded split and check its columns; returns the row count."""
    import datasets

    table = datasets.load_from_disk(str(folder))
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{folder.name}: missing RAVEL columns {missing}")
    return len(table)


# ----------------------------------------------------------------------- network

def _get(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "hyperdas_fast-download-ravel"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read()


def fetch_file(repo: str, ref: str, path: str) -> bytes:
    content = _get(RAW.format(repo=repo, ref=ref, path=path))
    if is_lfs_pointer(content):
        content = _get(MEDIA.format(repo=repo, ref=ref, path=path))
    return content


def download_split(name: str, out: Path, repo: str = REPO, ref: str = BRANCH, force: bool = False) -> Optional[int]:
    target = out / name
    if target.exists() and not force:
        print(f"{name}: present, skipped (use --force to replace)")
        return None
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    try:
        base = f"{DATA_PATH}/{name}"
        state = fetch_file(repo, ref, f"{base}/state.json")
        (staging / "state.json").write_bytes(state)
        (staging / "dataset_info.json").write_bytes(fetch_file(repo, ref, f"{base}/dataset_info.json"))
        for fname in data_files(state.decode()):
            (staging / fname).write_bytes(fetch_file(repo, ref, f"{base}/{fname}"))
        rows = check_split(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        print(f"{name}: {rows} rows")
        return rows
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def main(argv=None) -> int:
    default_out = Path(__file__).resolve().parents[1].parent / "shared" / "ravel"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("HYPERDAS_FAST_RAVEL_DIR", str(default_out)))
    p.add_argument("--repo", default=REPO)
    p.add_argument("--ref", default=BRANCH)
    p.add_argument("--only", nargs="+", default=None, help="split names to fetch (default: all listed)")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        listing = json.loads(_get(API.format(repo=args.repo, path=DATA_PATH, ref=args.ref)))
        names = split_names(listing)
    except Exception as exc:  # noqa: BLE001 - network problems get one clear line
        print(f"error: cannot list {args.repo}/{DATA_PATH}: {exc}", file=sys.stderr)
        return 1
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"error: unknown splits {unknown}; available: {names}", file=sys.stderr)
            return 2
        names = list(args.only)
    for name in names:
        download_split(name, out, args.repo, args.ref, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
