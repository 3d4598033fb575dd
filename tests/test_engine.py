"""The chat format, the calculator and the KV-cache engine (section 12 of stackcore): cached decoding against the
full forward pass, batch-invariant sampling, stopping, tool forcing. The chat session is tested in test_chat.py."""
import pytest
import torch

import stackcore as sc

TOLERANCE = 1e-4  # fp32 on the CPU: cached and full passes differ only in summation order (seen: ~2e-6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread per process is faster than contending for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return sc.Tokenizer.load(tiny_tokenizer)


def random_model(vocab_size: int = 512, short_window: int = 0, seed: int = 0, value_embeds: int = 3,
                 **tricks) -> sc.GPT:
    """A small GPT (depth 4, 4 heads of 16; `tricks`: more GPTConfig switches) whose zero-initialised layers are
    filled with noise, so every path changes the logits."""
    torch.manual_seed(seed)
    model = sc.GPT(sc.GPTConfig(vocab_size=vocab_size, depth=4, model_dim=64, head_dim=16, max_seq_len=96,
                                short_window=short_window, n_value_embeds=value_embeds, **tricks))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


# --- the KV cache ------------------------------------------------------------------------------------------------

def cached_logits(model, ids, pieces, backend="sdpa"):
    """Logits of ids (B, T) fed through a new KV cache in pieces of the given lengths (the first is the prefill)."""
    cache = sc.KVCache(model.config, ids.size(0), ids.size(1), "cpu", torch.float32)
    bounds = [0, *torch.tensor(pieces).cumsum(0).tolist()]
    logits = torch.cat([model(ids[:, a:b], kv_cache=cache, backend=backend) for a, b in zip(bounds, bounds[1:])], 1)
    assert cache.lengths.tolist() == [bounds[-1]] * ids.size(0) and not cache.empty
    return logits


