"""modded-nanogpt's partial key offset and paired-head attention as GPTConfig switches (stackcore section 6): their
definitions against plain-loop references, cached decoding against the full forward pass on every CPU backend (with
sliding windows, several rows, views, DecodeStep, the Engine), documents that stay apart in packed rows, training
steps eager and compiled, and CORE scoring, which must lay such a model's passes out as plain documents."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stackcore as sc
from test_engine import (assert_packed_prefill_matches_full_passes, cached_logits, force, greedy_step,  # noqa: F401
                         one_thread, random_model, waiting_step)  # one_thread: autouse, faster

TOLERANCE = 1e-4  # fp32 on the CPU: cached and full passes differ only in summation order
BACKENDS = sc.available_attention_backends("cpu")
TRICKS = {
    "key_offset": dict(key_offset=True),
    "paired": dict(paired_head_layers=(0, 2)),
    "modded": dict(key_offset=True, paired_head_layers=(0, 2)),
}


def tricked_model(tricks: dict, short_window: int = 0, seed: int = 0, vocab_size: int = 128) -> sc.GPT:
    """test_engine's random_model (depth 4, 4 heads of 16; layers 3 long) with the given switches."""
    return random_model(vocab_size, short_window, seed, **tricks)


# --- the definitions ---------------------------------------------------------------------------------------------

def test_layers_take_the_tricks_where_modded_does():
    model = tricked_model(TRICKS["modded"])
    assert [block.attn.paired for block in model.blocks] == [True, False, True, False]
    assert [block.attn.key_offset for block in model.blocks] == [False, False, False, True]  # long, not paired
    deep = sc.GPTConfig(depth=12).modded_architecture()
    assert deep.key_offset and deep.paired_head_layers == (0, 2, 5, 9)
    assert [layer for layer, block_tricks in enumerate(map(sc.GPT(sc.GPTConfig(
        vocab_size=8, depth=12, model_dim=128, head_dim=32, key_offset=True)).layer_tricks, range(12)))
        if block_tricks[1]] == [3, 7, 11]
    assert sc.GPTConfig(depth=4, model_dim=128, head_dim=32).modded_architecture().paired_head_layers == (0, 2)


def test_key_offset_rotates_half_and_shifts_the_stationary_half_within_documents():
    """offset_keys against a loop: the second half of token t's key is token t-1's own, except at document starts."""
    k = torch.randn(9, 2, 8)
    cu_seqlens = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    model = tricked_model(TRICKS["key_offset"])
    in_documents = sc.positions_in_documents(cu_seqlens, 9)
    previous, _, _ = model.trick_inputs(in_documents, in_documents)
    batch = sc.AttentionBatch(cu_seqlens, 4, torch.zeros(9, 2), torch.zeros(9, 2), previous=previous)
    shifted = sc.offset_keys(k, batch, layer=3)
    starts = {0, 4, 5}
    for t in range(9):
        source = t if t in starts else t - 1
        torch.testing.assert_close(shifted[t], torch.cat((k[t, :, :4], k[source, :, 4:]), -1))
    assert model.rotary_cos.shape == (96, 4)  # 8 of the 16 dimensions turn; the stationary half stays put
    x = torch.randn(3, 2, 16)
    rotated = sc.apply_rotary(x, model.rotary_cos[:3], model.rotary_sin[:3])
    torch.testing.assert_close(rotated[..., 8:], x[..., 8:])
    assert not torch.allclose(rotated[1:, :, :8], x[1:, :, :8])


def naive_paired_attention(q, k, v, window):
    """Paired heads as modded-nanogpt #191 describes them, with loops: heads 2j and 2j+1 of token t at interleaved
    positions 2t and 2t+1 of one sequence, causal attention over it, window counted in interleaved positions."""
    T, H, D = q.shape
    out = torch.empty_like(q)
    for j in range(H // 2):
        qs, ks, vs = (torch.stack([x[t, 2 * j + i] for t in range(T) for i in range(2)]) for x in (q, k, v))
        at = torch.arange(2 * T)
        allowed = (at[:, None] >= at) & (at[:, None] - at < (window or 2 * T))
        y = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=allowed)[0]
        for t in range(T):
            out[t, 2 * j], out[t, 2 * j + 1] = y[2 * t], y[2 * t + 1]
    return out


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paired_heads_attend_over_the_interleaved_pairs(backend, window):
    q, k, v = torch.randn(3, 10, 4, 8)
    cu_seqlens = torch.tensor([0, 10], dtype=torch.int32)
    mask = sc.flex_block_mask(2 * cu_seqlens, 20, window) if backend == "flex" else window
    paired = sc.split_pairs(sc.attention(*map(sc.interleave_pairs, (q, k, v)), 2 * cu_seqlens, 20, mask, backend))
    torch.testing.assert_close(paired, naive_paired_attention(q, k, v, window), atol=1e-5, rtol=0)
    # the first token: query 0 of a pair sees only its own key, query 1 both keys of the token
    torch.testing.assert_close(paired[0, 0::2], v[0, 0::2], atol=1e-6, rtol=0)
    assert not torch.allclose(paired[0, 1::2], v[0, 1::2])


