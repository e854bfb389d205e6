"""The one record schema, and WebDataset shards of records with a manifest.

Layout of a split folder: `shard-000000.tar ...` plus `manifest.json`. A shard is written to a
temporary name and renamed when complete; the manifest lists each complete shard with its record
count and sha256, so a truncated or corrupt shard is caught before it is read, by name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .errors import BadInput

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass
class Record:
    """One (query, explanation) example about a target model's behaviour."""

    record_id: str
    """Unique key; only [A-Za-z0-9_-] (WebDataset splits keys at dots)."""
    task: str
    """Task name, e.g. 'input_ablation'."""
    target: str
    """Name of the target model (a key of the run config's `models`)."""
    split: str
    """'train' or 'test' (or 'raw' before balancing)."""
    source_id: str
    """The source prompt this record came from; train and test never share one."""
    prompt: str
    """The target's input the question is about (with the span present)."""
    question: str
    """What the explainer is asked about the prompt."""
    explanation: str
    """Gold answer text the explainer is trained to produce."""
    changed: bool
    """Whether the intervention changed the target's output."""
    output_before: str
    """Target's answer without the intervention."""
    output_after: str
    """Target's answer with the intervention."""
    query: dict = field(default_factory=dict)
    """Task-specific query fields (span, kind, hint letter, ...), all JSON-serialisable."""
    layers: Optional[list[int]] = None
    """Target layers the vector comes from, for vector tasks."""
    token_type: Optional[str] = None
    """Token type of the intervened position, for patching."""
    vector: Optional[np.ndarray] = None
    """The injected vector, for vector tasks (stored as <key>.vec.npy)."""


def safe_key(*parts: str) -> str:
    """A WebDataset key from parts: no dots, no slashes."""
    return "-".join(_KEY_SAFE.sub("_", p) for p in parts)


def record_to_sample(rec: Record) -> dict:
    meta = {k: v for k, v in dataclasses.asdict(rec).items() if k != "vector"}
    meta["schema"] = SCHEMA_VERSION
    sample = {"__key__": rec.record_id, "json": json.dumps(meta).encode()}
    if rec.vector is not None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(rec.vector, dtype=np.float32))
        sample["vec.npy"] = buf.getvalue()
    return sample


def sample_to_record(meta: dict, vec_bytes: Optional[bytes]) -> Record:
    meta = dict(meta)
    meta.pop("schema", None)
    vector = np.load(io.BytesIO(vec_bytes)) if vec_bytes is not None else None
    return Record(**meta, vector=vector)


class ShardError(BadInput, RuntimeError):
    """A shard that is missing, truncated or corrupt; the message names the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def temporary_name(path: Path) -> Path:
    """Where a shard is written before it is complete (per process, so writers never collide)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_tar(path: Path, records: list[Record]) -> None:
    """Write records as WebDataset samples to `path` (not atomic: see write_shard)."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as sink:  # fixed times: the same records give the same bytes
        for rec in records:
            sink.write(record_to_sample(rec))


def remove_temporaries(folder: Path) -> int:
    """Delete shards left half-written by dead writers; returns how many."""
    stale = list(folder.glob(".shard-*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_shard(path: Path, records: list[Record]) -> dict:
    """Write records to `path` atomically (temporary name, fsync, rename); return its manifest entry: count,
    sha256 and `layers`, the distinct target layers its vectors come from (what Pi must map, read without
    loading the vectors)."""
    tmp = temporary_name(path)
    write_tar(tmp, records)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"count": len(records), "sha256": sha256_file(path),
            "layers": [list(group) for group in sorted(_vector_layers(records))]}


def _vector_layers(records: Iterable[Record]) -> set[tuple[int, ...]]:
    """The distinct target layers the records' vectors come from."""
    return {tuple(r.layers) for r in records if r.vector is not None and r.layers is not None}


def split_layers(folder: Path) -> list[list[int]]:
    """The distinct target layers of a complete split's vectors, from its manifest (a shard written before
    manifests listed them is read)."""
    manifest, found = read_manifest(folder), set()
    for name, entry in manifest["shards"].items():
        if "layers" in entry:
            found.update(tuple(group) for group in entry["layers"])
        else:
            found.update(_vector_layers(read_shard(folder / name, entry["sha256"])))
    return [list(group) for group in sorted(found)]


