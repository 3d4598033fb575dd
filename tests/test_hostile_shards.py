"""Hostile input to the shard writer, the shard reader and the pretraining loader: each case is refused with a
message naming the file, or read correctly; nothing is wrapped, cast or looped over silently."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stackcore as sc

BOS = 511


def refused(path, items, kind="tokens", vocab_size=0, match=""):
    with pytest.raises(sc.ShardError, match=match) as error:
        sc.write_shard(path, items, kind, vocab_size)
    assert str(path) in str(error.value)
    assert not path.exists() and not path.with_name(path.name + ".tmp").exists()  # nothing half written


# --- The writer -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,shape", [("tokens", (6,)), ("mask", (6,)), ("records", (3, 2))])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.complex64])
def test_non_integer_arrays_are_refused(tmp_path, kind, shape, dtype):
    refused(tmp_path / "x.bin", np.ones(shape, dtype), kind, match=f"{kind} must be integers, got an array of")


@pytest.mark.parametrize("items", [["a", "b"], [1, "2"], [object(), object()], [1.5, 2.0]],
                         ids=["strings", "mixed", "objects", "float list"])
def test_lists_that_are_not_integers_are_refused(tmp_path, items):
    refused(tmp_path / "x.bin", np.asarray(items), match="must be integers")


@pytest.mark.parametrize("token", [65_536, 70_000, 2**31, 2**40])
def test_ids_beyond_uint16_without_a_vocabulary_are_refused_not_wrapped(tmp_path, token):
    refused(tmp_path / "x.bin", np.array([1, token]), match=r"do not fit uint16 \[0, 65535\]: pass the tokenizer's")


@pytest.mark.parametrize("vocab_size", [0, 512, 200_000])
def test_negative_ids_are_refused(tmp_path, vocab_size):
    refused(tmp_path / "x.bin", np.array([3, -1]), vocab_size=vocab_size, match=r"token ids must lie in \[0, ")


@pytest.mark.parametrize("vocab_size,token", [(512, 512), (512, 60_000), (200_000, 200_000), (70_000, 2**31)])
def test_ids_at_or_beyond_the_vocabulary_are_refused(tmp_path, vocab_size, token):
    refused(tmp_path / "x.bin", np.array([0, token]), vocab_size=vocab_size,
            match=rf"token ids must lie in \[0, {vocab_size}\), got \[0, {token}\]")


def test_ids_beyond_uint32_are_refused(tmp_path):
    refused(tmp_path / "x.bin", np.array([0, 2**32 + 5], np.int64), vocab_size=2**33, match="do not fit uint32")


@pytest.mark.parametrize("value", [-1, 2, 256, 1000])
def test_mask_values_outside_uint8_or_bits(tmp_path, value):
    if 0 <= value <= 255:  # a uint8 fits; the SFT loader checks that masks are 0/1 when it reads them
        assert sc.read_shard(sc.write_shard(tmp_path / "x.bin", np.array([0, value]), "mask")).tolist() == [0, value]
    else:
        refused(tmp_path / "x.bin", np.array([0, value]), "mask", match=r"mask values .* do not fit uint8")


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, 2**40])
def test_record_values_outside_int32_are_refused(tmp_path, value):
    refused(tmp_path / "x.bin", np.array([[0, 1], [2, value]]), "records", match="records values .* do not fit int32")


@pytest.mark.parametrize("shape", [(6,), (2, 2, 2)])
def test_records_must_be_a_table(tmp_path, shape):
    refused(tmp_path / "x.bin", np.zeros(shape, np.int32), "records", match="records must be a 2-D table")


@pytest.mark.parametrize("items,kind,vocab_size", [
    (np.array([True, False, True]), "mask", 0),
    (np.array([1, 65_535], np.uint64), "tokens", 0),
    (np.array([70_000], np.int64), "tokens", 200_000),
    (np.array([], np.float64), "tokens", 0),  # np.asarray([]) is float64: an empty shard is still a shard
    (np.array([[-5, 2**31 - 1]], np.int64), "records", 0),
], ids=["bool mask", "uint64 ids that fit", "uint32 ids", "empty", "int32 extremes"])
def test_integer_arrays_that_fit_round_trip(tmp_path, items, kind, vocab_size):
    path = sc.write_shard(tmp_path / "x.bin", items, kind, vocab_size)
    assert sc.read_shard(path).tolist() == items.astype(np.int64).tolist()


def test_refusal_keeps_the_previous_shard(tmp_path):
    path = sc.write_shard(tmp_path / "x.bin", np.arange(5))
    with pytest.raises(sc.ShardError):
        sc.write_shard(path, np.array([0.5]))
    assert sc.read_shard(path).tolist() == [0, 1, 2, 3, 4]


# --- The reader -------------------------------------------------------------------------------------------------

def header(magic=sc.SHARD_MAGIC, version=1, count=4, vocab=0, width=1) -> bytes:
    values = np.zeros(sc.HEADER_INTS, np.int32)
    values[:5] = (magic, version, count, vocab, width)
    return values.tobytes()


DAMAGED = [
    ("empty file", b"", "truncated: 0 bytes is less than the 1024-byte header"),
    ("half a header", header()[:500], "truncated: 500 bytes"),
    ("text file", b"hello world\n" * 100, "not a shard"),
    ("wrong magic", header(magic=1234) + bytes(8), "not a shard \\(magic number 1234"),
    ("version 0", header(version=0) + bytes(8), "unknown shard version 0"),
    ("version 9", header(version=9) + bytes(8), "unknown shard version 9"),
    ("negative version", header(version=-1) + bytes(8), "unknown shard version -1"),
    ("short body", header(count=4) + bytes(6), "truncated or padded: header promises 1032 bytes, file has 1030"),
    ("padded body", header(count=4) + bytes(10), "truncated or padded"),
    ("negative count", header(count=-4) + bytes(8), "truncated or padded"),
    ("huge count", header(count=2**31 - 1) + bytes(8), "truncated or padded"),
    ("records width lies", header(version=4, count=2, width=3) + bytes(8 * 4), "truncated or padded"),
    ("uint32 body for uint16", header(version=2, count=4) + bytes(8), "truncated or padded"),
]


@pytest.mark.parametrize("name,data,message", DAMAGED, ids=[case[0] for case in DAMAGED])
def test_damaged_shards_name_the_file(tmp_path, name, data, message):
    path = tmp_path / "train_000000.bin"
    path.write_bytes(data)
    with pytest.raises(sc.ShardError, match=f"{path}: {message}"):
        sc.read_shard(path)


def test_a_folder_is_not_a_shard(tmp_path):
    (tmp_path / "train_000000.bin").mkdir()
    with pytest.raises(sc.ShardError, match="train_000000.bin: no such shard file"):
        sc.read_shard(tmp_path / "train_000000.bin")


@pytest.mark.parametrize("stamp", [b"", b"\xff\xfe\x00garbage", b"x" * 10_000_000, b"3d30a33561ed\n" * 2],
                         ids=["empty", "binary", "ten megabytes", "twice"])
def test_a_damaged_tokenizer_stamp_refuses_its_shards_by_name(tmp_path, stamp):
    from types import SimpleNamespace

    from data.tokenizing import SHARDS_STAMP, check_shards_tokenizer

    (tmp_path / SHARDS_STAMP).write_bytes(stamp)
    with pytest.raises(sc.ShardError, match="run notebooks/02_sharding again") as error:
        check_shards_tokenizer(tmp_path, SimpleNamespace(fingerprint="3d30a33561ed"))
    assert str(tmp_path / SHARDS_STAMP) in str(error.value) and len(str(error.value)) < 1000


def test_a_folder_in_place_of_the_tokenizer_stamp_is_no_stamp(tmp_path):
    from types import SimpleNamespace

    from data.tokenizing import SHARDS_STAMP, check_shards_tokenizer

    (tmp_path / SHARDS_STAMP).mkdir()
    check_shards_tokenizer(tmp_path, SimpleNamespace(fingerprint="3d30a33561ed"))


def test_ids_beyond_the_readers_vocabulary(tmp_path):
    path = sc.write_shard(tmp_path / "train_000000.bin", np.array([BOS, 3, 900]), vocab_size=1024)
    with pytest.raises(sc.ShardError, match="token id 900 is beyond the vocabulary of 512"):
        sc.read_shard(path, vocab_size=512)


# --- The loader -------------------------------------------------------------------------------------------------

def loader(directory, tokens=32, bos_id=BOS, world_size=1):
    return sc.PretrainLoader(directory, "train", tokens=tokens, bos_id=bos_id, vocab_size=512, max_doc_len=64,
                             world_size=world_size)


def write(directory, *shards):
    for index, tokens in enumerate(shards):
        sc.write_shard(directory / f"train_{index:06d}.bin", np.asarray(tokens), vocab_size=512)


UNBATCHABLE = {
    "no BOS at all": [np.arange(1, 200) % 500],
    "no BOS in two shards": [np.arange(1, 200) % 500, np.arange(2, 300) % 500],
    "BOS only at the end": [np.r_[np.arange(1, 200) % 500, BOS]],
    "BOS too late in every shard": [np.r_[np.ones(180, int), BOS, np.ones(20, int)]] * 3,
}


@pytest.mark.parametrize("shards", UNBATCHABLE.values(), ids=UNBATCHABLE.keys())
def test_shards_with_no_row_start_raise_instead_of_looping(tmp_path, shards):
    write(tmp_path, *shards)
    data = loader(tmp_path)
    with pytest.raises(sc.ShardError, match=rf"{tmp_path}: no shard of train_000000.bin.* has a document start "
                                            rf"\(BOS id {BOS}\) followed by 32 tokens"):
        data.next_batch()


def test_wrong_bos_id_raises_instead_of_looping(tmp_path):
    write(tmp_path, np.r_[BOS, np.arange(1, 200) % 500])
    with pytest.raises(sc.ShardError, match="BOS id 505"):
        loader(tmp_path, bos_id=505).next_batch()  # 505 is nowhere in the shard


@pytest.mark.parametrize("world_size", [1, 4])
def test_shards_shorter_than_a_step(tmp_path, world_size):
    write(tmp_path, np.r_[BOS, np.arange(1, 60)])
    with pytest.raises(sc.ShardError, match=rf"train_000000.bin: 60 tokens is too few for {world_size} rank"):
        loader(tmp_path, tokens=64 // world_size * world_size if world_size > 1 else 64, world_size=world_size)


def test_a_bad_shard_among_good_ones_is_skipped(tmp_path):
    good = np.r_[BOS, np.arange(1, 100), BOS, np.arange(1, 100)]
    write(tmp_path, np.arange(1, 200) % 500, good)
    data = loader(tmp_path)
    for _ in range(6):
        assert data.next_batch().inputs[0].item() == BOS


def test_a_resumed_position_past_the_end_moves_on(tmp_path):
    write(tmp_path, np.r_[BOS, np.arange(1, 200)])
    data = loader(tmp_path)
    data.load_state_dict({"shard": 0, "offset": 10_000, "epoch": 0})
    assert data.next_batch().inputs[0].item() == BOS and data.position["epoch"] == 1


@pytest.mark.parametrize("split,files,message", [
    ("train", [], "no 'train' shards"),
    ("train", ["train_000000.mask.bin", "train_000000.records.bin"], "no 'train' shards"),
    ("val", ["train_000000.bin"], "no 'val' shards"),
])
def test_missing_shards(tmp_path, split, files, message):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(sc.ShardError, match=message):
        sc.list_shards(tmp_path, split)


# --- Side files: each shard kind where another is expected ------------------------------------------------------

@pytest.mark.parametrize("written, items, read_as", [
    ("mask", np.array([0, 1, 1]), dict(vocab_size=512)),
    ("records", np.array([[0, 3]]), dict(vocab_size=512)),
    ("tokens", np.array([BOS, 3, 4]), dict(kind="mask")),
    ("tokens", np.array([BOS, 3, 4]), dict(kind="records")),
    ("mask", np.array([0, 1, 1]), dict(kind="records")),
], ids=["mask_as_tokens", "records_as_tokens", "tokens_as_mask", "tokens_as_records", "mask_as_records"])
def test_a_shard_of_another_kind_is_refused(tmp_path, written, items, read_as):
    """A file of one kind copied where another belongs used to be read as that kind: a mask of bytes as token ids,
    or token ids as a mask that is 1 nowhere (a fine-tuning run that trains on nothing)."""
    path = sc.write_shard(tmp_path / "train_000000.bin", items, written)
    expected = read_as.get("kind", "tokens")
    with pytest.raises(sc.ShardError, match=rf"{path}: a {written} shard \(version \d\) where a {expected} shard"):
        sc.read_shard(path, **read_as)


def sft_shards(directory, mask_items=None, mask_kind="mask"):
    ids = np.r_[BOS, np.arange(1, 40), BOS, np.arange(1, 30)]
    path = sc.write_shard(directory / "train_000000.bin", ids, vocab_size=512)
    mask = (np.arange(len(ids)) % 2) if mask_items is None else mask_items(ids)
    sc.write_shard(sc.side_file(path, "mask"), mask, mask_kind)
    return path


@pytest.mark.parametrize("mask_items, mask_kind, message", [
    (lambda ids: ids, "tokens", r"train_000000.mask.bin: a tokens shard \(version 1\) where a mask shard"),
    (lambda ids: np.full(len(ids), 2), "mask", r"train_000000.mask.bin: 70 mask values \(one 0 or 1 per token, "
                                               r"largest 2\) for 70 tokens"),
    (lambda ids: np.ones(len(ids) - 1, int), "mask", r"69 mask values \(one 0 or 1 per token, largest 1\) for 70"),
], ids=["token_file_as_mask", "mask_of_twos", "mask_one_short"])
def test_a_conversation_mask_that_is_not_one_bit_per_token_is_refused(tmp_path, mask_items, mask_kind, message):
    sft_shards(tmp_path, mask_items, mask_kind)
    with pytest.raises(sc.ShardError, match=message):
        sc.SFTLoader(tmp_path, "train", tokens=128, bos_id=BOS, vocab_size=512, max_seq_len=64)


def test_a_mask_shard_named_as_a_token_shard_is_not_pretrained_on(tmp_path):
    sc.write_shard(tmp_path / "train_000000.bin", np.ones(300, int), "mask")
    with pytest.raises(sc.ShardError, match="a mask shard .* where a tokens shard was expected"):
        loader(tmp_path).next_batch()


def test_sft_micro_batch_shorter_than_the_context_names_the_setting(tmp_path):
    """05_sft with --micro_tokens below the base model's context ended in a ValueError traceback that named neither
    the setting nor a value that works."""
    sft_shards(tmp_path)
    with pytest.raises(sc.ConfigError, match=r"micro_tokens=32 is less than the model's context \(64 tokens\), which "
                                             r"a conversation may fill: pass --micro_tokens=64 or more"):
        sc.SFTLoader(tmp_path, "train", tokens=32, bos_id=BOS, vocab_size=512, max_seq_len=64)


def test_sharding_a_corpus_into_one_document_shards_finishes(stack_home, tiny_tokenizer):
    """A train shard of a single document (a max_chars of one document; shard_tokens below a document's length does
    the same) ended 02_sharding with an IndexError in the cell that shows where the second document starts."""
    shutil.copytree(tiny_tokenizer, stack_home / "tokenizer")
    env = {**os.environ, "STACK_HOME": str(stack_home), "STACK_PRESET": "tiny", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "notebooks/02_sharding.py", "--max_chars=1"],
                            cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "<- a new document starts" in result.stdout
