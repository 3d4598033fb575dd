"""modded-nanogpt's smear and backout as GPTConfig switches (stackcore section 6): cached decoding against the full
forward pass on every CPU backend (prefill in pieces, packed prompts, rows at different positions, a waiting row),
packed documents that smear nothing into each other, gradients and optimizer groups of the new parameters,
checkpoints with and without them, and the switches off (or at zero) leaving the outputs unchanged."""
import dataclasses

import numpy as np
import pytest
import torch

import stackcore as sc
from test_engine import assert_packed_prefill_matches_full_passes, one_thread  # noqa: F401 (autouse, faster)
from test_modded_tricks import (BACKENDS, TOLERANCE, assert_a_waiting_row_resumes_as_the_full_pass,
                                assert_cached_decoding_matches_the_full_pass, packed_batch, tricked_model)

TRICKS = {
    "smear": dict(smear=True),
    "backout": dict(backout=True),
    "both": dict(smear=True, backout=True),
    "with_key_offset": dict(smear=True, backout=True, key_offset=True),  # two tricks carrying state in one cache
}


def test_the_switches_add_their_parameters_to_adams_scalars():
    model = tricked_model(TRICKS["both"])
    assert model.config.backout_layer == 2  # of depth 4: two thirds, as modded's 8 of 11
    assert sc.GPTConfig(depth=12).backout_layer == 8
    assert model.smear_gate.shape == (12,) and model.smear_lambda.shape == model.backout_lambda.shape == (1,)
    scalars = next(group for group in model.param_groups() if group["kind"] == "scalars")
    assert scalars["optimizer"] == "adam"
    new = {id(p) for p in (model.smear_gate, model.smear_lambda, model.backout_lambda)}
    assert new <= {id(p) for p in scalars["params"]}
    fresh = sc.GPT(model.config)  # smear starts as the identity, backout at modded's 0.5
    assert not fresh.smear_gate.any() and not fresh.smear_lambda.any() and fresh.backout_lambda.item() == 0.5
    plain = tricked_model({})
    assert plain.smear_gate is plain.smear_lambda is plain.backout_lambda is None
    assert not any("smear" in name or "backout" in name for name in plain.state_dict())
    modded = sc.GPTConfig(depth=12).modded_architecture()  # what a record measured: the switches stay separate
    assert not modded.smear and not modded.backout and modded.plain_documents_only


def test_smear_adds_the_gated_predecessor_within_documents():
    """smear_embeddings against a loop: token t gets lambda * sigmoid(gate . its first 12 channels) times token t-1's
    embedding, except at a document's start, which stays as it was."""
    model = tricked_model(TRICKS["smear"])
    x = torch.randn(9, 64)
    cu_seqlens = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    in_documents = sc.positions_in_documents(cu_seqlens, 9)
    previous, _, _ = model.trick_inputs(in_documents, in_documents)
    batch = sc.AttentionBatch(cu_seqlens, 4, torch.zeros(9, 8), torch.zeros(9, 8), previous=previous)
    with torch.no_grad():
        smeared = model.smear_embeddings(x, batch, in_documents > 0)
        for t in range(9):
            share = model.smear_lambda * torch.sigmoid(x[t, :12] @ model.smear_gate)
            expected = x[t] if t in (0, 4, 5) else x[t] + share * x[t - 1]
            torch.testing.assert_close(smeared[t], expected)


