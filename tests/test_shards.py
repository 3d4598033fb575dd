import numpy as np
import pytest

import stackcore as sc


def test_token_round_trip_uint16_and_uint32(tmp_path):
    small = np.random.default_rng(0).integers(0, 50_000, 1000)
    path = sc.write_shard(tmp_path / "train_000000.bin", small, vocab_size=50_000)
    assert np.fromfile(path, np.int32, 3).tolist() == [sc.SHARD_MAGIC, 1, 1000]  # modded's header, uint16 items
    assert np.array_equal(sc.read_shard(path, vocab_size=50_000), small)
    large = np.random.default_rng(1).integers(0, 200_000, 777)
    path = sc.write_shard(tmp_path / "train_000001.bin", large, vocab_size=200_000)
    assert np.fromfile(path, np.int32, 2)[1] == 2
    assert np.array_equal(sc.read_shard(path), large)


def test_side_files_round_trip(tmp_path):
    shard = tmp_path / "sft_000000.bin"
    mask = np.random.default_rng(0).integers(0, 2, 300).astype(np.uint8)
    records = np.arange(40, dtype=np.int32).reshape(10, 4)
    sc.write_shard(sc.side_file(shard, "mask"), mask, "mask")
    sc.write_shard(sc.side_file(shard, "records"), records, "records")
    assert sc.side_file(shard, "mask").name == "sft_000000.mask.bin"
    assert np.array_equal(sc.read_shard(sc.side_file(shard, "mask")), mask)
    got = sc.read_shard(sc.side_file(shard, "records"))
    assert got.shape == (10, 4) and np.array_equal(got, records)


def test_reads_a_shard_in_modded_nanogpt_layout(tmp_path):
    """modded writes 256 int32 (magic, version 1, count, zeros) then uint16 tokens."""
    tokens = np.arange(5000, dtype=np.uint16)
    header = np.zeros(256, np.int32)
    header[:3] = (20240520, 1, len(tokens))
    path = tmp_path / "fineweb_train_000001.bin"
    path.write_bytes(header.tobytes() + tokens.tobytes())
    assert sc.list_shards(tmp_path, "train") == [path]
    assert np.array_equal(sc.read_shard(path, vocab_size=50257), tokens)


def test_truncated_file(tmp_path):
    path = sc.write_shard(tmp_path / "train_000000.bin", np.arange(100), vocab_size=512)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(sc.ShardError, match=r"train_000000.bin: truncated"):
        sc.read_shard(path)
    path.write_bytes(b"\0" * 100)
    with pytest.raises(sc.ShardError, match=r"train_000000.bin: truncated: 100 bytes"):
        sc.read_shard(path)


def test_wrong_magic_and_unknown_version(tmp_path):
    path = sc.write_shard(tmp_path / "val_000000.bin", np.arange(10), vocab_size=512)
    data = bytearray(path.read_bytes())
    data[0:4] = np.int32(12345).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(sc.ShardError, match=r"val_000000.bin: not a shard \(magic number 12345"):
        sc.read_shard(path)
    data[0:4] = np.int32(sc.SHARD_MAGIC).tobytes()
    data[4:8] = np.int32(9).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(sc.ShardError, match="unknown shard version 9"):
        sc.read_shard(path)


def test_token_beyond_vocabulary(tmp_path):
    path = sc.write_shard(tmp_path / "train_000000.bin", np.array([1, 2, 600]))
    with pytest.raises(sc.ShardError, match=r"train_000000.bin: token id 600 is beyond the vocabulary of 512"):
        sc.read_shard(path, vocab_size=512)
    with pytest.raises(sc.ShardError, match=r"must lie in \[0, 512\)"):
        sc.write_shard(tmp_path / "x.bin", np.array([512]), vocab_size=512)


def test_missing_directory_and_missing_split(tmp_path):
    with pytest.raises(sc.ShardError, match=r"nope: shard directory not found"):
        sc.list_shards(tmp_path / "nope", "train")
    sc.write_shard(tmp_path / "train_000000.bin", np.arange(10))
    with pytest.raises(sc.ShardError, match=r"no 'val' shards"):
        sc.list_shards(tmp_path, "val")
    with pytest.raises(sc.ShardError, match="no such shard file"):
        sc.read_shard(tmp_path / "val_000000.bin")


def test_writer_keeps_documents_whole(tmp_path):
    writer = sc.ShardWriter(tmp_path, "train", shard_tokens=100, vocab_size=512)
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[511], rng.integers(0, 500, rng.integers(1, 60))]) for _ in range(40)]
    for doc in docs:
        writer.add(doc)
    writer.flush()
    shards = [sc.read_shard(p, 512) for p in sc.list_shards(tmp_path, "train")]
    assert all(s[0] == 511 and len(s) <= 100 for s in shards)
    assert np.array_equal(np.concatenate(shards), np.concatenate(docs))
    assert sum(n for _, _, n in writer.written) == 40
    assert not list(tmp_path.glob("*.tmp"))


def test_shards_stamped_by_another_tokenizer_are_refused(tmp_path, stack_home):
    """02 stamps each shard folder with its tokenizer's fingerprint; 03-06 refuse the folder with another tokenizer,
    even one of the same vocabulary size, naming the stamp and the notebook to run again."""
    from types import SimpleNamespace

    from data.tokenizing import SHARDS_STAMP, check_shards_tokenizer, stamp_shards

    writer, reader = SimpleNamespace(fingerprint="aaaaaaaaaaaa"), SimpleNamespace(fingerprint="bbbbbbbbbbbb")
    check_shards_tokenizer(tmp_path, reader)  # no stamp (older shards, modded-nanogpt's): taken as they are
    stamp_shards(tmp_path / "pretrain", writer)
    check_shards_tokenizer(tmp_path / "pretrain", writer)
    with pytest.raises(sc.ShardError) as error:
        check_shards_tokenizer(tmp_path / "pretrain", reader)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'pretrain' / SHARDS_STAMP}: ")
    assert "run notebooks/02_sharding again" in message
    assert "'aaaaaaaaaaaa'" in message and "'bbbbbbbbbbbb'" in message and str(stack_home / "tokenizer") in message


def test_a_shard_folder_that_02_did_not_finish_is_refused(tmp_path):
    """02 marks a folder unfinished before it writes, so that a run cut short is not vouched for by the stamp of an
    earlier run of the same tokenizer; the finished stamp replaces the mark."""
    from types import SimpleNamespace

    from data.tokenizing import check_shards_tokenizer, stamp_shards

    tokenizer = SimpleNamespace(fingerprint="aaaaaaaaaaaa")
    stamp_shards(tmp_path, tokenizer)
    stamp_shards(tmp_path, None)  # the next run of 02 starts, and stops before its end
    with pytest.raises(sc.ShardError, match="02_sharding stopped before it had written every shard in"):
        check_shards_tokenizer(tmp_path, tokenizer)
    stamp_shards(tmp_path, tokenizer)
    check_shards_tokenizer(tmp_path, tokenizer)
