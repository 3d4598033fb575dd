"""Tests for stackcore's model section: attention backends, GPT, Muon / AdamW, schedules, Triton kernel.

The Triton kernel is tested in a subprocess with TRITON_INTERPRET=1 (triton reads it when the kernel is
decorated, i.e. when stackcore is imported), so this process keeps the normal CPU code paths.
"""
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.multiprocessing as mp

import stackcore as part
from notebooks.training import short_window_schedule

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root, where stackcore.py lives
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def cu_seqlens_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def naive_attention(q, k, v, cu_seqlens, window):
    """float64 masked softmax over the full T x T matrix."""
    q, k, v = q.double(), k.double(), v.double()
    total = q.size(0)
    doc = part.document_ids(cu_seqlens, total)
    i = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (j <= i)
    if window is not None:
        allowed &= i - j < window
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def tiny_config(**overrides):
    settings = dict(vocab_size=256, depth=2, model_dim=64, head_dim=32, max_seq_len=64, short_window=8)
    settings.update(overrides)
    return part.GPTConfig(**settings)


def perturbed_model(config, seed=0):
    """Model whose zero-initialised projections are made random, so every path carries signal."""
    torch.manual_seed(seed)
    model = part.GPT(config)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
        model.lm_head.weight.normal_(std=0.1)
        model.x0_lambdas.fill_(0.3)
    return model


def packed_batch(lengths, vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    tokens = torch.randint(0, vocab_size, (total + 1,), generator=generator)
    return tokens[:-1], tokens[1:], cu_seqlens_of(lengths), max(lengths)


DOC_LENGTHS = [1, 7, 1, 20, 3, 12]
CPU_BACKENDS = part.available_attention_backends("cpu")


# ---------------------------------------------------------------------------------------------
# Attention backends
# ---------------------------------------------------------------------------------------------

def test_cpu_has_flex_and_sdpa_only():
    assert CPU_BACKENDS == ["flex", "sdpa"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [None, 4])
def test_attention_matches_float64_reference(backend, window):
    # fp32 backends vs float64 reference: forward within 1e-5, grads within 1e-4 (absolute)
    torch.manual_seed(0)
    cu_seqlens = cu_seqlens_of(DOC_LENGTHS)
    q, k, v = (torch.randn(sum(DOC_LENGTHS), 3, 16, requires_grad=True) for _ in range(3))
    out = part.attention(q, k, v, cu_seqlens, max(DOC_LENGTHS), window, backend)
    expected = naive_attention(q, k, v, cu_seqlens, window)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)

    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream.double())
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad.double(), atol=1e-4, rtol=1e-4)

    # without autograd, flex runs the real FlexAttention path (its CPU backward falls back to a dense mask)
    with torch.no_grad():
        torch.testing.assert_close(part.attention(q, k, v, cu_seqlens, max(DOC_LENGTHS), window, backend).double(),
                                   expected, atol=1e-5, rtol=1e-5)


def test_window_one_attends_to_itself_only():
    torch.manual_seed(0)
    cu_seqlens = cu_seqlens_of([5, 4])
    q, k, v = torch.randn(3, 9, 2, 8)
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(part.attention(q, k, v, cu_seqlens, 5, 1, backend), v)


@pytest.mark.parametrize("window", [None, 4])
def test_flex_takes_a_prebuilt_block_mask(window):
    # the model builds one BlockMask per window outside torch.compile and passes it down as the window
    torch.manual_seed(0)
    cu_seqlens, total = cu_seqlens_of(DOC_LENGTHS), sum(DOC_LENGTHS)
    q, k, v = (torch.randn(total, 3, 16, requires_grad=True) for _ in range(3))
    mask = part.flex_block_mask(cu_seqlens, total, window)
    expected = naive_attention(q, k, v, cu_seqlens, window)
    torch.testing.assert_close(part.attention(q, k, v, cu_seqlens, max(DOC_LENGTHS), mask, "flex").double(),
                               expected, atol=1e-5, rtol=1e-5)  # CPU autograd: dense SDPA from the mask's mask_mod
    with torch.no_grad():
        torch.testing.assert_close(part.attention(q, k, v, cu_seqlens, max(DOC_LENGTHS), mask, "flex").double(),
                                   expected, atol=1e-5, rtol=1e-5)