@pytest.mark.parametrize("value_embeds", [3, 0], ids=["value_embeds", "no_value_embeds"])
@pytest.mark.parametrize("short_window", [0, 5], ids=["full", "window5"])
@pytest.mark.parametrize("backend", sc.available_attention_backends("cpu"))
def test_cached_decoding_matches_the_full_forward_pass(backend, short_window, value_embeds):
    """Prefill then one token a step, and chunks after a non-empty cache, against GPT.forward over all 40 tokens."""
    model = random_model(short_window=short_window, value_embeds=value_embeds)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids[0], backend=backend)
        for pieces in ([1] * 40, [12] + [1] * 28, [9, 31], [9, 20, 11]):
            torch.testing.assert_close(cached_logits(model, ids, pieces, backend)[0], full, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("backend", sc.available_attention_backends("cpu"))
def test_rows_prefill_and_decode_together_as_they_do_alone(backend):
    """Three rows prefilled in one pass through `backend`, then decoded together: each row matches its own forward."""
    model = random_model(short_window=5)
    ids = torch.randint(0, 512, (3, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        together = cached_logits(model, ids, [14] + [1] * 16, backend)
        for row in range(3):
            torch.testing.assert_close(together[row], model(ids[row], backend=backend), atol=TOLERANCE, rtol=0)


def greedy_step(model, cache, chunk=4, compile_backend=None):
    """A DecodeStep that only forces tokens (greedy, stop ids the model never meets in these tests)."""
    return sc.DecodeStep(model, cache, "sdpa", sc.Sampling(temperature=0.0), stop_ids=[-5], python_end=-6,
                         chunk=chunk, cuda_graph=False, compile_backend=compile_backend)


def waiting_step(model, ids):
    """ids (B, T) prefilled into a cache of 30 positions, and a greedy DecodeStep over it in chunks of 4 that stops
    at token 5 and waits at <|python_end|> (here id 7), started with 20 tokens a row."""
    B = ids.size(0)
    cache = sc.KVCache(model.config, B, 30, "cpu", torch.float32)
    model(ids, kv_cache=cache)
    step = sc.DecodeStep(model, cache, "sdpa", sc.Sampling(temperature=0.0), stop_ids=[5], python_end=7, chunk=4,
                         cuda_graph=False)
    step.start(torch.zeros(B, model.config.vocab_size), [20] * B)
    return step


def force(step, tokens):
    """begin_chunk with `tokens` (B, n) forced, n <= chunk."""
    B, n = tokens.shape
    forced = torch.zeros(B, step.chunk, dtype=torch.long)
    forced[:, :n] = tokens
    step.begin_chunk(torch.zeros(B, step.chunk), forced, torch.full((B,), n))


@pytest.mark.parametrize("compile_backend", [None, "aot_eager"], ids=["eager", "compiled"])
def test_rows_at_different_positions_step_together(compile_backend):
    """Rows prefilled apart through views (prompts of 10 and 6 tokens), then stepped together by DecodeStep (what a
    CUDA graph replays) in chunks of 4, fed their tokens as forced tokens: each row's logits match its own
    single-row decode, the cache holds the same keys, and the chunk's emitted tokens are the forced ones."""
    model = random_model(short_window=5)
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
    lengths = [10, 6]
    with torch.no_grad():
        alone = [sc.KVCache(model.config, 1, 30, "cpu", torch.float32) for _ in lengths]
        shared = sc.KVCache(model.config, 2, 30, "cpu", torch.float32)
        views = [shared.rows(row, row + 1) for row in range(2)]
        for row, length in enumerate(lengths):
            model(ids[row:row + 1, :length], kv_cache=alone[row])
            model(ids[row:row + 1, :length], kv_cache=views[row])
        assert shared.lengths.tolist() == lengths and not shared.empty
        step = greedy_step(model, shared, compile_backend=compile_backend)
        step.start(torch.zeros(2, 512), [20, 20])
        feed = torch.stack([ids[row, length:length + 12] for row, length in enumerate(lengths)])  # (2, 12)
        for first in range(0, 12, 4):
            force(step, feed[:, first:first + 4])
            for t in range(first, first + 4):
                step()
                expected = torch.cat([model(feed[row, None, t, None], kv_cache=alone[row])[:, -1] for row in range(2)])
                torch.testing.assert_close(step.state.logits, expected, atol=TOLERANCE, rtol=0)
            emitted, sampled, _, taken = step.read_chunk()
            assert emitted == feed[:, first:first + 4].tolist() and taken == [4, 4]
            assert not any(map(any, sampled))
        for row, length in enumerate(lengths):
            torch.testing.assert_close(shared.k[:, row, :, :length + 12], alone[row].k[:, 0, :, :length + 12])
        assert shared.lengths.tolist() == [length + 12 for length in lengths]


def test_finished_and_waiting_rows_step_masked():
    """Row 0 emits a stop token, row 1 <|python_end|> (here id 7), in the first step of a chunk: the rest of the
    chunk they record -1, keep their logits and length, while row 2 goes on; row 1 resumes in the next chunk."""
    model = random_model()
    ids = torch.randint(0, 512, (3, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        step = waiting_step(model, ids)
        force(step, torch.tensor([[5, 1, 1], [7, 1, 1], [3, 4, 6]]))
        logits = []
        for _ in range(3):
            step()
            logits.append(step.state.logits.clone())
        emitted, _, _, taken = step.read_chunk()
        assert emitted == [[5, -1, -1, -1], [7, -1, -1, -1], [3, 4, 6, -1]] and taken == [1, 1, 3]
        assert step.cache.lengths.tolist() == [9, 9, 11] and step.state.done.tolist() == [True, False, False]
        assert all(torch.equal(later[:2], logits[0][:2]) for later in logits[1:])
        force(step, torch.tensor([[1], [2], [9]]))
        step()
        assert step.read_chunk()[0] == [[-1] * 4, [2, -1, -1, -1], [9, -1, -1, -1]]
        expected = model(torch.cat([ids[1], torch.tensor([7, 2])])[None], kv_cache=sc.KVCache(
            model.config, 1, 30, "cpu", torch.float32))[0, -1]
        torch.testing.assert_close(step.state.logits[1], expected, atol=TOLERANCE, rtol=0)


def assert_packed_prefill_matches_full_passes(model: sc.GPT, backend: str = "sdpa") -> None:
    """Prompts of 7, 12 and 3 tokens in one packed (varlen) pass, each into its 2 rows, then 4 more tokens in every
    row: the next-token logits and the following steps of every row match each prompt's own full forward pass."""
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(7))
    lengths = [7, 12, 3]
    prompts = [ids[:length] for length in lengths]
    with torch.no_grad():
        cache = sc.KVCache(model.config, 6, 30, "cpu", torch.float32)
        packed = sc.PackedPrompts(cache, lengths, [0, 2, 4], copies=2)
        first = model(torch.cat(prompts), kv_cache=packed, backend=backend, logit_rows=packed.last_tokens())
        assert cache.lengths.tolist() == [7, 7, 12, 12, 3, 3] and not cache.empty
        continuation = ids[20:24]
        nexts = model(continuation.expand(6, 4), kv_cache=cache, backend=backend)  # 4 more tokens a row, one pass
        for i, prompt in enumerate(prompts):
            full = model(torch.cat([prompt, continuation]), backend=backend)
            torch.testing.assert_close(first[i], full[len(prompt) - 1], atol=TOLERANCE, rtol=0)
            for row in (2 * i, 2 * i + 1):
                torch.testing.assert_close(nexts[row], full[len(prompt):], atol=TOLERANCE, rtol=0)


def test_prompts_prefilled_together_in_one_packed_pass():
    assert_packed_prefill_matches_full_passes(random_model(short_window=5))


def test_a_view_of_a_filled_cache_reads_the_cache():
    """A view taken after a prefill is not empty: its next pass attends to what the rows hold."""
    model = random_model()
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = sc.KVCache(model.config, 1, 20, "cpu", torch.float32)
        model(ids[:, :8], kv_cache=cache)
        view = cache.rows(0, 1)
        assert not view.empty
        torch.testing.assert_close(model(ids[:, 8:], kv_cache=view)[0], model(ids[0])[8:], atol=TOLERANCE, rtol=0)


def test_logit_rows_of_a_cached_pass():
    model = random_model()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([8, 17])  # each row's last token, in the flattened 2 x 9 tokens
    with torch.no_grad():
        full = model(ids, kv_cache=sc.KVCache(model.config, 2, 9, "cpu", torch.float32))
        last = model(ids, kv_cache=sc.KVCache(model.config, 2, 9, "cpu", torch.float32), logit_rows=rows)
    torch.testing.assert_close(last, full[:, -1])


@pytest.mark.parametrize("make, message", [
    (lambda model, cache: model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache), "exceed the cache's capacity"),
    (lambda model, cache: model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache), r"ids of shape \(1, tokens\)"),
    (lambda model, cache: model(torch.zeros(3, dtype=torch.long), kv_cache=cache), r"ids of shape \(1, tokens\)"),
    (lambda model, cache: model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache,
                                target_ids=torch.zeros(2, dtype=torch.long)), "no target_ids or positions"),
    (lambda model, cache: sc.KVCache(model.config, 1, 97, "cpu", torch.float32), r"capacity 97 must be in 1..max"),
    (lambda model, cache: sc.KVCache(model.config, 1, 0, "cpu", torch.float32), r"capacity 0 must be in 1..max"),
])
def test_bad_cached_passes_raise(make, message):
    model = random_model()
    cache = sc.KVCache(model.config, 1, 4, "cpu", torch.float32)
    with pytest.raises(ValueError, match=message):
        make(model, cache)


# --- sampling ----------------------------------------------------------------------------------------------------

def test_batched_samples_equal_samples_one_at_a_time(tokenizer):
    engine = sc.Engine(random_model(), tokenizer)
    prompt = tokenizer.encode("Once upon a time", prepend_bos=True)
    kwargs = dict(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9)
    batch, masks = engine.generate(prompt, num_samples=3, seed=7, **kwargs)
    alone = [engine.generate(prompt, num_samples=1, seed=7 + i, **kwargs)[0][0] for i in range(3)]
    assert batch == alone
    assert len({tuple(row) for row in batch}) > 1  # different seeds, different samples
    assert all(len(mask) == len(row) and set(mask) <= {0, 1} for row, mask in zip(batch, masks))
    assert engine.generate(prompt, num_samples=3, seed=7, **kwargs)[0] == batch  # seeded: reproducible


def test_chunk_length_and_compilation_change_no_token(tokenizer):
    """Sampled with top-k and top-p from prompts of different lengths: every sync_every, and the step compiled
    (aot_eager: the traced graph, on the CPU), give the tokens of one step per sync."""
    prompts = [tokenizer.encode("Hi", prepend_bos=True), tokenizer.encode("The quick brown fox", prepend_bos=True)]
    kwargs = dict(num_samples=2, max_tokens=24, temperature=0.9, top_k=40, top_p=0.8, seed=5)
    model = random_model()
    reference = sc.Engine(model, tokenizer, sync_every=1).generate_batch(prompts, **kwargs)
    for options in (dict(sync_every=5), dict(sync_every=16), dict(sync_every=7, compile_backend="aot_eager")):
        assert sc.Engine(model, tokenizer, **options).generate_batch(prompts, **kwargs) == reference, options


def test_greedy_decoding_equals_the_full_forward_pass(tokenizer):
    """Greedy generation from three prompts prefilled together (packed), in chunks of 4, compiled: each row is the
    argmax continuation that full forward passes without a cache give."""
    model = random_model(short_window=5)
    prompts = [tokenizer.encode(text, prepend_bos=True) for text in ("Hi", "Once upon a time", "A b c d e f g")]
    engine = sc.Engine(model, tokenizer, sync_every=4, compile_backend="aot_eager")
    tokens, masks = engine.generate_batch(prompts, max_tokens=10, temperature=0.0)
    with torch.no_grad():
        for prompt, row in zip(prompts, tokens):
            ids = list(prompt)
            for _ in range(len(row)):
                ids.append(int(model(torch.tensor(ids))[-1].argmax()))
            assert row == ids[len(prompt):]
    assert all(mask == [1] * len(row) for row, mask in zip(tokens, masks))


def test_prompts_of_different_lengths_decode_together_as_they_do_alone(tokenizer):
    """Rows at different positions (a 3-token and a longer prompt, 2 samples each) against each prompt alone; the
    long prompt leaves less room than max_tokens in max_seq_len, so its rows also stop at different lengths."""
    engine = sc.Engine(random_model(), tokenizer)
    prompts = [tokenizer.encode("Hi", prepend_bos=True), tokenizer.encode("The quick brown fox " * 4, prepend_bos=True)]
    assert len(prompts[1]) > 96 - 40 > len(prompts[0])
    kwargs = dict(max_tokens=40, temperature=1.0, top_k=50)
    together, masks = engine.generate_batch(prompts, num_samples=2, seed=3, **kwargs)
    alone = [row for i, prompt in enumerate(prompts) for row in engine.generate(prompt, 2, seed=3 + 2 * i, **kwargs)[0]]
    assert together == alone
    assert [len(row) for row in together[2:]] == [96 - len(prompts[1])] * 2 and len(together[0]) <= 40


def test_sample_tokens_respects_top_k_and_greedy():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    uniforms = torch.rand(200, generator=torch.Generator().manual_seed(0))
    assert set(sc.sample_tokens(logits, uniforms, temperature=1.0, top_k=2).tolist()) == {1, 2}
    assert set(sc.sample_tokens(logits, uniforms, temperature=1.0, top_p=0.5).tolist()) == {1}
    assert sc.sample_tokens(logits, uniforms, temperature=0.0).tolist() == [1] * 200


def test_sample_tokens_draws_from_the_softmax():
    """Inverse-transform sampling: the frequencies of 20,000 draws match softmax(logits / temperature), and the
    edges of [0, 1) map to the first and last token with any probability."""
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    expected = (logits / 0.8).softmax(-1)[0]
    uniforms = torch.rand(20_000, generator=torch.Generator().manual_seed(1))
    tokens = sc.sample_tokens(logits.expand(20_000, -1), uniforms, temperature=0.8)
    frequencies = torch.bincount(tokens, minlength=4).float() / 20_000
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)
    edges = sc.sample_tokens(logits.expand(2, -1), torch.tensor([0.0, 1.0 - 1e-7]), temperature=1.0, top_k=3)
    assert edges.tolist() == [0, 2]


