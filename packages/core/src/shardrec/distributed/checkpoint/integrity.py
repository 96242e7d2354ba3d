"""What a checkpoint is made of, and whether it is still that: the sidecar's file list, ``verify``,
``checkpoints`` and ``prune``.

A save records in ``shardrec.json`` every file it wrote (DCP's ``.metadata`` and each ``.distcp``)
with its size and SHA-256, and a SHA-256 of the sidecar's own canonical JSON (every key but
``checksum``, sorted, compact). :func:`verify` re-reads every listed file and compares; any
difference is a :class:`CorruptCheckpointError` naming the file.

Checksums detect damage (a truncated copy, a bad disk, a half-synced mount), not forgery: whoever
can write a checkpoint can also recompute its checksums. What keeps a forged checkpoint harmless is
the way it is read (see ``safe_reader`` and ``safe_files``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Final

from shardrec.distributed.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    UnverifiedCheckpointWarning,
)
from shardrec.distributed.checkpoint.safe_files import (
    SIDECAR_CAP,
    member_size,
    open_member,
    read_member,
)
from shardrec.distributed.checkpoint.safe_reader import (
    METADATA,
    read_metadata_file,
    storage_files,
)

FORMAT: Final = "shardrec-dcp/2"
"""The sidecar's format: version 2 lists the checkpoint's files with their checksums."""
LEGACY_FORMAT: Final = "shardrec-dcp/1"
"""Saved before checksums: loaded with an :class:`UnverifiedCheckpointWarning`."""
SIDECAR: Final = "shardrec.json"
CHECKSUM: Final = "checksum"
FILES: Final = "files"
_STEP_DIR: Final = re.compile(r"^(\.old-)?step-(\d+)$")
_PRUNED: Final = ".pruned-"
_BLOCK: Final = 1 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def file_entry(directory: Path, name: str) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of the regular file ``directory/name``."""
    digest = hashlib.sha256()
    size = 0
    with open_member(directory, name) as f:
        while block := f.read(_BLOCK):
            digest.update(block)
            size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