def fake_flash_varlen(fa4: bool):
    """A flash_attn_varlen_func with FA2's or FA4's calling conventions, computed by naive_attention: FA4 has `qv`
    before cu_seqlens_q, returns (out, lse) and takes None, not -1, for an unlimited left window."""
    def reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size):
        assert causal and window_size[1] == 0 and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        left = window_size[0]
        assert (left is None or left >= 0) if fa4 else (left is not None), f"unlimited window passed as {left}"
        window = None if left is None or left < 0 else left + 1
        return naive_attention(q, k, v, cu_seqlens_q, window).to(q.dtype)

    def fa2(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, window_size=(-1, -1)):
        return reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size)

    def fa4(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
            causal=False, window_size=(None, None)):
        assert qv is None
        out = reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size)
        return out, torch.zeros(q.size(1), q.size(0))

    function = fa4 if fa4 else fa2
    function.__module__ = "flash_attn.cute.interface" if fa4 else "flash_attn.flash_attn_interface"
    return function


@pytest.mark.parametrize("fa4", [False, True])
@pytest.mark.parametrize("window", [None, 4])
def test_flash_backend_speaks_fa2_and_fa4_conventions(fa4, window, monkeypatch):
    # with gradients FlashAttention's own function is called; without, the stackcore::flash_forward op around it
    monkeypatch.setattr(part, "_flash_varlen_function", lambda: fake_flash_varlen(fa4))
    torch.manual_seed(0)
    cu_seqlens = cu_seqlens_of(DOC_LENGTHS)
    q, k, v = torch.randn(3, sum(DOC_LENGTHS), 3, 16)
    expected = naive_attention(q, k, v, cu_seqlens, window)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out = part.attention(*(t.requires_grad_(grad) for t in (q, k, v)), cu_seqlens, max(DOC_LENGTHS), window,
                                 "flash")
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_compiled_layers_call_flash_as_one_op(monkeypatch):
    # evaluation through compiled layers: each block's graph holds the flash op whole, not FlashAttention's Python
    monkeypatch.setattr(part, "_flash_varlen_function", lambda: fake_flash_varlen(True))
    torch._dynamo.reset()
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    config = tiny_config(depth=2)
    eager, compiled = (perturbed_model(config),
                       perturbed_model(config).compile_layers(recording_backend, evaluation=True))
    inputs, _, cu_seqlens, max_seqlen = packed_batch([7, 12, 3], config.vocab_size)
    with torch.no_grad():
        logits = [model(inputs, cu_seqlens, max_seqlen, backend="flash") for model in (eager, compiled)]
    torch.testing.assert_close(logits[1], logits[0])
    ops = [sum(node.target == torch.ops.stackcore.flash_forward.default for node in g.graph.nodes) for g in graphs]
    assert ops == [2], ops  # one graph over both layers, a call per layer


def test_positions_and_document_ids():
    cu_seqlens = cu_seqlens_of([2, 1, 3])
    assert part.document_ids(cu_seqlens, 6).tolist() == [0, 0, 1, 2, 2, 2]
    assert part.positions_in_documents(cu_seqlens, 6).tolist() == [0, 1, 0, 0, 1, 2]