# --- cached decoding equals the full pass ------------------------------------------------------------------------

@pytest.mark.parametrize("short_window", [0, 5], ids=["full", "window5"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tricks", list(TRICKS))
def test_cached_decoding_matches_the_full_forward_pass(tricks, backend, short_window):
    assert_cached_decoding_matches_the_full_pass(tricked_model(TRICKS[tricks], short_window), backend)


def assert_cached_decoding_matches_the_full_pass(model: sc.GPT, backend: str, rows: int = 1) -> None:
    """Prefill then one token a step, and chunks after a non-empty cache, against GPT.forward over all 40 tokens."""
    ids = torch.randint(0, 128, (rows, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fulls = torch.stack([model(row, backend=backend) for row in ids])
        for pieces in ([1] * 40, [12] + [1] * 28, [9, 31], [9, 20, 11]):
            torch.testing.assert_close(cached_logits(model, ids, pieces, backend), fulls, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("tricks", list(TRICKS))
def test_each_trick_changes_the_model(tricks):
    """The same weights without the switch give other logits: the tests above exercise the trick, not a no-op."""
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(tricked_model(TRICKS[tricks])(ids), tricked_model({})(ids), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tricks", list(TRICKS))
def test_packed_documents_see_nothing_of_their_neighbours(tricks, backend):
    """Three documents packed in one row give each document's logits alone: the key offset does not carry the
    last key of one document into the first of the next, and paired sequences double per document."""
    model = tricked_model(TRICKS[tricks], short_window=5)
    lengths = [7, 1, 13]
    ids = torch.randint(0, 128, (sum(lengths),), generator=torch.Generator().manual_seed(3))
    cu_seqlens = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, cu_seqlens, max(lengths), backend=backend)
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            torch.testing.assert_close(packed[start:end], model(ids[start:end], backend=backend), atol=TOLERANCE,
                                       rtol=0)


@pytest.mark.parametrize("compile_backend", [None, "aot_eager"], ids=["eager", "compiled"])
@pytest.mark.parametrize("tricks", list(TRICKS))
def test_rows_prefilled_apart_step_together(tricks, compile_backend):
    """Rows prefilled through views (prompts of 10 and 6 tokens), then stepped together by DecodeStep in chunks of
    4, fed their tokens as forced tokens: each row's logits match its own full forward, so the carried key halves
    follow their rows."""
    model = tricked_model(TRICKS[tricks], short_window=5)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(4))
    lengths = [10, 6]
    with torch.no_grad():
        shared = sc.KVCache(model.config, 2, 30, "cpu", torch.float32)
        for row, length in enumerate(lengths):
            model(ids[row:row + 1, :length], kv_cache=shared.rows(row, row + 1))
        step = greedy_step(model, shared, compile_backend=compile_backend)
        step.start(torch.zeros(2, 128), [20, 20])
        feed = torch.stack([ids[row, length:length + 8] for row, length in enumerate(lengths)])
        fulls = [model(ids[row, :length + 8]) for row, length in enumerate(lengths)]
        for first in (0, 4):
            force(step, feed[:, first:first + 4])
            for t in range(first, first + 4):
                step()
                expected = torch.stack([full[length + t] for full, length in zip(fulls, lengths)])
                torch.testing.assert_close(step.state.logits, expected, atol=TOLERANCE, rtol=0)
            step.read_chunk()


@pytest.mark.parametrize("tricks", list(TRICKS))
def test_a_waiting_row_keeps_its_carried_half(tricks):
    assert_a_waiting_row_resumes_as_the_full_pass(tricked_model(TRICKS[tricks]))


def assert_a_waiting_row_resumes_as_the_full_pass(model: sc.GPT) -> None:
    """Row 0 emits <|python_end|> (here id 7) in the first step of a chunk and waits while row 1 goes on; when row 0
    resumes, its next token still follows the right predecessor: its logits equal the full pass over its tokens."""
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        step = waiting_step(model, ids)
        force(step, torch.tensor([[7, 1, 1], [3, 4, 6]]))
        for _ in range(3):
            step()
        assert step.read_chunk()[0] == [[7, -1, -1, -1], [3, 4, 6, -1]]
        force(step, torch.tensor([[2], [9]]))
        step()
        for row, tokens in enumerate(([7, 2], [3, 4, 6, 9])):
            full = model(torch.cat([ids[row], torch.tensor(tokens)]))[-1]
            torch.testing.assert_close(step.state.logits[row], full, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tricks", list(TRICKS))
def test_prompts_prefilled_together_in_one_packed_pass(tricks, backend):
    assert_packed_prefill_matches_full_passes(tricked_model(TRICKS[tricks], short_window=5), backend)


@pytest.mark.parametrize("tricks", list(TRICKS))
def test_engine_decodes_several_prompts_as_the_full_pass_and_alone(tricks, tiny_tokenizer):
    """Prompts of different lengths, two samples each, greedy, in compiled chunks of 4: the batch equals each prompt
    alone, and each reply is the argmax of full forward passes without a cache."""
    tokenizer = sc.Tokenizer.load(tiny_tokenizer)
    model = tricked_model(TRICKS[tricks], short_window=5, vocab_size=tokenizer.vocab_size)
    engine = sc.Engine(model, tokenizer, sync_every=4, compile_backend="aot_eager")
    prompts = [tokenizer.encode("Hi", prepend_bos=True), tokenizer.encode("The quick brown fox", prepend_bos=True)]
    together, _ = engine.generate_batch(prompts, num_samples=2, max_tokens=10, temperature=0.0)
    alone = [row for prompt in prompts for row in engine.generate(prompt, 2, max_tokens=10, temperature=0.0)[0]]
    assert together == alone
    with torch.no_grad():
        for prompt, row in zip(prompts, together[::2]):
            tokens = list(prompt)
            for _ in range(len(row)):
                tokens.append(int(model(torch.tensor(tokens))[-1].argmax()))
            assert row == tokens[len(prompt):]


# --- training, compiled, CORE ------------------------------------------------------------------------------------

def packed_batch(lengths, vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocab_size, (sum(lengths),), generator=generator)
    targets = torch.randint(0, vocab_size, (sum(lengths),), generator=generator)
    return inputs, targets, torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32), max(lengths)


@pytest.mark.parametrize("tricks", list(TRICKS))
def test_a_training_step_lowers_the_loss(tricks):
    model = tricked_model(TRICKS[tricks], short_window=5).train()
    optimizers = sc.build_optimizers(model)
    batch = packed_batch([9, 14, 5], 128)
    losses = []
    for _ in range(3):
        loss = model(batch[0], batch[2], batch[3], batch[1], windows=model.layer_windows(4))
        loss.backward()
        losses.append(loss.item())
        sc.step_optimizers(optimizers)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < losses[0]


@pytest.mark.skipif("flex" not in BACKENDS, reason="the compiled path of these tests runs flex on the CPU")
@pytest.mark.parametrize("tricks", list(TRICKS))
def test_compiled_layers_match_eager(tricks):
    """aot_eager (dynamo's tracing and guards, no C++ compiler): losses and gradients of two packings equal eager's."""
    torch._dynamo.reset()
    eager = tricked_model(TRICKS[tricks], short_window=5).train()
    compiled = tricked_model(TRICKS[tricks], short_window=5).train().compile_layers("aot_eager")
    for step, lengths in enumerate([[3, 11, 6], [7, 14]]):
        inputs, targets, cu_seqlens, max_seqlen = packed_batch(lengths, 128, seed=step)
        losses = [model(inputs, cu_seqlens, max_seqlen, targets, backend="flex") for model in (eager, compiled)]
        torch.testing.assert_close(losses[1], losses[0])
        for model, loss in zip((eager, compiled), losses):
            model.zero_grad()
            loss.backward()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_caller_masks_are_refused_and_core_scores_plain_documents():
    """CORE's shared-prefix masks cannot express a token's predecessor or a pair's interleaving: the model refuses
    masks, and score_core_records packs such a model's choices as plain documents, scoring as one at a time does."""
    model = tricked_model(TRICKS["modded"])
    ids = torch.randint(0, 128, (12,))
    mask = sc.shared_prefix_mask_mod(torch.zeros(12, dtype=torch.long), torch.zeros(12, dtype=torch.long),
                                     torch.arange(12), None)
    with pytest.raises(ValueError, match="windows as ints or None, not masks"):
        model(ids, windows=[mask] * 4)
    generator = np.random.default_rng(0)
    tokens, records = [], []
    for example in range(3):  # multiple choice: a shared context, three continuations of 2-4 tokens
        context = generator.integers(0, 128, 9)
        for choice in range(3):
            start = sum(map(len, tokens))
            tokens.append(np.concatenate([context, generator.integers(0, 128, 2 + choice)]))
            records.append((start, start + 9, start + len(tokens[-1]), example, choice, int(choice == 1)))
    tokens = np.concatenate(tokens)
    records = np.array(records, dtype=np.int32)
    alone = sc.score_core_records(model, tokens, records, "sdpa", "cpu", pack_tokens=0)
    packed = sc.score_core_records(model, tokens, records, "sdpa", "cpu", pack_tokens=64)
    np.testing.assert_allclose(packed, alone, atol=1e-4)


@pytest.mark.parametrize("settings, message", [
    (dict(key_offset=True, head_dim=18, model_dim=72), "divisible by 4"),
    (dict(paired_head_layers=(4,)), r"\[4\] are not layers"),
    (dict(paired_head_layers=(0,), model_dim=48), "even number of heads"),
])
def test_bad_trick_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        sc.GPTConfig(**{**dict(vocab_size=8, depth=4, model_dim=64, head_dim=16), **settings})