def list_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file of a checkpoint directory being saved (the sidecar aside), with its entry."""
    return {name: file_entry(directory, name) for name in sorted(os.listdir(directory))}


def sealed_sidecar(body: dict[str, Any]) -> str:
    """The sidecar's text: ``body`` plus the checksum of its canonical form."""
    if CHECKSUM in body:
        raise ValueError(f"the sidecar body may not hold {CHECKSUM!r}")
    sealed = {**body, CHECKSUM: hashlib.sha256(_canonical(body)).hexdigest()}
    return json.dumps(sealed, indent=1, sort_keys=True)


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar of the checkpoint directory ``path``, its own checksum checked."""
    directory = Path(path)
    file = directory / SIDECAR
    try:
        data = json.loads(read_member(directory, SIDECAR, SIDECAR_CAP))
    except CheckpointError as exc:
        raise CorruptCheckpointError(str(exc)) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{file}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise CorruptCheckpointError(f"{file}: not a {FORMAT} checkpoint sidecar")
    if data["format"] == FORMAT:
        body = {k: v for k, v in data.items() if k != CHECKSUM}
        if data.get(CHECKSUM) != hashlib.sha256(_canonical(body)).hexdigest():
            raise CorruptCheckpointError(f"{file}: checksum mismatch (the sidecar was altered)")
        files = data.get(FILES)
        if not isinstance(files, dict) or METADATA not in files:
            raise CorruptCheckpointError(f"{file}: its file list is missing or lacks {METADATA}")
    if not isinstance(data.get("step"), int) or isinstance(data.get("step"), bool):
        raise CorruptCheckpointError(f"{file}: no integer step")
    return data


def is_legacy(sidecar: dict[str, Any]) -> bool:
    return bool(sidecar.get("format") == LEGACY_FORMAT)


def warn_legacy(path: Path) -> None:
    warnings.warn(
        f"{path}: saved by an older shardrec without checksums; read without verifying its files",
        UnverifiedCheckpointWarning,
        stacklevel=3,
    )


def verify(path: str | Path) -> None:
    """Check that the checkpoint directory ``path`` holds exactly what its save wrote.

    Reads every file the sidecar lists and compares its size and SHA-256; checks the sidecar's
    own checksum, and that DCP's metadata points only into listed files. Raises
    :class:`CorruptCheckpointError` (one line, naming the file) on the first difference. A
    checkpoint saved before checksums were recorded gets the structural checks only, and an
    :class:`UnverifiedCheckpointWarning`. Not a collective: it reads files, nothing else.
    """
    directory = Path(path)
    try:
        sidecar = read_sidecar(directory)
        if is_legacy(sidecar):
            read_metadata_file(directory)
            warn_legacy(directory)
            return
        listed: dict[str, Any] = sidecar[FILES]
        for name, entry in sorted(listed.items()):
            _check_file(directory, name, entry)
        unlisted = sorted(storage_files(read_metadata_file(directory)) - set(listed))
        if unlisted:
            raise CorruptCheckpointError(
                f"{directory / unlisted[0]}: named by {METADATA} but not in {SIDECAR}'s file list"
            )
    except CorruptCheckpointError:
        raise
    except CheckpointError as exc:
        raise CorruptCheckpointError(str(exc)) from None


def _check_file(directory: Path, name: str, entry: object) -> None:
    file = directory / name
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
    ):
        raise CorruptCheckpointError(f"{file}: malformed entry in {SIDECAR}")
    try:
        size = member_size(directory, name)
    except CheckpointError as exc:
        raise CorruptCheckpointError(str(exc)) from None
    if size != entry["size"]:
        raise CorruptCheckpointError(f"{file}: wrong size ({size} bytes, saved {entry['size']})")
    found = file_entry(directory, name)
    if found["size"] != entry["size"]:
        raise CorruptCheckpointError(f"{file}: changed while being verified")
    if found["sha256"] != entry["sha256"]:
        raise CorruptCheckpointError(f"{file}: checksum mismatch (sha256 {found['sha256']})")


def _complete(path: Path) -> bool:
    return (path / METADATA).is_file() and (path / SIDECAR).is_file()


def checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoint directories under ``root``, newest (highest step) first.

    Complete means renamed into place by its save (``step-N``, holding ``.metadata`` and
    ``shardrec.json``); whether its files are intact is :func:`verify`'s question. A re-save of
    step N moves the old ``step-N`` aside as ``.old-step-N`` for a moment; a crash in that moment
    leaves no ``step-N``, and the old one stands for step N. Symbolic links are not followed.
    """
    base = Path(root)
    if not base.is_dir():
        return []
    best: dict[int, tuple[int, Path]] = {}
    for child in base.iterdir():
        m = _STEP_DIR.match(child.name)
        if not m or child.is_symlink() or not child.is_dir() or not _complete(child):
            continue
        step, rank = int(m.group(2)), 0 if m.group(1) else 1  # step-N before .old-step-N
        if step not in best or rank > best[step][0]:
            best[step] = (rank, child)
    return [best[step][1] for step in sorted(best, reverse=True)]


def latest(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None if there is none."""
    found = checkpoints(root)
    return found[0] if found else None


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints under ``root``; return the deleted.

    The newest checkpoint that passes :func:`verify` is kept as well, even when it is older than
    the ``keep`` newest (so a corrupt latest save never costs the last good one). Each victim is
    first renamed out of the ``step-*`` namespace (to ``.pruned-step-N``, which :func:`latest`
    and :func:`checkpoints` never see), then deleted; leftovers of an interrupted prune are
    deleted by the next one. Not a collective: call it on one process (rank 0), after ``save``
    has returned.
    """
    given: object = keep  # callers pass CLI values: checked, not trusted to the annotation
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise CheckpointError(f"keep must be an int >= 1, got {keep!r}")
    base = Path(root)
    if not base.is_dir():
        return []
    for child in base.iterdir():
        if child.name.startswith(_PRUNED):
            _remove_tree(child)
    found = checkpoints(base)
    kept = set(found[:keep])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedCheckpointWarning)
        for candidate in found:
            try:
                verify(candidate)
            except CorruptCheckpointError:
                continue
            kept.add(candidate)
            break
    removed: list[Path] = []
    for victim in found:
        if victim in kept:
            continue
        grave = base / f"{_PRUNED}{victim.name}"
        os.replace(victim, grave)
        fsync_dir(base)
        _remove_tree(grave)
        removed.append(victim)
    return removed
