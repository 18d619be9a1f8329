"""Read an offline W&B run back (wandb >= 0.30 no longer ships a Python reader): the run
file is a LevelDB-style log of 32 KiB blocks after a 7-byte header (':W&B', 0xBEE1, version),
each record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a
piece of a serialized ``wandb_internal_pb2.Record``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, path
    pos, piece = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # zero padding to the end of the block
            pos += left - 7
            continue
        piece += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(piece)
            yield record
            piece = b""


def offline_run(wandb_dir: Path) -> tuple[dict, dict[int, dict[str, float]]]:
    """(config, {step: metrics}) of the one offline run under ``wandb_dir``."""
    runs = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    config, history = {}, {}
    for record in records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[int(items.pop("_step"))] = {k: v for k, v in items.items() if not k.startswith("_")}
    config.pop("_wandb", None)
    return config, history