def _whole(urls):
    return urls


def read_shard(path: Path, expected_sha256: Optional[str] = None) -> list[Record]:
    """All records of one shard; a missing, corrupt or truncated file raises ShardError naming it."""
    if not path.exists():
        raise ShardError(f"shard {path} is listed in its manifest but missing; rerun the groundtruth stage to make it again")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise ShardError(f"shard {path} is corrupt or truncated (sha256 differs from {MANIFEST}); delete it and rerun "
                         "the groundtruth stage")
    import webdataset as wds

    try:
        # Every caller wants the whole shard, whatever rank it runs on: record-level splitting across
        # ranks happens in training (equal step counts), so no node or worker splitting here.
        dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, handler=wds.reraise_exception,
                                 nodesplitter=_whole, workersplitter=_whole)
        samples = list(dataset)
    except Exception as err:  # tarfile, EOF and decoding errors all mean the same thing here
        raise ShardError(f"shard {path} is unreadable: {type(err).__name__}: {err}") from None
    records = []
    for sample in samples:
        key = sample["__key__"]
        if "json" not in sample:
            raise ShardError(f"shard {path}: sample {key!r} has no .json part")
        try:
            records.append(sample_to_record(json.loads(sample["json"]), sample.get("vec.npy")))
        except (ValueError, TypeError) as err:
            raise ShardError(f"shard {path}: sample {key!r} does not match the record schema: {err}") from None
    return records


# ---------------------------------------------------------------- manifests
def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        return {"config_hash": None, "shards": {}, "complete": False}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"manifest {path} is not valid JSON ({err}); delete the folder and rerun the stage") from None


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a reader (or a rerun after a kill) sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(folder: Path, manifest: dict) -> None:
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def complete_shards(folder: Path, config_hash: str) -> dict[str, dict]:
    """Shards already complete for this config; a manifest of another config fails fast."""
    manifest = read_manifest(folder)
    if manifest["config_hash"] not in (None, config_hash):
        raise ShardError(
            f"{folder} holds shards made with another config (hash {manifest['config_hash']}, now {config_hash}); "
            "use another run name or delete that folder"
        )
    return {name: entry for name, entry in manifest["shards"].items() if (folder / name).exists()}


def split_complete(folder: Path, config_hash: str) -> bool:
    """A finished split of this config: complete manifest, same config hash, every listed shard present
    (a deleted shard makes the stage that wrote it run again)."""
    manifest = read_manifest(folder)
    return bool(manifest.get("complete")) and manifest.get("config_hash") == config_hash and \
        all((folder / name).exists() for name in manifest["shards"])


def data_fingerprint(folder: Path) -> str:
    """What a split holds, independent of where it lies: a hash of its shards' sha256 and counts."""
    shards = read_manifest(folder)["shards"]
    blob = json.dumps({name: [e["sha256"], e["count"]] for name, e in sorted(shards.items())})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def iter_records(folder: Path) -> Iterator[Record]:
    """Records of a complete split folder in shard order, each shard checked against the manifest."""
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise ShardError(f"{folder} has no complete {MANIFEST}: run the groundtruth stage first")
    for name in sorted(manifest["shards"]):
        entry = manifest["shards"][name]
        records = read_shard(folder / name, entry["sha256"])
        if len(records) != entry["count"]:
            raise ShardError(f"shard {folder / name} holds {len(records)} records, manifest says {entry['count']}")
        yield from records


def write_split(folder: Path, records: list[Record], config_hash: str, shard_size: int) -> dict:
    """Write a finished split (train/test) as shards plus a complete manifest; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("shard-*.tar"):
        stale.unlink()
    shards = {}
    for index, start in enumerate(range(0, max(len(records), 1), shard_size)):  # an empty split: one empty shard
        shards[shard_name(index)] = write_shard(folder / shard_name(index), records[start:start + shard_size])
    manifest = {"config_hash": config_hash, "shards": shards, "complete": True, "count": len(records)}
    write_manifest(folder, manifest)
    return manifest