class ScriptedModel(sc.GPT):
    """A small GPT whose passes through a KV cache ignore its weights: at each position the token
    `script(position predicted, prompt length)` becomes overwhelmingly likely."""

    def __init__(self, vocab_size: int, script):
        super().__init__(sc.GPTConfig(vocab_size=vocab_size, depth=2, model_dim=32, head_dim=16, max_seq_len=96))
        self.script, self.prompt_length = script, 0

    def forward(self, input_ids, *_, kv_cache, logit_rows=None, **__):
        ids, _, _, positions = kv_cache.packing(input_ids)
        if kv_cache.empty:  # the prefill (one prompt in these tests)
            self.prompt_length = ids.numel()
        logits = torch.zeros(ids.numel(), self.config.vocab_size)
        for t, position in enumerate(positions.tolist()):
            logits[t, self.script(position + 1, self.prompt_length)] = 30.0
        kv_cache.advance(input_ids.size(-1))
        return logits.view(*input_ids.shape, -1) if logit_rows is None else logits[logit_rows]


def following(script: list[int]):
    """A ScriptedModel script: the tokens of `script` in order, its last one after its end."""
    return lambda at, _: script[min(at, len(script) - 1)]


def test_greedy_stops_at_assistant_end(tokenizer):
    end = tokenizer.special_id("<|assistant_end|>")
    prompt = sc.render_for_completion(tokenizer, [{"role": "user", "content": "hi"}])
    answer = tokenizer.encode("hello there")
    script = prompt + answer + [end] + tokenizer.encode(" and more")
    engine = sc.Engine(ScriptedModel(tokenizer.vocab_size, following(script)), tokenizer)
    tokens, masks = engine.generate(prompt, num_samples=2, max_tokens=50, temperature=0.0)
    assert tokens == [answer + [end]] * 2 and masks == [[1] * (len(answer) + 1)] * 2
    short, _ = engine.generate(prompt, max_tokens=3, temperature=0.0)
    assert short == [answer[:3]]