def test_pick_attention_backend():
    assert part.pick_attention_backend("cpu") == "sdpa"  # flex has no CPU backward: the loop is faster there
    assert part.pick_attention_backend("cpu", "flex") == "flex"
    assert part.pick_attention_backend("cpu", "sdpa") == "sdpa"
    with pytest.raises(ValueError, match="valid names here.*'sdpa'"):
        part.pick_attention_backend("cpu", "flash")  # CUDA only
    with pytest.raises(ValueError, match="not available"):
        part.pick_attention_backend("cpu", "no-such-backend")
    with pytest.raises(ValueError, match="valid names"):
        part.attention(*torch.randn(3, 4, 1, 8), cu_seqlens_of([4]), 4, backend="no-such-backend")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def test_config_resolution_and_validation():
    config = part.GPTConfig(depth=4, head_dim=64)
    assert (config.dim, config.n_heads, config.window, config.value_embed_tables) == (256, 4, 1024, 2)
    with pytest.raises(ValueError, match="divisible by head_dim"):
        part.GPTConfig(depth=3, head_dim=128)  # dim 192
    with pytest.raises(ValueError, match="n_value_embeds"):
        part.GPTConfig(depth=4, n_value_embeds=-1)
    with pytest.raises(ValueError, match="window_pattern"):
        part.GPTConfig(window_pattern="SXL")


def test_layer_windows_follow_pattern():
    model = part.GPT(tiny_config(depth=6, window_pattern="SSL", short_window=16))
    assert model.layer_windows() == [16, 16, None, 16, 16, None]
    assert model.layer_windows(32) == [32, 32, None, 32, 32, None]
    model = part.GPT(tiny_config(depth=3, window_pattern="S", short_window=0))
    assert model.layer_windows() == [32, 32, None]  # 0 -> max_seq_len // 2, last layer always full


def test_value_embed_wiring_is_symmetric():
    model = part.GPT(tiny_config(depth=6, n_value_embeds=2))
    assert [model.value_embed_index(i) for i in range(6)] == [0, 1, None, None, 1, 0]
    assert [block.attn.value_mix is not None for block in model.blocks] == [True, True, False, False, True, True]


def test_initial_loss_is_log_vocab_and_shapes():
    config = tiny_config()
    model = part.GPT(config)
    inputs, targets, cu_seqlens, max_seqlen = packed_batch([5, 9, 1], config.vocab_size)
    logits = model(inputs, cu_seqlens, max_seqlen)
    assert logits.shape == (15, 256) and logits.dtype == torch.float32
    loss = model(inputs, cu_seqlens, max_seqlen, targets)
    assert abs(loss.item() - math.log(256)) < 1e-4

    targets = targets.clone()
    targets[3] = -1
    per_token = model(inputs, cu_seqlens, max_seqlen, targets, loss_reduction="none")
    assert per_token.shape == (15,) and per_token[3] == 0
    total = model(inputs, cu_seqlens, max_seqlen, targets, loss_reduction="sum")
    torch.testing.assert_close(total, per_token.sum())
    torch.testing.assert_close(model(inputs, cu_seqlens, max_seqlen, targets), total / 14)


def test_packed_forward_equals_separate_documents():
    config = tiny_config(depth=4, short_window=4)
    model = perturbed_model(config)
    lengths = [3, 1, 11, 6]
    inputs, _, cu_seqlens, max_seqlen = packed_batch(lengths, config.vocab_size)
    packed = model(inputs, cu_seqlens, max_seqlen)
    separate = torch.cat([model(doc, cu_seqlens_of([len(doc)]), len(doc)) for doc in inputs.split(lengths)])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def test_backends_give_same_logits_as_sdpa():
    config = tiny_config(depth=4, short_window=4)
    model = perturbed_model(config)
    inputs, _, cu_seqlens, max_seqlen = packed_batch([3, 1, 11, 6], config.vocab_size)
    reference = model(inputs, cu_seqlens, max_seqlen, backend="sdpa")
    for backend in CPU_BACKENDS:
        for grad_enabled in (True, False):
            with torch.set_grad_enabled(grad_enabled):
                logits = model(inputs, cu_seqlens, max_seqlen, backend=backend)
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_max_seqlen_is_checked():
    model = part.GPT(tiny_config(max_seq_len=8))
    inputs, _, cu_seqlens, _ = packed_batch([9], 256)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(inputs, cu_seqlens, 9)


