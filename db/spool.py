"""The outage spool: batches the database could not take, kept on disk until it can.

Two layers:

- Framing (pure, no I/O): :func:`encode_batch` / :func:`decode_frames`. A frame is
  ``b"GSP1" | u32 length | u32 crc32(payload) | payload`` (big-endian), the payload an orjson
  object ``{"batch_id", "fields", "rows"}`` where ``rows`` are value lists in ``fields`` order
  (field names travel with the data, so a spool written by an older model still decodes; unknown
  fields are ignored), plus, when the batch has them, ``"positions"`` (positions snapshots, their
  positions as value lists in ``"position_fields"`` order), ``"sessions"`` (session events, each
  an object with a ``"type"``), ``"pid"`` and ``"host"`` (the engine that received the sessions).
  Frames written before those keys existed decode with none. The frame holds model values
  (``GreeksSnapshot`` fields), not table columns: a spool written for an older table layout (the
  wide history of schema 0002) replays into the current one. A torn or corrupt frame ends
  decoding: everything before it is kept.
- :class:`Spool` (blocking file I/O; async callers use ``anyio.to_thread``): numbered segment
  files ``spool-NNNNNNNNNNNN.seg`` in one directory, appended and fsync'ed per call, replayed
  oldest first and deleted once replayed. Over ``max_bytes`` the oldest segments are deleted and
  their rows counted as dropped: the newest data is what survives a long outage.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import orjson

from db.batch import Batch
from normalize.events import PositionsSnapshot, SessionEnded, SessionEvent, SessionStarted
from normalize.model import SNAPSHOT_FIELDS, AssetClass, GreeksSnapshot, Right, UnifiedPosition

MAGIC = b"GSP1"
_HEADER = struct.Struct(">4sII")
HEADER_SIZE = _HEADER.size
_DATE_FIELDS = frozenset(n for n, t in GreeksSnapshot.__annotations__.items() if "date" in str(t))
_REQUIRED = frozenset(SNAPSHOT_FIELDS) - frozenset(GreeksSnapshot._field_defaults)
POSITION_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UnifiedPosition))
_SESSION_TYPES: dict[str, type[SessionStarted] | type[SessionEnded]] = {
    "started": SessionStarted,
    "ended": SessionEnded,
}
_SESSION_FIELDS = {cls: frozenset(f.name for f in dataclasses.fields(cls)) for cls in _SESSION_TYPES.values()}


# -- framing (pure) ---------------------------------------------------------------------------


def encode_batch(batch: Batch) -> bytes:
    """One frame holding ``batch`` (NaN and infinities become ``None``: "no value")."""
    doc: dict[str, Any] = {
        "batch_id": str(batch.batch_id),
        "fields": SNAPSHOT_FIELDS,
        "rows": [list(r) for r in batch.rows],
    }
    if batch.positions:
        doc["position_fields"] = POSITION_FIELDS
        doc["positions"] = [
            {
                "broker": p.broker,
                "accounts": p.accounts,
                "as_of": p.as_of,
                "positions": [[getattr(u, name) for name in POSITION_FIELDS] for u in p.positions],
            }
            for p in batch.positions
        ]
    if batch.sessions:
        doc["sessions"] = [_encode_session(e) for e in batch.sessions]
    if batch.pid is not None:
        doc["pid"] = batch.pid
    if batch.engine_host is not None:
        doc["host"] = batch.engine_host
    try:
        payload = orjson.dumps(doc)
    except TypeError:  # an int beyond 64 bits (bad data on its way to rejected/): kept as text
        payload = orjson.dumps(_json_safe(doc))
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return str(value)
    return value


def _encode_session(event: SessionEvent) -> dict[str, Any]:
    kind = "started" if isinstance(event, SessionStarted) else "ended"
    return {"type": kind, **{f.name: getattr(event, f.name) for f in dataclasses.fields(event)}}


def _decode_payload(payload: bytes) -> Batch:
    doc = orjson.loads(payload)
    names: list[str] = doc["fields"]
    keep = [(i, n) for i, n in enumerate(names) if n in SNAPSHOT_FIELDS]
    missing = _REQUIRED - set(names)
    if missing:
        raise ValueError(f"spool frame lacks required fields {sorted(missing)}")
    rows = []
    for values in doc["rows"]:
        kwargs: dict[str, Any] = {}
        for i, name in keep:
            value = values[i]
            if name in _DATE_FIELDS and isinstance(value, str):
                value = date.fromisoformat(value)
            kwargs[name] = value
        rows.append(GreeksSnapshot(**kwargs))
    positions = tuple(_decode_positions(doc["position_fields"], p) for p in doc.get("positions", ()))
    sessions = tuple(_decode_session(e) for e in doc.get("sessions", ()))
    return Batch(uuid.UUID(doc["batch_id"]), rows, positions, sessions, doc.get("pid"), doc.get("host"))


def _enum(kind: type[AssetClass] | type[Right], value: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        return value  # a value this code does not know: kept as text


def _decode_positions(names: list[str], doc: dict[str, Any]) -> PositionsSnapshot:
    positions = []
    for values in doc["positions"]:
        kwargs = {n: v for n, v in zip(names, values, strict=True) if n in POSITION_FIELDS}
        if isinstance(kwargs.get("expiry"), str):
            kwargs["expiry"] = date.fromisoformat(kwargs["expiry"])
        kwargs["asset_class"] = _enum(AssetClass, kwargs["asset_class"])
        if kwargs.get("right") is not None:
            kwargs["right"] = _enum(Right, kwargs["right"])
        positions.append(UnifiedPosition(**kwargs))
    return PositionsSnapshot(doc["broker"], tuple(doc["accounts"]), tuple(positions), doc["as_of"])


def _decode_session(doc: dict[str, Any]) -> SessionEvent:
    cls = _SESSION_TYPES[doc["type"]]
    kwargs = {k: v for k, v in doc.items() if k in _SESSION_FIELDS[cls]}
    if "accounts" in kwargs:
        kwargs["accounts"] = tuple(kwargs["accounts"])
    return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class Decoded:
    batches: list[Batch]
    valid_bytes: int  # length of the intact prefix
    error: str | None  # why decoding stopped early (torn tail, bad crc, bad payload)


def decode_frames(data: bytes) -> Decoded:
    """Decode consecutive frames; stop at the first incomplete or corrupt one."""
    batches: list[Batch] = []
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < HEADER_SIZE:
            return Decoded(batches, pos, "torn frame header")
        magic, length, crc = _HEADER.unpack_from(data, pos)
        if magic != MAGIC:
            return Decoded(batches, pos, "bad frame magic")
        start = pos + HEADER_SIZE
        if end - start < length:
            return Decoded(batches, pos, "torn frame payload")
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            return Decoded(batches, pos, "frame checksum mismatch")
        try:
            batches.append(_decode_payload(payload))
        except (ValueError, KeyError, TypeError) as exc:
            return Decoded(batches, pos, f"bad frame payload: {exc}")
        pos = start + length
    return Decoded(batches, pos, None)


# -- segment files (blocking I/O) ---------------------------------------------------------------


@dataclass(slots=True)
class Segment:
    path: Path
    bytes: int
    rows: int
    sealed: bool = False  # a failed append could not be undone: no more appends here


@dataclass(frozen=True, slots=True)
class AppendResult:
    dropped_rows: int
    dropped_bytes: int


class Spool:
    """Append-only, fsync'ed, segmented batch spool in ``directory``."""

    def __init__(self, directory: Path, max_bytes: int, *, segment_bytes: int | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(1, min(64 << 20, max_bytes // 8))
        self.segments: list[Segment] = []
        self.repaired: list[str] = []  # what open() had to cut off (logged by the caller)
        self._next = 1
        self._leased: Path | None = None
        # Rows of replayed segments that could not be decoded (a torn or corrupt frame): the
        # caller adds the increase to its dropped count; ``lease_error`` says why, per lease.
        self.lost_rows = 0
        self.lease_error: str | None = None

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def open(self) -> Spool:
        """Scan existing segments (a previous run's spool), cutting off torn tails.

        The segments hold account numbers and positions: the directory is made (or narrowed
        to) 0700 and every segment file to 0600, whatever the umask or an earlier version left.
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.segments = []
        for path in sorted(self.directory.glob("spool-*.seg")):
            os.chmod(path, 0o600)
            data = path.read_bytes()
            decoded = decode_frames(data)
            if decoded.error is not None:
                self.repaired.append(
                    f"{path.name}: {decoded.error} at byte {decoded.valid_bytes}, "
                    f"{len(data) - decoded.valid_bytes} bytes cut"
                )
                with path.open("r+b") as fh:
                    fh.truncate(decoded.valid_bytes)
                    os.fsync(fh.fileno())
            rows = sum(len(b) for b in decoded.batches)
            if decoded.valid_bytes == 0:
                path.unlink()
                continue
            self.segments.append(Segment(path, decoded.valid_bytes, rows))
            self._next = max(self._next, int(path.stem.split("-")[1]) + 1)
        return self

    def append(self, batches: Sequence[Batch]) -> AppendResult:
        """Write ``batches`` to the newest segment and fsync; then enforce ``max_bytes``."""
        if not batches:
            return AppendResult(0, 0)
        data = b"".join(encode_batch(b) for b in batches)
        rows = sum(len(b) for b in batches)
        seg = self.segments[-1] if self.segments else None
        if seg is None or seg.sealed or seg.bytes >= self.segment_bytes or seg.path == self._leased:
            seg = self._new_segment()
        try:
            with seg.path.open("ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            self._undo_append(seg)
            raise
        seg.bytes += len(data)
        seg.rows += rows
        return self._enforce_limit()

    def lease_oldest(self) -> tuple[Path, list[Batch]] | None:
        """Read the oldest segment for replay; new appends go to a fresh segment meanwhile.

        Call :meth:`release` after its batches are committed, and ``None`` means empty.
        """
        if not self.segments:
            return None
        seg = self.segments[0]
        self._leased = seg.path
        decoded = decode_frames(seg.path.read_bytes())
        self.lease_error = None
        if decoded.error is not None:
            lost = max(0, seg.rows - sum(len(b) for b in decoded.batches))
            self.lost_rows += lost
            self.lease_error = (
                f"{seg.path.name}: {decoded.error} at byte {decoded.valid_bytes}, {lost} rows unreadable"
            )
        return seg.path, decoded.batches

    def release(self, path: Path) -> None:
        """Delete a replayed segment."""
        self._leased = None
        self.segments = [s for s in self.segments if s.path != path]
        path.unlink(missing_ok=True)
        self._fsync_dir()

    def _undo_append(self, seg: Segment) -> None:
        """Cut a partly written frame (ENOSPC, EIO) back off, so that later appends are not
        stranded behind a torn frame; if even that fails, seal the segment."""
        try:
            with seg.path.open("r+b") as fh:
                fh.truncate(seg.bytes)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            seg.sealed = True

    def _new_segment(self) -> Segment:
        path = self.directory / f"spool-{self._next:012d}.seg"
        self._next += 1
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._fsync_dir()
        seg = Segment(path, 0, 0)
        self.segments.append(seg)
        return seg

    def _enforce_limit(self) -> AppendResult:
        dropped_rows = dropped_bytes = 0
        while self.bytes > self.max_bytes and len(self.segments) > 1:
            victim = next((s for s in self.segments[:-1] if s.path != self._leased), None)
            if victim is None:
                break
            self.segments.remove(victim)
            victim.path.unlink(missing_ok=True)
            dropped_rows += victim.rows
            dropped_bytes += victim.bytes
        if dropped_rows:
            self._fsync_dir()
        return AppendResult(dropped_rows, dropped_bytes)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def total_rows(batches: Iterable[Batch]) -> int:
    return sum(len(b) for b in batches)