def test_backout_subtracts_the_residual_after_two_thirds_of_the_layers():
    """The model with backout equals the same weights without it, whose last block's output has backout_lambda times
    block 1's output (after 2 of 4 layers) taken away."""
    model = tricked_model(TRICKS["backout"])
    plain = tricked_model({})
    plain.load_state_dict(model.state_dict(), strict=False)
    captured = []
    plain.blocks[1].register_forward_hook(lambda module, args, out: captured.append(out))
    plain.blocks[3].register_forward_hook(lambda module, args, out: out - model.backout_lambda * captured[-1])
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("short_window", [0, 5], ids=["full", "window5"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tricks", list(TRICKS))
def test_cached_decoding_matches_the_full_forward_pass(tricks, backend, short_window):
    """Two rows, prefilled and decoded in pieces (test_modded_tricks), against each row's full forward pass."""
    assert_cached_decoding_matches_the_full_pass(tricked_model(TRICKS[tricks], short_window), backend, rows=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tricks", list(TRICKS))
def test_prompts_prefilled_together_in_one_packed_pass(tricks, backend):
    """PackedPrompts: prompts of 7, 12 and 3 tokens in one pass, two rows each, then 4 tokens in every row."""
    assert_packed_prefill_matches_full_passes(tricked_model(TRICKS[tricks], short_window=5), backend)


@pytest.mark.parametrize("tricks", list(TRICKS))
def test_rows_at_different_positions_decode_together(tricks):
    """Rows prefilled apart through views (10, 6 and 1 tokens), then 5 tokens a row stepped together, one pass a
    step: every row's logits equal its own full forward pass, so each row smears its own last embedding."""
    model = tricked_model(TRICKS[tricks], short_window=5)
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(4))
    lengths = [10, 6, 1]
    with torch.no_grad():
        cache = sc.KVCache(model.config, 3, 20, "cpu", torch.float32)
        views = [cache.rows(row, row + 1) for row in range(3)]
        for row, (view, length) in enumerate(zip(views, lengths)):
            model(ids[row:row + 1, :length], kv_cache=view)
        steps = torch.cat([model(torch.stack([ids[row, length + t] for row, length in enumerate(lengths)])[:, None],
                                 kv_cache=cache) for t in range(5)], dim=1)
        for row, length in enumerate(lengths):
            full = model(ids[row, :length + 5])
            torch.testing.assert_close(steps[row], full[length:], atol=TOLERANCE, rtol=0)


def test_a_waiting_row_keeps_its_carried_embedding():
    """A row that waits at <|python_end|> while another steps resumes smearing its own last embedding."""
    assert_a_waiting_row_resumes_as_the_full_pass(tricked_model(TRICKS["both"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tricks", ["smear", "both"])
def test_packed_documents_smear_nothing_into_each_other(tricks, backend):
    """Documents A, B, C packed in one row: other tokens in A (its last one included, which B's first would smear)
    change A's logits and not one of B's or C's; each document's logits equal its pass alone."""
    model = tricked_model(TRICKS[tricks], short_window=5)
    lengths = [7, 1, 13]
    ids = torch.randint(0, 128, (sum(lengths),), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[:7] = (ids[:7] + 1) % 128
    cu_seqlens = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    with torch.no_grad():
        packed, changed = (model(row, cu_seqlens, max(lengths), backend=backend) for row in (ids, other))
        assert not torch.allclose(packed[:7], changed[:7], atol=1e-3)
        torch.testing.assert_close(changed[7:], packed[7:], atol=1e-6, rtol=0)
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            torch.testing.assert_close(packed[start:end], model(ids[start:end], backend=backend), atol=TOLERANCE,
                                       rtol=0)


@pytest.mark.parametrize("tricks", ["smear", "backout"])
def test_each_switch_changes_the_model_and_at_zero_changes_nothing(tricks):
    """The same weights without the switch give other logits; with its lambda at zero, bit-identical ones (and
    backout's logit_rows path as well): the off path is the model without the trick."""
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(2))
    model, plain = tricked_model(TRICKS[tricks]), tricked_model({})
    plain.load_state_dict(model.state_dict(), strict=False)  # the same weights; the trick's are extra
    rows = torch.tensor([3, 17, 29])
    with torch.no_grad():
        assert not torch.allclose(model(ids), plain(ids), atol=1e-3)
        (model.smear_lambda if tricks == "smear" else model.backout_lambda).zero_()
        assert torch.equal(model(ids), plain(ids))
        assert torch.equal(model(ids, logit_rows=rows), plain(ids, logit_rows=rows))


@pytest.mark.parametrize("tricks", ["both", "with_key_offset"])
def test_gradients_reach_the_new_parameters_and_training_lowers_the_loss(tricks):
    model = tricked_model(TRICKS[tricks], short_window=5).train()
    optimizers = sc.build_optimizers(model)
    inputs, targets, cu_seqlens, max_seqlen = packed_batch([9, 14, 5], 128)
    before = [p.detach().clone() for p in (model.smear_gate, model.smear_lambda, model.backout_lambda)]
    losses = []
    for _ in range(3):
        loss = model(inputs, cu_seqlens, max_seqlen, targets, windows=model.layer_windows(4))
        loss.backward()
        for name in ("smear_gate", "smear_lambda", "backout_lambda"):
            grad = getattr(model, name).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        losses.append(loss.item())
        sc.step_optimizers(optimizers)
    assert losses[-1] < losses[0]
    after = (model.smear_gate, model.smear_lambda, model.backout_lambda)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_a_fresh_smear_learns_its_lambda_first():
    """At initialisation (lambda 0) the gate has no gradient yet; the lambda has, so smear can switch itself on."""
    model = sc.GPT(sc.GPTConfig(vocab_size=64, depth=2, model_dim=32, head_dim=16, max_seq_len=32, smear=True))
    with torch.no_grad():
        for block in model.blocks:  # non-zero projections and head, so the loss reads the embeddings
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 0.1)
    inputs, targets, cu_seqlens, max_seqlen = packed_batch([9, 7], 64)
    model(inputs, cu_seqlens, max_seqlen, targets).backward()
    assert model.smear_lambda.grad.abs().item() > 0 and not model.smear_gate.grad.any()


@pytest.mark.skipif("flex" not in BACKENDS, reason="the compiled path of these tests runs flex on the CPU")
def test_compiled_layers_match_eager():
    """aot_eager (dynamo's tracing, no C++ compiler): loss and gradients of a packing equal eager's."""
    torch._dynamo.reset()
    eager = tricked_model(TRICKS["both"], short_window=5).train()
    compiled = tricked_model(TRICKS["both"], short_window=5).train().compile_layers("aot_eager")
    inputs, targets, cu_seqlens, max_seqlen = packed_batch([3, 11, 6], 128)
    losses = [model(inputs, cu_seqlens, max_seqlen, targets, backend="flex") for model in (eager, compiled)]
    torch.testing.assert_close(losses[1], losses[0])
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)


def save_checkpoint(path, model, model_config: dict) -> None:
    torch.save({"model": model.state_dict(), "model_config": model_config, "step": 1}, path)


def test_checkpoints_keep_the_switches_and_old_ones_load_without_them(tmp_path):
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(5))
    model = tricked_model(TRICKS["both"])
    save_checkpoint(tmp_path / "step_000001.pt", model, dataclasses.asdict(model.config))
    loaded, _ = sc.model_from_checkpoint(tmp_path / "step_000001.pt", "cpu")
    assert loaded.config.smear and loaded.config.backout
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model(ids))
    old = tricked_model({})
    old_config = {key: value for key, value in dataclasses.asdict(old.config).items()
                  if key not in ("smear", "backout")}  # as written before the switches existed
    save_checkpoint(tmp_path / "step_000002.pt", old, old_config)
    loaded, _ = sc.model_from_checkpoint(tmp_path / "step_000002.pt", "cpu")
    assert not loaded.config.smear and not loaded.config.backout
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), old(ids))


def test_caller_masks_are_refused_with_smear():
    """CORE's shared-prefix masks cannot say which token precedes which: a smearing model takes plain documents."""
    model = tricked_model(TRICKS["smear"])
    mask = sc.shared_prefix_mask_mod(torch.zeros(12, dtype=torch.long), torch.zeros(12, dtype=torch.long),
                                     torch.arange(12), None)
    with pytest.raises(ValueError, match="smear or paired_head_layers takes windows as ints or None"):
        model(torch.randint(0, 128, (12,)), windows=[mask] * 4)


def test_backout_needs_two_layers():
    with pytest.raises(ValueError, match="backout needs depth >= 2"):
        sc.GPTConfig(vocab_size=8, depth=1, model_dim=64, head_dim=16, backout=True)
