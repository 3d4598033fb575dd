import gzip
import json
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tiktoken

import stackcore as sc
from conftest import ROOT
from data.tokenizing import reference_encoding


def random_unicode_text(rng: random.Random, length: int) -> str:
    """Any code point but surrogates, mixed with spaces, digits and newlines."""
    pieces = []
    for _ in range(length):
        kind = rng.random()
        if kind < 0.3:
            pieces.append(rng.choice(" \n\t0123456789"))
        else:
            code = rng.randint(0x20, 0x2FFFF)
            pieces.append(chr(code) if not 0xD800 <= code <= 0xDFFF else "x")
    return "".join(pieces)


def test_round_trip_on_arbitrary_unicode(tiny_tokenizer):
    tokenizer = sc.Tokenizer.load(tiny_tokenizer)
    rng = random.Random(0)
    for _ in range(200):
        text = random_unicode_text(rng, rng.randint(0, 80))
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_never_come_from_plain_text(tiny_tokenizer):
    tokenizer = sc.Tokenizer.load(tiny_tokenizer)
    text = "".join(sc.SPECIAL_TOKENS) + " <|bos|>hello<|assistant_end|>"
    ids = tokenizer.encode(text)
    special_ids = set(tokenizer.specials.values())
    assert not special_ids & set(ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("hi", prepend_bos=True)[0] == tokenizer.bos_id


def test_vocab_layout_and_token_bytes(tiny_tokenizer):
    tokenizer = sc.Tokenizer.load(tiny_tokenizer)
    assert tokenizer.vocab_size == 512
    assert sorted(tokenizer.specials.values()) == list(range(512 - len(sc.SPECIAL_TOKENS), 512))
    table = tokenizer.token_bytes()
    assert table.shape == (512,) and table.dtype == np.int32
    for token_id in range(tokenizer.vocab_size):
        expected = 0 if token_id in tokenizer.specials.values() else len(tokenizer.enc.decode_single_token_bytes(token_id))
        assert table[token_id] == expected


def test_saved_files_load_with_plain_tiktoken(tiny_tokenizer):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    meta = json.loads((tiny_tokenizer / sc.TOKENIZER_META).read_text())
    enc = tiktoken.Encoding(meta["name"], pat_str=meta["pattern"],
                            mergeable_ranks=load_tiktoken_bpe(str(tiny_tokenizer / sc.TOKENIZER_RANKS)),
                            special_tokens=meta["special_tokens"])
    ours = sc.Tokenizer.load(tiny_tokenizer)
    text = "Grace counted 42 lanterns at the harbour."
    assert enc.encode_ordinary(text) == ours.encode(text)


def test_a_vocabulary_retrained_in_place_is_the_one_loaded(tmp_path, monkeypatch):
    """01 run again with another vocab_size rewrites the same files; the next load must see the new ranks
    (tiktoken's `load_tiktoken_bpe` caches rank files by path, here switched on in a folder of the test's own)."""
    from data.synthetic import synthetic_documents

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    directory = tmp_path / "tokenizer"
    sc.Tokenizer.train(synthetic_documents(300, seed=3), 512).save(directory)
    assert sc.Tokenizer.load(directory).vocab_size == 512
    retrained = sc.Tokenizer.train(synthetic_documents(300, seed=4), 400)
    retrained.save(directory)
    loaded = sc.Tokenizer.load(directory)
    assert loaded.vocab_size == 400 and loaded.ranks == retrained.ranks


def test_the_fingerprint_tells_tokenizers_of_one_size_apart(tiny_tokenizer, tmp_path):
    """Retrained on other text at the same vocabulary size, a tokenizer gives other ids: the fingerprint, which shards
    and checkpoints record, must differ; saved and loaded, or with its ranks in another order, it must not."""
    from data.synthetic import synthetic_documents

    tokenizer = sc.Tokenizer.load(tiny_tokenizer)
    retrained = sc.Tokenizer.train(synthetic_documents(800, seed=4), 512)
    assert retrained.vocab_size == tokenizer.vocab_size and retrained.fingerprint != tokenizer.fingerprint
    reordered = sc.Tokenizer(dict(reversed(tokenizer.ranks.items())), tokenizer.pattern, name="other name")
    assert reordered.fingerprint == tokenizer.fingerprint
    assert sc.Tokenizer(tokenizer.ranks, sc.SPLIT_PATTERN + "|x").fingerprint != tokenizer.fingerprint
    retrained.save(tmp_path / "retrained")
    assert sc.Tokenizer.load(tmp_path / "retrained").fingerprint == retrained.fingerprint


def test_bad_inputs():
    with pytest.raises(sc.ConfigError, match="too small"):
        sc.Tokenizer.train(["abc"], 100)
    with pytest.raises(sc.ConfigError, match="supports only"):
        sc.Tokenizer.train(["abc abc abc"], 2000)


def test_the_vocabulary_a_text_supports_is_named_and_trains():
    """The refusal of a vocabulary too large for the text names the largest one it supports, and that one trains:
    a user who retrains with a larger vocabulary learns the size to ask for instead of guessing."""
    text = ["the cat sat on the mat; the dog ate the hat"] * 3
    with pytest.raises(sc.ConfigError) as error:
        sc.Tokenizer.train(text, 4096)
    supported = int(str(error.value).split("supports only ")[1].split(" tokens")[0])
    assert "not vocab_size 4096" in str(error.value) and 256 < supported < 4096
    assert sc.Tokenizer.train(text, supported).vocab_size == supported
    with pytest.raises(sc.ConfigError, match=f"supports only {supported} tokens"):
        sc.Tokenizer.train(text, supported + 1)


def test_a_vocabulary_the_text_cannot_support_ends_the_twin_in_one_line(stack_home):
    result = subprocess.run([sys.executable, "notebooks/01_tokenizer.py", "--preset=tiny", "--vocab_size=4096"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "01_tokenizer.py: error: the training text supports only" in result.stderr


def test_the_twin_says_when_it_replaced_another_tokenizer(stack_home):
    def run_01(vocab_size):
        result = subprocess.run([sys.executable, "notebooks/01_tokenizer.py", "--preset=tiny",
                                 f"--vocab_size={vocab_size}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    note = "note: this replaced another tokenizer"
    assert note not in run_01(512) and note not in run_01(512)  # the same corpus and size give the same tokenizer
    assert f"{note} in {stack_home / 'tokenizer'}; the shards and checkpoints" in run_01(400)


def test_missing_tokenizer_names_the_notebook(tmp_path):
    with pytest.raises(sc.MissingArtifactError, match="01_tokenizer"):
        sc.Tokenizer.load(tmp_path / "nowhere")


def test_parallel_tokenizing_keeps_order_and_bos(tiny_tokenizer):
    from data.synthetic import synthetic_documents
    from data.tokenizing import tokenize_parallel

    docs = synthetic_documents(50, seed=9)
    tokenizer = sc.Tokenizer.load(tiny_tokenizer)
    serial = [tokenizer.encode(d, prepend_bos=True) for d in docs]
    for workers in (1, 2):
        got = [ids.tolist() for ids in tokenize_parallel(tiny_tokenizer, docs, workers, batch_docs=7)]
        assert got == serial


def test_compression_on_real_english_text(real_data):
    """Measured 2026-11-24 on this test's setting: 3.61 bytes/token on the val split with a 4096-token vocabulary
    trained on 5 M characters of the shared English text. A regression in training or splitting shows up as a drop."""
    def read(name):
        return [json.loads(line)["text"] for line in gzip.open(real_data / "english" / f"{name}.jsonl.gz", "rt")]

    train, val = read("train"), read("val")
    chars, docs = 0, []
    for doc in train:
        docs.append(doc)
        chars += len(doc)
        if chars > 5_000_000:
            break
    tokenizer = sc.Tokenizer.train(docs, 4096)
    assert sum(len(doc.encode("utf-8")) for doc in val) / sum(len(tokenizer.encode(doc)) for doc in val) > 3.55


def test_a_reference_encoding_that_never_answers_times_out(monkeypatch):
    """tiktoken downloads gpt2/cl100k_base with no timeout: a silent network must not hold 01_tokenizer."""
    released = threading.Event()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: released.wait(60))
    start = time.time()
    with pytest.raises(TimeoutError, match="download of gpt2 gave no answer in 0 s"):
        reference_encoding("gpt2", timeout_s=0.2)
    assert time.time() - start < 5
    released.set()

    def offline(name):
        raise ConnectionError(name)

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ConnectionError, match="cl100k_base"):
        reference_encoding("cl100k_base")
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: f"encoding {name}")
    assert reference_encoding("gpt2") == "encoding gpt2"
