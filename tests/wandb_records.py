"""Read an offline W&B run file (``run-<id>.wandb``) without the W&B service.

The file is a LevelDB-style log (header ``:W&B`` + key + version, then 32 KiB blocks of
records: crc32, length, type) of protobuf ``Record`` messages (wandb.proto). wandb 0.31
reads it only in its Go core, so the tests read it here. Not a test module.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # both the file header and each record header are 7 bytes
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file")
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            yield parts + chunk


def read_run(run_dir: Path) -> dict:
    """project, name, history rows ({key: json value}), summary keys and files of a run."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    out = {"project": None, "name": None, "history": [], "summary": set(), "files": []}
    for payload in _payloads(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["project"], out["name"] = record.run.project, record.run.display_name
        elif kind == "history":
            out["history"].append(
                {(i.key or "/".join(i.nested_key)): i.value_json for i in record.history.item}
            )
        elif kind == "summary":
            out["summary"] |= {(u.key or u.nested_key[0]) for u in record.summary.update}
        elif kind == "files":
            out["files"] += [f.path for f in record.files.files]
    return out