def reference_softcapped_ce(h, weight, targets, softcap, reduction):
    return F.cross_entropy(softcap * torch.tanh((h @ weight.T).float() / softcap), targets, ignore_index=-1,
                           reduction=reduction)


@pytest.mark.parametrize("compile_backend", [None, "inductor"])
def test_chunked_softcapped_cross_entropy_matches_reference(compile_backend):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    weight = (3 * torch.randn(50, 16)).requires_grad_()  # logits well past the cap of 5
    targets = torch.randint(0, 50, (37,))
    targets[[3, 20]] = -1
    for reduction in ("mean", "sum"):  # 5 chunks of 8 rows, the last one short
        loss = part.softcapped_cross_entropy(h, weight, targets, 5.0, reduction, chunk_tokens=8,
                                             compile_backend=compile_backend)
        expected = reference_softcapped_ce(h, weight, targets, 5.0, reduction)
        torch.testing.assert_close(loss, expected)
        grads = torch.autograd.grad(3 * loss, (h, weight))
        for grad, expected_grad in zip(grads, torch.autograd.grad(3 * expected, (h, weight))):
            torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    per_token = part.softcapped_cross_entropy(h, weight, targets, 5.0, "none", chunk_tokens=8)
    with torch.no_grad():
        chunked = part.softcapped_cross_entropy(h, weight, targets, 5.0, "none", chunk_tokens=8)
        torch.testing.assert_close(part.softcapped_cross_entropy(h, weight, targets, 5.0, "sum", chunk_tokens=8),
                                   per_token.sum())
    torch.testing.assert_close(chunked, per_token.detach())
    assert chunked[3] == chunked[20] == 0
    with pytest.raises(ValueError, match="reduction"):
        part.softcapped_cross_entropy(h, weight, targets, 5.0, "max")


def test_chunked_softcapped_cross_entropy_in_bf16():
    # bf16 activations, fp32 master weight: the weight gradient is summed over chunks in fp32
    torch.manual_seed(1)
    h = torch.randn(300, 32).bfloat16().requires_grad_()
    weight = torch.randn(64, 32).requires_grad_()
    targets = torch.randint(0, 64, (300,))
    loss = part.softcapped_cross_entropy(h, weight, targets, 15.0, chunk_tokens=64)
    expected = reference_softcapped_ce(h, weight.bfloat16(), targets, 15.0, "mean")
    grads = torch.autograd.grad(loss, (h, weight))
    expected_grads = torch.autograd.grad(expected, (h, weight))
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-3, rtol=1e-3)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.float(), expected_grad.float(), atol=2e-4, rtol=2e-2)


def dense_window_attention(q, k, v, cu_seqlens, max_seqlen, window):
    """Masked SDPA with the window as a Python int (None: full), like the varlen and flash backends take it."""
    doc = part.document_ids(cu_seqlens, q.size(0))
    i = torch.arange(q.size(0))[:, None]
    allowed = (doc[:, None] == doc[None, :]) & (i >= i.T)
    if window is not None:
        allowed = allowed & (i - i.T < window)
    return F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=allowed).transpose(0, 1)


