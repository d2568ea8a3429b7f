"""Where checkpoints live in an output directory: publishing a written one under its name, finding and choosing
one to resume from, and cleaning up after killed runs.

- ``checkpoint-N/`` is written as ``.checkpoint-N.tmp-PID/`` and renamed into place. Replacing an existing
  ``checkpoint-N`` (a resumed run saving the same step again) moves the old one aside first; a run killed
  between the two renames leaves the complete new copy, which the next run's ``clean_stale`` puts in place.
- ``final`` is a symbolic link to a versioned directory ``final-vK/``: a new final copy is written beside the
  old one and the link is replaced in one atomic ``rename``, so at every moment ``final`` names a complete copy.
  The previous version is removed after the switch. (Where symbolic links are not available, ``final`` is a
  directory replaced like ``checkpoint-N``.)
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from typing import Optional

from . import manifest
from .errors import CheckpointError

STATE_JSON = "trainer_state.json"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|link)-\d+(?P<old>\.old)?$")
_VERSION = re.compile(r"^(?P<name>.+)-v(?P<n>\d+)$")


def publish(temporary: str, path: str, *, versioned: bool = False) -> None:
    """Give the complete checkpoint ``temporary`` the name ``path`` (rank 0 only)."""
    if versioned and _publish_versioned(temporary, path):
        return
    if os.path.lexists(path):  # os.replace cannot overwrite a non-empty directory: move the old one aside
        stale = f"{temporary}.old"
        _remove(stale)
        os.replace(path, stale)
        os.replace(temporary, path)
        _remove(stale)
    else:
        os.replace(temporary, path)


def _publish_versioned(temporary: str, path: str) -> bool:
    parent, base = os.path.split(os.path.abspath(path))
    versions = [int(m["n"]) for name in os.listdir(parent) if (m := _VERSION.match(name)) and m["name"] == base]
    version = f"{base}-v{max(versions, default=0) + 1}"
    link = os.path.join(parent, f".{base}.link-{os.getpid()}")
    _remove(link)
    try:
        os.symlink(version, link)  # relative: the output directory can be moved
    except (OSError, NotImplementedError):
        return False  # no symbolic links here: the caller renames directories
    previous = os.path.join(parent, os.readlink(path)) if os.path.islink(path) else None
    os.replace(temporary, os.path.join(parent, version))
    if os.path.isdir(path) and not os.path.islink(path):  # a plain directory of an older version: set it aside
        legacy = os.path.join(parent, f"{base}-v0")
        _remove(legacy)
        os.replace(path, legacy)
        previous = legacy
    os.replace(link, path)
    if previous and os.path.basename(previous) != version:
        _remove(previous)
    return True


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(output_dir: str) -> list[str]:
    """Remove what killed runs left in ``output_dir`` (call holding its lock: no other run writes there).

    Temporary directories ``.NAME.tmp-PID`` are removed, except a complete one (its manifest verifies) whose
    ``NAME`` is missing: a run killed between the two renames of a replacement; it is put in place. Versions of
    ``final`` that the link does not point to are removed. Returns what was removed or restored (messages).
    """
    done = []
    if not os.path.isdir(output_dir):
        return done
    for name in sorted(os.listdir(output_dir)):
        match = _TEMPORARY.match(name)
        if not match:
            continue
        path, target = os.path.join(output_dir, name), os.path.join(output_dir, match["name"])
        if (match["kind"] == "tmp" and not match["old"] and not os.path.lexists(target)
                and not manifest.verify(path)):
            os.replace(path, target)
            done.append(f"restored {target} from {name}")
        else:
            _remove(path)
            done.append(f"removed {path}")
    for name in sorted(os.listdir(output_dir)):
        match = _VERSION.match(name)
        link = os.path.join(output_dir, match["name"]) if match else None
        if link and os.path.islink(link) and os.readlink(link) != name:
            _remove(os.path.join(output_dir, name))
            done.append(f"removed {os.path.join(output_dir, name)}")
    return done


def checkpoint_step(path: str) -> Optional[int]:
    """The step a checkpoint directory records (manifest, else trainer_state.json), None if unreadable."""
    import json

    for reader in (lambda: manifest.read_manifest(path), lambda: json.load(open(os.path.join(path, STATE_JSON)))):
        try:
            record = reader()
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            return record["step"]
    return None


def find_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-N`` directories and ``final`` in ``output_dir``, newest (highest step) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if (re.fullmatch(r"checkpoint-\d+", name) or name == "final") and os.path.isdir(path):
            step = checkpoint_step(path)
            if step is None and name != "final":
                step = int(name.split("-")[1])
            if step is not None:
                found.append((step, name == "final", path))
    return [path for _, _, path in sorted(found, reverse=True)]


def resolve_resume(resume_from: str, output_dir: str, dist, kind: str) -> Optional[str]:
    """The checkpoint to resume from, verified (a collective: every rank calls it with the same arguments).

    ``latest``: the newest checkpoint in ``output_dir`` that verifies; damaged ones are skipped with a warning;
    None (a fresh start) when there is none. A path: that checkpoint, or ``CheckpointError`` naming the damaged
    file, ``resume_from``, and the newest verified checkpoint beside it. A checkpoint of another trainer kind is
    refused by name. A checkpoint without a manifest (written before manifests existed) loads with a warning.
    """
    if resume_from == "latest":
        for path in find_checkpoints(output_dir):
            problems = _problems(path, dist, kind)
            if not problems:
                return path
            warnings.warn(f"resume_from: latest: skipping {path}: {problems[0]}", stacklevel=3)
        warnings.warn(f"resume_from: latest: no usable checkpoint in {output_dir}; starting from scratch",
                      stacklevel=3)
        return None
    problems = _problems(resume_from, dist, kind)
    if not problems:
        return resume_from
    others = [p for p in find_checkpoints(os.path.dirname(os.path.abspath(resume_from)))
              if os.path.realpath(p) != os.path.realpath(resume_from)]
    fallback = next((p for p in others if not _problems(p, dist, kind)), None)
    offer = (f"; the newest verified checkpoint beside it is {fallback}: set resume_from to it (or to 'latest')"
             if fallback else "; no verified checkpoint beside it")
    raise CheckpointError(f"resume_from: {resume_from} cannot be resumed: {problems[0]}"
                          f"{f' (and {len(problems) - 1} more problems)' if len(problems) > 1 else ''}{offer}")


def _problems(path: str, dist, kind: str) -> list[str]:
    """Why ``path`` cannot be resumed by a trainer of ``kind`` (``[]``: it can)."""
    if not os.path.isdir(path):
        return [f"{path}: not a directory"]
    problems = manifest.verify(path, dist)
    if problems == [f"no {manifest.MANIFEST}"]:
        if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
            return [f"{path}: not a checkpoint (no {manifest.MANIFEST}, no trainer_state.pt)"]
        warnings.warn(f"resume_from: {path} has no {manifest.MANIFEST} (written by an older version): its files "
                      "cannot be verified", stacklevel=4)
        problems = []
    if problems:
        return problems
    saved = _saved_kind(path)
    if saved is not None and saved != kind:
        return [f"{path} is a checkpoint of the {saved} trainer, not of the {kind} trainer"]
    return []


def _saved_kind(path: str) -> Optional[str]:
    import json

    try:
        record = manifest.read_manifest(path) or json.load(open(os.path.join(path, STATE_JSON)))
    except (OSError, ValueError):
        return None
    return record.get("trainer") if isinstance(record, dict) else None
