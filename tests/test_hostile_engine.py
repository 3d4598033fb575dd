"""Hostile and careless arguments to the KV-cache engine (issue 19): each is refused with a ValueError that names
the argument, when the call is made (a stream included), before any prefill."""
import math

import numpy as np
import pytest
import torch

import stackcore as sc

VOCAB, CONTEXT = 512, 64


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    torch.manual_seed(0)
    model = sc.GPT(sc.GPTConfig(vocab_size=VOCAB, depth=2, model_dim=32, head_dim=16, max_seq_len=CONTEXT)).eval()
    return sc.Engine(model, sc.Tokenizer.load(tiny_tokenizer))


@pytest.mark.parametrize("name, value, message", [
    ("num_samples", 0, "num_samples must be an integer >= 1, got 0"),
    ("num_samples", -3, "num_samples must be an integer >= 1, got -3"),
    ("num_samples", 1.5, "num_samples must be an integer >= 1, got 1.5"),
    ("num_samples", "2", "num_samples must be an integer >= 1, got '2'"),
    ("num_samples", True, "num_samples must be an integer >= 1, got True"),
    ("num_samples", None, "num_samples must be an integer >= 1, got None"),
    ("max_tokens", 0, "max_tokens must be an integer >= 1, got 0"),
    ("max_tokens", -1, "max_tokens must be an integer >= 1, got -1"),
    ("max_tokens", 8.0, "max_tokens must be an integer >= 1, got 8.0"),
    ("max_tokens", None, "max_tokens must be an integer >= 1, got None"),
    ("top_k", 0, "top_k must be None (no cut) or an integer >= 1, got 0"),
    ("top_k", -5, "top_k must be None (no cut) or an integer >= 1, got -5"),
    ("top_k", 2.5, "top_k must be None (no cut) or an integer >= 1, got 2.5"),
    ("top_k", "50", "top_k must be None (no cut) or an integer >= 1, got '50'"),
    ("top_k", False, "top_k must be None (no cut) or an integer >= 1, got False"),
    ("temperature", math.nan, "temperature must be a finite number >= 0 (0: greedy), got nan"),
    ("temperature", math.inf, "temperature must be a finite number >= 0 (0: greedy), got inf"),
    ("temperature", -math.inf, "temperature must be a finite number >= 0 (0: greedy), got -inf"),
    ("temperature", -0.1, "temperature must be a finite number >= 0 (0: greedy), got -0.1"),
    ("temperature", "hot", "temperature must be a finite number >= 0 (0: greedy), got 'hot'"),
    ("temperature", None, "temperature must be a finite number >= 0 (0: greedy), got None"),
    ("temperature", True, "temperature must be a finite number >= 0 (0: greedy), got True"),
    ("top_p", 0, "top_p must be None (no cut) or a number in (0, 1], got 0"),
    ("top_p", -0.5, "top_p must be None (no cut) or a number in (0, 1], got -0.5"),
    ("top_p", 1.01, "top_p must be None (no cut) or a number in (0, 1], got 1.01"),
    ("top_p", math.nan, "top_p must be None (no cut) or a number in (0, 1], got nan"),
    ("top_p", "0.9", "top_p must be None (no cut) or a number in (0, 1], got '0.9'"),
])
def test_bad_sampling_arguments_are_refused(engine, name, value, message):
    with pytest.raises(ValueError) as error:
        engine.generate([1, 2, 3], **{name: value})
    assert str(error.value) == message


@pytest.mark.parametrize("prompts, message", [
    ([], "prompts must be a non-empty list of token id lists, got []"),
    ("hello", "prompts must be a non-empty list of token id lists, got 'hello'"),
    (None, "prompts must be a non-empty list of token id lists, got None"),
    ([[]], "prompt 0 is empty: start it with <|bos|>"),
    ([[1, 2], []], "prompt 1 is empty: start it with <|bos|>"),
    (["abc"], "prompt 0 must be a list of token ids, got 'abc'"),
    ([7], "prompt 0 must be a list of token ids, got 7"),
    ([[1, VOCAB]], f"prompt 0 holds {VOCAB}, not a token id of the model's vocabulary (0..{VOCAB - 1})"),
    ([[1, -1]], "prompt 0 holds -1, not a token id of the model's vocabulary"),
    ([[1, 2.0]], "prompt 0 holds 2.0, not a token id of the model's vocabulary"),
    ([[1, None]], "prompt 0 holds None, not a token id of the model's vocabulary"),
    ([["a"]], "prompt 0 holds 'a', not a token id of the model's vocabulary"),
    ([[True]], "prompt 0 holds True, not a token id of the model's vocabulary"),
    ([[1], [2, 10 ** 30]], f"prompt 1 holds {10 ** 30}, not a token id of the model's vocabulary"),
    ([[1] * CONTEXT], f"prompt 0 of {CONTEXT} tokens leaves no room to generate in the model's context "
                      f"(max_seq_len {CONTEXT})"),
    ([[1], [1] * 200], "prompt 1 of 200 tokens leaves no room to generate"),
])
def test_bad_prompts_are_refused(engine, prompts, message):
    with pytest.raises(ValueError) as error:
        engine.generate_batch(prompts, max_tokens=4)
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize("call", [
    lambda engine: engine.stream([1, 2], temperature=-1.0),
    lambda engine: engine.stream_batch([[1, 2]], num_samples=0),
    lambda engine: engine.generate([1, 2], top_k=0),
    lambda engine: engine.generate_batch([[1, 2]], top_p=2.0),
], ids=["stream", "stream_batch", "generate", "generate_batch"])
def test_streams_refuse_when_called_not_when_first_read(engine, call):
    with pytest.raises(ValueError, match="must be"):
        call(engine)


def test_edge_values_are_accepted(engine):
    """The limits themselves are valid: greedy, top_p 1, top_k 1, one token, numpy ids, a prompt one short of the
    context (which leaves room for exactly one token, whatever max_tokens asks)."""
    tokens, masks = engine.generate(np.array([1, 2, 3])[:3].tolist(), max_tokens=1, temperature=0.0, top_k=1,
                                    top_p=1.0)
    assert len(tokens) == 1 and len(tokens[0]) == 1 and masks == [[1]]
    assert len(engine.generate([np.int64(1)] * (CONTEXT - 1), max_tokens=50, temperature=0)[0][0]) == 1
    assert len(engine.generate_batch([[1], [2, 3]], num_samples=2, max_tokens=3, temperature=0.5)[0]) == 4