@pytest.mark.parametrize("backend", ["flex", "int_window"])
def test_compiled_layers_match_eager_and_never_recompile(backend, monkeypatch):
    # 6 layers: value embeddings in layers 0 and 5, full windows in layers 3 and 5. The first step compiles a
    # graph per block structure (int_window: 4; flex, whose windows are all BlockMasks: 2), four for the residual
    # mixing (with and without a U-net skip, and with the inputs that alias: x is x0 in layer 0, the skip is x in
    # layer 3) and one for the loss; new packings and windows compile nothing more.
    monkeypatch.setitem(part._ATTENTION_FUNCTIONS, "int_window", dense_window_attention)
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    config = tiny_config(depth=6, n_value_embeds=1)
    eager, compiled = perturbed_model(config), perturbed_model(config).compile_layers("aot_eager", evaluation=True)
    graphs = []
    for step, (lengths, window) in enumerate([([3, 1, 11, 6], 4), ([7, 14], 4), ([5, 5, 5, 6], 8), ([21], 12)]):
        inputs, targets, cu_seqlens, max_seqlen = packed_batch(lengths, config.vocab_size, seed=step)
        windows = eager.layer_windows(window)
        losses = [model(inputs, cu_seqlens, max_seqlen, targets, windows=windows, backend=backend)
                  for model in (eager, compiled)]
        torch.testing.assert_close(losses[1], losses[0])
        for loss in losses:
            loss.backward()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [(4 if backend == "int_window" else 2) + 4 + 1] * 4, graphs
    # evaluation (no gradients) compiles all layers as one graph (the loss's no-grad path is eager), then new
    # packings compile nothing. Counted per function: on the CPU, flex's own eager path compiles per shape
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    def entries():
        return [len(_debug_get_cache_entry_list(f.__code__))
                for f in (part._run_block, part.residual_mix, part.GPT.run_layers)]
    trained = entries()
    assert trained == [4 if backend == "int_window" else 2, 4, 0], trained
    with torch.no_grad():  # compiled for training only: evaluation stays eager
        perturbed_model(config).compile_layers("aot_eager")(inputs, cu_seqlens, max_seqlen, backend=backend)
    assert entries() == trained
    with torch.no_grad():
        for step, lengths in enumerate([[9, 2, 4], [30], [1, 6, 13]]):
            inputs, targets, cu_seqlens, max_seqlen = packed_batch(lengths, config.vocab_size, seed=10 + step)
            losses = [model(inputs, cu_seqlens, max_seqlen, targets, windows=windows, backend=backend,
                            loss_reduction="none") for model in (eager, compiled)]
            torch.testing.assert_close(losses[1], losses[0])
            assert entries() == trained[:2] + [1], (step, entries())


def test_bf16_compute_dtype_runs_close_to_fp32():
    config = tiny_config()
    model = perturbed_model(config)
    inputs, targets, cu_seqlens, max_seqlen = packed_batch([10, 6], config.vocab_size)
    fp32_loss = model(inputs, cu_seqlens, max_seqlen, targets)
    model.set_compute_dtype(torch.bfloat16)
    assert all(m.compute_dtype == torch.bfloat16 for m in model.modules() if isinstance(m, part.CastedLinear))
    bf16_loss = model(inputs, cu_seqlens, max_seqlen, targets)
    assert bf16_loss.dtype == torch.float32
    assert abs(bf16_loss.item() - fp32_loss.item()) < 0.05
    assert model.lm_head.weight.dtype == torch.float32  # master weights stay fp32


def test_weights_cast_for_inference_give_the_same_logits():
    # the matmuls saw bf16 copies of the fp32 master weights; stored in bf16 they give the very same logits
    config = tiny_config()
    model = perturbed_model(config)
    model.set_compute_dtype(torch.bfloat16)
    inputs, _, cu_seqlens, max_seqlen = packed_batch([10, 6], config.vocab_size)
    with torch.no_grad():
        before = model(inputs, cu_seqlens, max_seqlen)
        model.cast_weights_for_inference()
        after = model(inputs, cu_seqlens, max_seqlen)
    assert torch.equal(after, before)
    assert {p.dtype for p in model.parameters() if p.ndim >= 2} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.ndim < 2} == {torch.float32}  # the scalars keep fp32
    with pytest.raises(ValueError, match="fp32 master weights"):
        part.build_optimizers(model)