@pytest.mark.parametrize("sync_every", [1, 3, 16])
def test_tool_call_result_is_forced_between_output_tokens(tokenizer, sync_every):
    """Whatever the chunk length: the call closes mid-chunk or at its end, the result comes in the next chunk(s)."""
    special = tokenizer.special_id
    prompt = sc.render_for_completion(tokenizer, [{"role": "user", "content": "6 times 7?"}])
    call = [special("<|python_start|>"), *tokenizer.encode("6*7"), special("<|python_end|>")]
    forced = [special("<|output_start|>"), *tokenizer.encode("42"), special("<|output_end|>")]
    wrong = [special("<|output_start|>"), *tokenizer.encode("41"), special("<|output_end|>")]  # what the model "thinks"
    tail = [*tokenizer.encode(" so 42"), special("<|assistant_end|>")]
    engine = sc.Engine(ScriptedModel(tokenizer.vocab_size, following(prompt + call + wrong + tail)), tokenizer,
                       sync_every=sync_every)
    tokens, masks = engine.generate(prompt, max_tokens=40, temperature=0.0)
    assert len(wrong) == len(forced)  # so the script stays aligned with the forced tokens
    assert tokens[0] == call + forced + tail
    assert masks[0] == [1] * len(call) + [0] * len(forced) + [1] * len(tail)
    assert sc.assistant_parts(tokenizer, tokens[0]) == [
        {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"}, {"type": "text", "text": " so 42"}]


def test_prompt_too_long_for_the_model_raises(tokenizer):
    engine = sc.Engine(random_model(), tokenizer)
    with pytest.raises(ValueError, match="leaves no room"):
        engine.generate([tokenizer.bos_id] * 96)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([])


# --- the calculator ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("1 + 2", "3"), ("10 / 4", "2.5"), ("10 / 5", "2"), ("7 // 2", "3"), ("7 % 3", "1"), ("-3 ** 2", "-9"),
    ("2 ** 10", "1024"), ("(1 + 2) * 3", "9"), ("1 / 3", "0.3333333333"), ("2.5 * 4", "10"), ("2 ** -1", "0.5"),
    ("'strawberry'.count('r')", "3"), ("len('hello')", "5"), ("'ab' * 3", "ababab"), ("'Hi'.upper()", "HI"),
    ("' x '.strip()", "x"), ("'a-b'.replace('-', '+')", "a+b"), ("len('a b c'.split())", "3"),
])
def test_calculator_evaluates(expression, expected):
    assert sc.calculate(expression) == expected


