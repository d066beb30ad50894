"""Checkpoints: state_dicts plus the config as JSON, written atomically, checksummed, loaded with
weights_only (so an untrusted file can never execute code).

File layout (format 2):
    8 bytes   magic b"DIFFAECK"
    4 bytes   format version, little-endian uint32
    8 bytes   payload length, little-endian uint64
    32 bytes  SHA-256 of the payload
    payload   the bytes of torch.save({"format": ..., "config": ..., "model": ..., ...})

Writing goes to a temporary file in the same directory, is fsynced, then renamed over the old
file, so a crash leaves either the old checkpoint or the new one, never half of one; the digest
catches what the rename cannot (a copy cut short, a flipped bit on disk or in transfer).
Format 1 files (a bare torch.save zip, no header) still load, without a checksum to verify.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

from ..config import Config
from ..errors import CheckpointError, OutputError

FORMAT_VERSION = 2
MAGIC = b"DIFFAECK"
_HEADER = struct.Struct("<8sIQ32s")  # magic, format, payload length, sha256
_ZIP_MAGIC = b"PK\x03\x04"  # a format-1 checkpoint: torch.save's zip without a header


def _encode(payload: dict) -> tuple[bytes, memoryview]:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **payload}, buffer)
    body = buffer.getbuffer()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest()), body


def encode(payload: dict) -> bytes:
    """The complete file contents for `payload` (header + torch.save bytes)."""
    header, body = _encode(payload)
    return header + bytes(body)


def save(path: str | Path, payload: dict) -> None:
    """Write atomically: temp file in the same directory, fsync, rename, fsync the directory.
    On any OSError (disk full, read-only, permissions) the previous file at `path` is untouched
    and an OutputError says why."""
    path = Path(path)
    header, body = _encode(payload)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write checkpoint {path}: {_why(exc)}; "
                          "the previous checkpoint is untouched") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600; keep the old file's mode, else 0644
                os.fchmod(f.fileno(), path.stat().st_mode & 0o777 if path.exists() else 0o644)
            f.write(header)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write checkpoint {path}: {_why(exc)}; "
                          "the previous checkpoint is untouched") from None
    try:  # make the rename itself durable; the new file is complete either way
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _why(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


def remove_stale_temporaries(path: str | Path) -> int:
    """Delete temporary files a killed writer left next to `path`; only call while holding the
    run's lock (another live writer's temporary file would look the same)."""
    path = Path(path)
    n = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            tmp.unlink()
            n += 1
        except OSError:
            pass
    return n


class _Window(io.RawIOBase):
    """The payload part of an open checkpoint file, as a seekable stream starting at 0, so
    torch.load reads it in place instead of from a second copy in memory."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


def _open_payload(path: Path, f) -> tuple[int, int]:
    """Check the header and the checksum; returns (offset, length) of the torch.save payload."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(_HEADER.size)
    if head[:4] == _ZIP_MAGIC:
        return 0, size  # format 1: nothing to verify, torch.load still catches truncation
    if len(head) < _HEADER.size or head[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: it does not start with a diffae "
                              "checkpoint header")
    _, version, length, digest = _HEADER.unpack(head)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}, written by a newer diffae; this "
                              f"diffae reads formats up to {FORMAT_VERSION}; upgrade diffae to load it")
    if size - _HEADER.size != length:
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {size - _HEADER.size} payload bytes, "
                              f"the header says {length}")
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    if h.digest() != digest:
        raise CheckpointError(f"corrupt checkpoint {path}: checksum mismatch (the SHA-256 of its payload "
                              "differs from the one stored when it was written)")
    return _HEADER.size, length


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint {path}")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    with f:
        offset, length = _open_payload(path, f)
        try:
            payload = torch.load(io.BufferedReader(_Window(f, offset, length)), map_location=map_location,
                                 weights_only=True)
        except Exception as exc:  # torch raises several types for truncated or foreign files
            raise CheckpointError(f"corrupt or truncated checkpoint {path}: "
                                  f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    if not isinstance(payload, dict) or "config" not in payload or "model" not in payload:
        raise CheckpointError(f"{path} is not a diffae checkpoint")
    version = payload.get("format")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has no valid checkpoint format field ({version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}, written by a newer diffae; this "
                              f"diffae reads formats up to {FORMAT_VERSION}; upgrade diffae to load it")
    return payload


def config_of(payload: dict, path: str | Path = "checkpoint") -> Config:
    try:
        return Config.from_dict(json.loads(payload["config"]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: its config is unreadable ({exc})") from None


def load_model_state(model: torch.nn.Module, state: dict, path: str | Path, what: str = "model") -> None:
    """load_state_dict with a message that names the mismatch instead of a wall of keys."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path}: {what} weights do not fit this architecture ({first})") from None