def test_unet_skips_and_x0_mixing_feed_the_documented_layers():
    # block input of layer i = resid[i] * (x + skip[depth-1-i] * output of layer depth-1-i) + x0_lambda[i] * x0,
    # the skip term only in the second half; checked with hooks and distinct scalars per layer
    config = tiny_config(depth=5)
    model = perturbed_model(config)
    with torch.no_grad():
        model.resid_lambdas.copy_(torch.tensor([0.9, 1.1, 1.2, 0.8, 1.3]))
        model.x0_lambdas.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
        model.skip_weights.copy_(torch.tensor([0.7, 1.6]))
    inputs, _, cu_seqlens, max_seqlen = packed_batch([6, 9], config.vocab_size)
    block_inputs, block_outputs = [], []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: block_inputs.append(args[0]))
        block.register_forward_hook(lambda module, args, output: block_outputs.append(output))
    model(inputs, cu_seqlens, max_seqlen)
    x0 = part.norm(model.wte(inputs))
    r, a, w = model.resid_lambdas, model.x0_lambdas, model.skip_weights
    x = x0
    for i in range(5):
        if i >= 3:  # layers 3 and 4 receive the outputs of layers 1 and 0
            x = x + w[4 - i] * block_outputs[4 - i]
        torch.testing.assert_close(block_inputs[i], r[i] * x + a[i] * x0, msg=f"layer {i}")
        x = block_outputs[i]


def test_gradient_reaches_every_parameter():
    config = tiny_config(depth=4)
    model = perturbed_model(config)
    inputs, targets, cu_seqlens, max_seqlen = packed_batch([12, 7, 1], config.vocab_size)
    model(inputs, cu_seqlens, max_seqlen, targets).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_param_counts_and_groups():
    config = tiny_config(depth=4)
    model = part.GPT(config)
    counts = model.num_params()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    dim, vocab = 64, 256
    assert counts["matrices"] == 4 * (4 * dim * dim + 2 * 4 * dim * dim)
    assert counts["embedding"] == counts["head"] == vocab * dim
    assert counts["value_embeds"] == 2 * vocab * dim
    assert counts["scalars"] == 4 + 4 + 2 + 4 * 2  # resid, x0, skip, value_mix in 4 layers

    groups = {g["kind"]: g for g in model.param_groups()}
    assert groups["matrices"]["optimizer"] == "muon" and all(p.ndim == 2 for p in groups["matrices"]["params"])
    assert groups["head"]["lr"] == pytest.approx(0.008 * (64 / 768) ** -0.5)
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))

    full = [None] * 4
    expected = 6 * (counts["matrices"] + counts["head"]) + 12 * 4 * 2 * 32 * 64 / 2
    assert model.flops_per_token(64, full) == pytest.approx(expected)
    assert model.flops_per_token(64, [8] * 4) < expected
    assert model.kv_bytes_per_token(torch.bfloat16) == 2 * 4 * 64 * 2


# ---------------------------------------------------------------------------------------------
# Optimizer and schedules
# ---------------------------------------------------------------------------------------------

def test_polar_express_coefficients_reproduce_published_values():
    # paper's repo (cushion 0.02407..., no safety factor): first polynomial
    paper = part.polar_express_coefficients(8, cushion=0.02407327424182761, safety=1.0)[0]
    assert paper == pytest.approx((8.28721201814563, -23.595886519098837, 17.300387312530933), rel=1e-9)
    # modded-nanogpt's table is the same recipe with a 2% safety factor
    modded = part.polar_express_coefficients(5, safety=1.02)
    assert modded[0] == pytest.approx((8.156554524902461, -22.48329292557795, 15.878769915207462), rel=1e-9)
    assert modded[-1] == pytest.approx((2.3465413258596377, -1.7097828382687081, 0.42323551169305323), rel=1e-9)


def test_polar_express_composition_maps_interval_near_one():
    x = torch.logspace(-3, 0, 5000, dtype=torch.float64) / 1.01
    for a, b, c in part.polar_express_coefficients():
        x = a * x + b * x**3 + c * x**5
    assert 0.85 < x.min() and x.max() < 1.15
    assert len(part.polar_express_coefficients(12)) == 12  # long schedules reach the collapsed-interval limit


