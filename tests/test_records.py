import json

import numpy as np
import pytest

from conftest import make_records
from selfexplain.groundtruth.records import (MANIFEST, ShardError, complete_shards, iter_records, read_shard, safe_key,
                                 write_manifest, write_shard, write_split)


def test_round_trip_with_vector(tmp_path):
    records = make_records(3)
    records[1].vector = np.arange(4, dtype=np.float32)
    entry = write_shard(tmp_path / "shard-000000.tar", records)
    back = read_shard(tmp_path / "shard-000000.tar", entry["sha256"])
    assert [r.record_id for r in back] == [r.record_id for r in records]
    assert back[0].vector is None and np.array_equal(back[1].vector, np.arange(4))
    assert back[2].explanation == records[2].explanation and back[2].query == records[2].query
    assert not list(tmp_path.glob(".*tmp")), "the temporary shard must be renamed away"


def test_keys_have_no_dots():
    assert "." not in safe_key("smollm2", "input_ablation", "St. Kitts/Nevis.capital")


def test_truncated_shard_names_the_file(tmp_path):
    entry = write_shard(tmp_path / "shard-000000.tar", make_records(20))
    data = (tmp_path / "shard-000000.tar").read_bytes()
    (tmp_path / "shard-000000.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="shard-000000.tar is corrupt or truncated"):
        read_shard(tmp_path / "shard-000000.tar", entry["sha256"])
    (tmp_path / "shard-000000.tar").write_bytes(data[:600])  # inside the first member's data
    with pytest.raises(ShardError, match="shard-000000.tar is unreadable"):
        read_shard(tmp_path / "shard-000000.tar")


def test_shards_of_the_same_records_are_the_same_bytes(tmp_path):
    first = write_shard(tmp_path / "a.tar", make_records(5))
    second = write_shard(tmp_path / "b.tar", make_records(5))
    assert first == second, "no time stamps in the tar: a shard made again has its manifest's sha256"


def test_split_folder_and_manifest_checks(tmp_path):
    write_split(tmp_path / "train", make_records(25), "hash1", shard_size=10)
    manifest = json.loads((tmp_path / "train" / MANIFEST).read_text())
    assert manifest["complete"] and manifest["count"] == 25 and len(manifest["shards"]) == 3
    assert len(list(iter_records(tmp_path / "train"))) == 25
    with pytest.raises(ShardError, match="another config"):
        complete_shards(tmp_path / "train", "hash2")
    (tmp_path / "train" / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match="shard-000001.tar is listed in its manifest but missing"):
        list(iter_records(tmp_path / "train"))


def test_incomplete_manifest_is_not_taken_as_done(tmp_path):
    write_shard(tmp_path / "raw" / "shard-000000.tar", make_records(2))
    write_manifest(tmp_path / "raw", {"config_hash": "h", "shards": {}, "complete": False})
    with pytest.raises(ShardError, match="no complete manifest.json"):
        list(iter_records(tmp_path / "raw"))
    assert complete_shards(tmp_path / "raw", "h") == {}