@pytest.mark.parametrize("expression", [
    "", "1 +", "x", "1 / 0", "10 ** 10 ** 10", "9 ** 99999", "'a' * 10 ** 9", "'ab' * 100000", "(-8) ** 0.5",
    "-" * 100 + "1", "(" * 250 + "1" + ")" * 250, "1" + "+1" * 400, "().__class__", "''.__class__.__mro__",
    "__import__('os').system('true')", "open('/etc/passwd').read()", "(lambda: 1)()", "[x for x in 'ab']",
    "{1: 2}", "[1, 2]", "print(1)", "'a'.join(['b'])", "'abc'.upper(1, 2, 3)", "'%s' % 1", "True + 1",
    "'a'.replace('', 'x' * 5000)", "len(1)", "1 if 1 else 2", "x := 1", "a.b",
])
def test_calculator_refuses_without_raising(expression):
    result = sc.calculate(expression)
    assert result.startswith("error: ") and len(result) < 200


def test_calculator_times_out():
    assert sc.calculate("1 + 2", timeout_s=-1.0) == "error: timed out"


# --- the chat format ---------------------------------------------------------------------------------------------

def test_render_conversation_ids_and_mask(tokenizer):
    special, encode = tokenizer.special_id, tokenizer.encode
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "python", "text": "2+3"},
                                          {"type": "python_output", "text": "5"}, {"type": "text", "text": "."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Bye"},
    ]
    ids, mask = sc.render_conversation(tokenizer, conversation)
    expected = [
        ([tokenizer.bos_id, special("<|user_start|>"), *encode("Be brief.\n\nWhat is 2+3?"), special("<|user_end|>"),
          special("<|assistant_start|>")], 0),
        (encode("It is "), 1),
        ([special("<|python_start|>"), *encode("2+3"), special("<|python_end|>")], 1),
        ([special("<|output_start|>"), *encode("5"), special("<|output_end|>")], 0),
        ([*encode("."), special("<|assistant_end|>")], 1),
        ([special("<|user_start|>"), *encode("Thanks"), special("<|user_end|>"), special("<|assistant_start|>")], 0),
        ([*encode("Bye"), special("<|assistant_end|>")], 1),
    ]
    assert ids == [t for tokens, _ in expected for t in tokens]
    assert mask == [m for tokens, m in expected for _ in tokens]
    assert sc.render_conversation(tokenizer, conversation, max_tokens=7) == (ids[:7], mask[:7])
    completion = sc.render_for_completion(tokenizer, conversation)
    assert completion == ids[:len(ids) - len(encode("Bye")) - 1]
    assert completion[-1] == special("<|assistant_start|>")


@pytest.mark.parametrize("conversation, message", [
    ([], "non-empty"),
    ("hello", "non-empty"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "assistant", "content": "hi"}], "expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected role 'assistant'"),
    ([{"role": "system", "content": "s"}], "followed by a user message"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "expected role 'assistant'"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}], "part 0"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": 3}]}], "part 0"),
    ([{"role": "tool", "content": "a"}], "expected role 'user'"),
])
def test_bad_conversations_raise(tokenizer, conversation, message):
    with pytest.raises(ValueError, match=message):
        sc.render_conversation(tokenizer, conversation)


def test_render_for_completion_needs_a_user_turn(tokenizer):
    with pytest.raises(ValueError, match="ends with a user message"):
        sc.render_for_completion(tokenizer, [{"role": "system", "content": "s"}])