@pytest.mark.parametrize("method,band", [("polar_express", (0.8, 1.2)), ("newton_schulz", (0.5, 1.3))])
@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (4, 48, 24), (96, 96)])
def test_orthogonalize_singular_values(method, band, shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    if shape[-1] == shape[-2]:  # square Gaussian matrices have near-zero singular values: give them a floor
        u, _, vh = torch.linalg.svd(g)
        g = u @ torch.diag(torch.linspace(0.05, 1.0, shape[-1])) @ vh
    singular_values = torch.linalg.svdvals(part.orthogonalize(g, method))
    assert band[0] < singular_values.min() and singular_values.max() < band[1], singular_values
    # the polar factor keeps the singular vectors: U V^T of g vs the result
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), part.orthogonalize(g, method).flatten(), dim=0) > 0.97


def test_muon_groups_by_shape_and_rejects_vectors():
    a, b, c = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4, 8))
    muon = part.Muon([a, b, c])
    assert sorted(len(g["params"]) for g in muon.param_groups) == [1, 2]
    with pytest.raises(ValueError, match="2D"):
        part.Muon([torch.nn.Parameter(torch.randn(3))])


def test_one_step_of_both_optimizers_lowers_loss():
    config = tiny_config()
    model = perturbed_model(config)
    inputs, targets, cu_seqlens, max_seqlen = packed_batch([20, 13, 1, 30], config.vocab_size)
    optimizers = part.build_optimizers(model)
    assert [type(o).__name__ for o in optimizers] == ["AdamW", "Muon"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = model(inputs, cu_seqlens, max_seqlen, targets)
    loss.backward()
    part.step_optimizers(optimizers)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        new_loss = model(inputs, cu_seqlens, max_seqlen, targets)
    assert new_loss < loss - 0.1, (loss.item(), new_loss.item())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(before), set(before) - changed


def test_apply_schedule_and_build_optimizer_overrides():
    model = part.GPT(tiny_config())
    adam, muon = part.build_optimizers(model, muon_lr=0.02, adam_lrs={"head": 0.001})
    assert {g["kind"]: g["lr"] for g in adam.param_groups}["head"] == 0.001
    part.apply_schedule([adam, muon], 0.5, momentum=0.9)
    assert all(g["lr"] == 0.01 and g["momentum"] == 0.9 for g in muon.param_groups)
    assert {g["kind"]: g["lr"] for g in adam.param_groups}["head"] == 0.0005
    with pytest.raises(ValueError, match="unknown kinds"):
        part.build_optimizers(model, adam_lrs={"heads": 0.1})


def test_schedules():
    lr = part.lr_multiplier
    assert lr(0, 1000, warmup_steps=10) == pytest.approx(0.1)
    assert lr(9, 1000, warmup_steps=10) == 1.0
    assert lr(599, 1000, cooldown_frac=0.4) == 1.0
    assert lr(800, 1000, cooldown_frac=0.4) == pytest.approx(0.5)
    assert lr(1000, 1000, cooldown_frac=0.4) == 0.0
    assert lr(1000, 1000, cooldown_frac=0.4, final_multiplier=0.1) == pytest.approx(0.1)
    assert part.muon_momentum(0) == 0.85 and part.muon_momentum(150) == pytest.approx(0.9)
    assert part.muon_momentum(10_000) == 0.95
    windows = [short_window_schedule(s, 100, 1024) for s in range(0, 101, 10)]
    assert windows[0] == 128 and windows[-1] == 1024 and windows == sorted(windows)
    assert all(w % 128 == 0 for w in windows)


def test_symmetric_matmul_reference_fallback_on_cpu():
    x = torch.randn(2, 5, 7)
    torch.testing.assert_close(part.symmetric_matmul(x), x @ x.mT)


TRITON_SCRIPT = textwrap.dedent("""
    import torch, stackcore as m
    assert m.triton is not None
    torch.manual_seed(0)
    cases = [((37, 53), torch.float32), ((3, 45, 21), torch.float32), ((2, 33, 40), torch.bfloat16), ((16, 16), torch.float32)]
    for shape, dtype in cases:
        x = torch.randn(shape).to(dtype)
        sym = m.symmetric_matmul_reference(x.float())
        for kwargs, expected in [({}, sym), (dict(alpha=0.5, addend=sym.to(dtype), beta=-2.0), 0.5 * sym - 2.0 * sym.to(dtype).float())]:
            out = m.symmetric_matmul(x, block_m=16, block_k=16, **kwargs)
            assert out.dtype == dtype and out.shape == expected.shape
            tol = 1e-4 if dtype == torch.float32 else 1e-2
            err = ((out.float() - expected).abs().max() / expected.abs().max()).item()
            assert err < tol, (shape, dtype, kwargs.keys(), err)
    s = torch.linalg.svdvals(m.orthogonalize(torch.randn(2, 24, 40)))
    assert 0.8 < s.min() and s.max() < 1.2, s
    print("TRITON-INTERPRETER-OK")
""")


@pytest.mark.skipif(part.triton is None, reason="triton not installed")
def test_symmetric_matmul_triton_kernel_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=HERE, env=env, capture_output=True,
                            text=True, timeout=120)
    assert "TRITON-INTERPRETER-OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Distributed: 2 gloo ranks, each with half of the global batch, take the single-process step
