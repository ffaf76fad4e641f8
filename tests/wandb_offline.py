"""Read what an offline wandb run recorded, without a server and without syncing.

An offline run keeps its records in ``offline-run-*/run-<id>.wandb``: a 7-byte header
(``:W&B``, magic, version) followed by a LevelDB-style log of 32 KiB blocks, each record
chunk prefixed by a CRC (4 bytes), a little-endian length (2 bytes) and a type (full,
first, middle, last). Each assembled record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a wandb run file")
    pos, out, pending = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if pos + _HEADER + length > len(data):  # a record still being written
            break
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
            pending = b""
        elif kind == 0 and length == 0:
            pos += left_in_block - _HEADER  # zero padding up to the next block
    return out


def read_offline_run(run_dir: str | Path, timeout_s: float = 60.0) -> dict[str, Any]:
    """Return ``{"summary": {...}, "history": [{...}, ...], "config": {...}, "complete": bool, "id",
    "group", "name"}``
    of an offline run directory (``.../wandb/offline-run-*``).

    ``wandb.finish()`` can return while wandb's service process is still flushing the run
    file, so the file is re-read until it holds the run's ``exit`` record, for at most
    ``timeout_s`` seconds; ``complete`` says whether that record was seen.
    """
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    deadline = time.monotonic() + timeout_s
    while True:
        run = _parse(files[0].read_bytes())
        if run["complete"] or time.monotonic() >= deadline:
            return run
        time.sleep(0.1)


def _parse(data: bytes) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    identity: dict[str, str] = {}
    complete = False
    for raw in _records(data):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            identity = {"id": record.run.run_id, "group": record.run.run_group, "name": record.run.display_name}
            config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "exit":
            complete = True
    last: dict[str, Any] = {}  # wandb's summary defaults to the last logged value of each key
    for row in history:
        last.update(row)
    return {"summary": {**last, **summary}, "history": history, "config": config, "complete": complete, **identity}


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)
