"""Read the records of a W&B offline run's transaction log (run-<id>.wandb): W&B's LevelDB-style log of
protobuf Records (7-byte file header ':W&B' + magic + version, then 32 KiB blocks of records, each with a
7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        out.append(record)
    return out


def history(path: Path) -> list[dict]:
    """Every history row of the run, as {key: value}; a logged dict (a wandb.Table's description, say)
    comes back nested, as it was logged."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            *parents, last = list(item.nested_key) or [item.key]
            node = row
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = json.loads(item.value_json)
        rows.append(row)
    return rows


def run_info(path: Path) -> dict:
    """The run record's name, group and job type."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return {"name": record.run.display_name, "group": record.run.run_group, "job_type": record.run.job_type}
    return {}
