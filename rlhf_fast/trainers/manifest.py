"""Checkpoint manifests: the size and SHA-256 of every file of a checkpoint, written last, checked on resume.

``manifest.json`` is the last file written into a checkpoint's temporary directory, so a checkpoint that has one
was complete when it was written, and a file that changed since (a flipped byte, a truncated shard, a file
removed or replaced) no longer matches it. Hashing is split across ranks (each rank hashes every
``world_size``-th file) so that a large sharded checkpoint is hashed in parallel.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

MANIFEST = "manifest.json"
FORMAT = 1


def list_files(folder: str) -> list[str]:
    """Relative paths of the regular files under ``folder`` (the manifest excluded), sorted."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative != MANIFEST:
                out.append(relative)
    return sorted(out)


def digest(path: str) -> dict[str, Any]:
    with open(path, "rb") as handle:
        sha = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": sha}


def write_manifest(folder: str, dist, info: dict[str, Any]) -> None:
    """Hash every file under ``folder`` (a collective) and write ``manifest.json`` on rank 0, atomically and
    flushed to disk. ``info``: what else the manifest records (trainer kind, step)."""
    files = list_files(folder)
    mine = {name: digest(os.path.join(folder, name)) for name in files[dist.rank::dist.world_size]}
    entries = {k: v for part in dist.all_gather_objects(mine) for k, v in part.items()}
    if dist.is_main:
        manifest = {"format": FORMAT, **info, "files": {name: entries[name] for name in files}}
        partial = os.path.join(folder, f".{MANIFEST}.partial")
        with open(partial, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, os.path.join(folder, MANIFEST))


def read_manifest(folder: str) -> Optional[dict[str, Any]]:
    """The manifest of ``folder``, None when it has none; a manifest that does not parse raises ValueError."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path}: not a checkpoint manifest (no 'files' mapping)")
    return manifest


def verify(folder: str, dist=None) -> list[str]:
    """Problems of ``folder`` against its manifest (``[]``: every file as written); a collective with ``dist``,
    this process alone without. A folder without a manifest gives ``["no manifest.json"]``."""
    dist = dist or _ONE_PROCESS
    try:
        manifest = read_manifest(folder)
    except ValueError as error:
        return [str(error)]
    if manifest is None:
        return [f"no {MANIFEST}"]
    names = sorted(manifest["files"])
    mine = [problem for name in names[dist.rank::dist.world_size]
            if (problem := _check_file(folder, name, manifest["files"][name]))]
    return [p for part in dist.all_gather_objects(mine) for p in part]


class _OneProcess:
    rank, world_size = 0, 1

    @staticmethod
    def all_gather_objects(value) -> list:
        return [value]


_ONE_PROCESS = _OneProcess()


def _check_file(folder: str, name: str, expected: dict) -> Optional[str]:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{path}: missing"
    size = os.path.getsize(path)
    if size != expected.get("size"):
        return f"{path}: {size} bytes, the manifest says {expected.get('size')} (truncated or replaced)"
    if digest(path)["sha256"] != expected.get("sha256"):
        return f"{path}: content differs from the manifest (sha256 mismatch: damaged on disk or modified)"
    return None