# ---------------------------------------------------------------------------------------------

DIST_CONFIG = dict(depth=3)  # 3 matrices of each MLP shape: exercises the padded Muon shard
DIST_HALVES = ([9, 1, 6], [4, 12])  # equal token counts (16 each): mean of rank means == global mean


def _dist_model_and_batch(rank=None):
    config = tiny_config(**DIST_CONFIG)
    model = perturbed_model(config, seed=1)
    halves = [packed_batch(lengths, config.vocab_size, seed=10 + i) for i, lengths in enumerate(DIST_HALVES)]
    if rank is not None:
        return model, halves[rank]
    inputs = torch.cat([h[0] for h in halves])
    targets = torch.cat([h[1] for h in halves])
    lengths = DIST_HALVES[0] + DIST_HALVES[1]
    return model, (inputs, targets, cu_seqlens_of(lengths), max(lengths))


def _momentum_buffers(model, muon):
    names = {p: name for name, p in model.named_parameters()}
    return {names[p]: state["momentum_buffer"] for p, state in muon.state.items()}


def _distributed_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, (inputs, targets, cu_seqlens, max_seqlen) = _dist_model_and_batch(rank)
        optimizers = part.build_optimizers(model)
        model(inputs, cu_seqlens, max_seqlen, targets).backward()
        part.step_optimizers(optimizers)
        torch.save((model.state_dict(), _momentum_buffers(model, optimizers[1])),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_step_matches_single_process(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, (inputs, targets, cu_seqlens, max_seqlen) = _dist_model_and_batch()
    optimizers = part.build_optimizers(model)
    model(inputs, cu_seqlens, max_seqlen, targets).backward()
    part.step_optimizers(optimizers)
    expected, expected_buffers = model.state_dict(), _momentum_buffers(model, optimizers[1])
    initial = _dist_model_and_batch()[0].state_dict()
    owned = []
    for rank in range(2):
        state, buffers = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in expected.items():
            assert not torch.equal(value, initial[name]), f"{name} did not move"
            torch.testing.assert_close(state[name], value, atol=1e-5, rtol=0, msg=f"rank {rank}: {name}")
        # each rank keeps Muon momentum only for its share; it must equal the single-process buffer,
        # which checks the gradient averaging (the orthogonalised update itself is scale-invariant)
        for name, buffer in buffers.items():
            torch.testing.assert_close(buffer, expected_buffers[name], atol=1e-6, rtol=1e-5, msg=name)
        owned.append(set(buffers))
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(expected_buffers)
