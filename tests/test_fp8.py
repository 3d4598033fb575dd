"""Tests for stackcore's fp8 matmuls: quantisation numerics against float64 references, fp8_linear forward and backward
against an emulation that quantises and dequantises, the layouts handed to torch._scaled_mm, the model's switch, and
03's `fp8` setting. torch._scaled_mm runs on this CPU build without CUDA's layout checks, so a checking fake stands in
for it where the layouts matter."""
import pytest
import torch

import stackcore as sc
from notebooks.config import configure
from test_hostile_config import CONFIGS

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MANTISSA_BITS = {E4M3: 3, E5M2: 2}
SMALLEST_SUBNORMAL = {E4M3: 2.0 ** -9, E5M2: 2.0 ** -16}
PretrainConfig = CONFIGS["03_pretrain"]


def dequantize(q: sc.Fp8Tensor) -> torch.Tensor:
    return q.data.double() * q.scale.double()


def emulate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded through `dtype` with the tensorwise scale computed in float64: what the fp8 matmul multiplies."""
    scale = x.double().abs().max().clamp(min=sc.FP8_MIN_AMAX) / torch.finfo(dtype).max
    return (x.double() / scale).float().to(dtype).double() * scale


# ---------------------------------------------------------------------------------------------
# quantisation numerics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_scale_is_amax_over_the_format_maximum(dtype):
    x = torch.tensor([[0.5, -3.0], [2.0, 1.0]])
    q = sc.quantize_fp8(x, dtype)
    assert q.scale.dtype == torch.float32 and q.scale.ndim == 0 and q.data.dtype == dtype
    assert q.scale.item() == pytest.approx(3.0 / torch.finfo(dtype).max, rel=1e-7)
    assert q.data.float()[0, 1].item() == -torch.finfo(dtype).max  # the largest |entry| lands on the range's top


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_amax_bookkeeping(dtype):
    top = torch.finfo(dtype).max
    zeros = sc.quantize_fp8(torch.zeros(4, 16), dtype)
    assert zeros.scale.item() > 0 and torch.isfinite(zeros.scale) and not zeros.data.float().any()
    huge = torch.zeros(4, 16)
    huge[2, 3] = 1e30
    q = sc.quantize_fp8(huge, dtype)
    assert q.scale.item() == pytest.approx(1e30 / top, rel=1e-6)
    assert q.data.float()[2, 3].item() == top and q.data.float().count_nonzero().item() == 1
    negative = -torch.rand(8, 16) - 0.5
    q = sc.quantize_fp8(negative, dtype)
    assert q.scale.item() == pytest.approx(negative.abs().max().item() / top, rel=1e-6)  # amax of |x|, not of x
    assert q.data.float().min().item() == -top and (q.data.float() < 0).all()
    bound = sc.quantize_fp8(negative, dtype, amax=torch.tensor(4.0))  # a known bound instead of a pass over x
    assert bound.scale.item() == pytest.approx(4.0 / top, rel=1e-7)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_values_beyond_the_range_saturate(dtype):
    # a bound below the true amax (a stale or wrong one) puts entries past the format's range: they clamp to its
    # largest value instead of becoming inf or NaN
    x = torch.tensor([[1.0, -1.0, 0.1, -0.01] * 4])
    data = sc.quantize_fp8(x, dtype, amax=torch.tensor(0.25)).data.float()
    top = torch.finfo(dtype).max
    assert torch.isfinite(data).all()
    assert data[0, :2].tolist() == [top, -top]
    assert data[0, 2].item() == pytest.approx(0.4 * top, rel=2.0 ** -MANTISSA_BITS[dtype])


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_round_trip_error_bound(dtype):
    # normal values: relative error at most half a unit in the last place (2^-(mantissa bits + 1)); values in the
    # subnormal range: absolute error at most half the smallest subnormal step, times the scale
    torch.manual_seed(0)
    x = torch.randn(64, 128) * torch.logspace(-6, 0, 128)
    q = sc.quantize_fp8(x, dtype)
    error = (dequantize(q) - x.double()).abs()
    bound = 2.0 ** -(MANTISSA_BITS[dtype] + 1) * x.double().abs() + SMALLEST_SUBNORMAL[dtype] / 2 * q.scale.double()
    assert (error <= bound * (1 + 1e-6)).all()
    assert error.max() > 0  # fp8 really rounds: the bound is not met by an untouched copy
    torch.testing.assert_close(dequantize(q), emulate(x, dtype), rtol=1e-6, atol=0)  # scale in fp32 vs fp64


# ---------------------------------------------------------------------------------------------
# fp8_linear against the emulation
# ---------------------------------------------------------------------------------------------

def checked_scaled_mm(calls):
    """torch._scaled_mm with CUDA's contract checked: first operand row-major, second column-major, the inner and
    the second operand's dimensions multiples of 16, fp8 operands (never two e5m2), fp32 scalar scales."""
    real = torch._scaled_mm

    def scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        assert a.stride(1) == 1 and a.stride(0) == a.size(1), f"first operand not row-major: {a.stride()}"
        assert b.stride(0) == 1 and b.stride(1) == b.size(0), f"second operand not column-major: {b.stride()}"
        assert a.size(1) % 16 == 0 and b.size(0) % 16 == 0 and b.size(1) % 16 == 0, (a.shape, b.shape)
        assert {a.dtype, b.dtype} <= {E4M3, E5M2} and (a.dtype, b.dtype) != (E5M2, E5M2)
        for scale in (scale_a, scale_b):
            assert scale.dtype == torch.float32 and scale.numel() == 1
        assert out_dtype is not None
        calls.append((a.dtype, b.dtype, out_dtype, use_fast_accum))
        return real(a, b, scale_a, scale_b, out_dtype=out_dtype, use_fast_accum=use_fast_accum)
    return scaled_mm


@pytest.mark.parametrize("grad_format", ["e5m2", "e4m3"])
def test_fp8_linear_matches_the_emulation(grad_format, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm(calls))
    torch.manual_seed(0)
    x = torch.randn(48, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(64, 32) / 4).requires_grad_()
    upstream = torch.randn(48, 64, dtype=torch.bfloat16)
    out = sc.fp8_linear(x, weight, grad_format)
    out.backward(upstream)
    assert out.dtype == x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32

    grad = sc.FP8_FORMATS[grad_format]
    xe, we, ge = emulate(x.detach(), E4M3), emulate(weight.detach(), E4M3), emulate(upstream, grad)
    torch.testing.assert_close(out.double(), xe @ we.T, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    torch.testing.assert_close(x.grad.double(), ge @ we, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weight.grad.double(), ge.T @ xe, rtol=1e-5, atol=1e-5)  # fp32 output
    # forward, grad_x, grad_weight; gradients in their format, fast accumulation only in the forward
    assert calls == [(E4M3, E4M3, torch.bfloat16, True), (grad, E4M3, torch.bfloat16, False),
                     (grad, E4M3, torch.float32, False)]


def test_fp8_linear_is_close_to_the_exact_product():
    torch.manual_seed(0)
    x, weight = torch.randn(32, 64), torch.randn(32, 64) / 8
    exact = x @ weight.T
    error = (sc.fp8_linear(x, weight).float() - exact).norm() / exact.norm()
    assert 0 < error < 0.06  # e4m3 rounds each operand to 3 mantissa bits


# ---------------------------------------------------------------------------------------------
# the model's switch
# ---------------------------------------------------------------------------------------------

def tiny_model(**settings) -> sc.GPT:
    """A depth-2 model in bf16; `settings`: GPTConfig's, over these sizes (key_offset, paired_head_layers, a width)."""
    torch.manual_seed(0)
    model = sc.GPT(sc.GPTConfig(**{**dict(vocab_size=256, depth=2, model_dim=64, head_dim=16, max_seq_len=64),
                                   **settings}))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)  # nonzero projections and head: every matmul matters
    model.set_compute_dtype(torch.bfloat16)
    return model


def batch():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (49,), generator=generator)
    return tokens[:-1], tokens[1:], torch.tensor([0, 20, 48], dtype=torch.int32), 28


def loss_and_grads(model, **kwargs):
    inputs, targets, cu_seqlens, max_seqlen = batch()
    model.zero_grad()
    loss = model(inputs, cu_seqlens, max_seqlen, targets, **kwargs)
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


def test_fp8_off_is_the_bf16_path_exactly(monkeypatch):
    reference = loss_and_grads(tiny_model())
    model = tiny_model()
    model.set_fp8(True)
    model.set_fp8(False)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *args, **kwargs: pytest.fail("fp8 matmul with fp8 off"))
    loss, grads = loss_and_grads(model)
    assert torch.equal(loss, reference[0])
    for name, grad in grads.items():
        assert torch.equal(grad, reference[1][name]), name


BLOCK_LINEARS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_set_fp8_converts_every_linear_of_the_blocks_and_the_head():
    model = tiny_model()
    model.set_fp8(True, "e4m3")
    converted = {name for name, module in model.named_modules() if getattr(module, "fp8_grad_format", None)}
    assert converted == {f"blocks.{i}.{linear}" for i in range(2) for linear in BLOCK_LINEARS} | {"lm_head"}
    assert {model.get_submodule(name).fp8_grad_format for name in converted} == {"e4m3"}
    model.set_fp8(False)
    assert not any(getattr(module, "fp8_grad_format", None) for module in model.modules())


@pytest.mark.parametrize("name", BLOCK_LINEARS)
def test_each_converted_linear_matches_the_exact_product_within_fp8_error(name, monkeypatch):
    # each block's linear layer in fp8, forward and backward, against float64 products of the unrounded operands:
    # e4m3 operands round to 3 mantissa bits, e5m2 gradients to 2 (so the gradients' bound is the looser)
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm(calls))
    model = tiny_model()
    model.set_fp8(True)
    linear = model.blocks[1].get_submodule(name)
    torch.manual_seed(2)
    x = torch.randn(32, linear.in_features, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(32, linear.out_features, dtype=torch.bfloat16)
    out = linear(x)
    out.backward(upstream)
    assert len(calls) == 3 and out.dtype == x.grad.dtype == torch.bfloat16
    exact_x, weight, exact_upstream = x.detach().double(), linear.weight.detach().double(), upstream.double()
    for got, exact, bound in ((out, exact_x @ weight.T, 0.05), (x.grad, exact_upstream @ weight, 0.08),
                              (linear.weight.grad, exact_upstream.T @ exact_x, 0.08)):
        error = (got.double() - exact).norm() / exact.norm()
        assert 0 < error < bound, (name, error)


def fp8_and_reference(monkeypatch, **settings) -> tuple[list, tuple, tuple]:
    """The fake _scaled_mm's calls, then (loss, gradients) of tiny_model(**settings) with fp8 on and with it off."""
    reference = loss_and_grads(tiny_model(**settings))
    model = tiny_model(**settings)
    model.set_fp8(True)
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm(calls))
    return calls, loss_and_grads(model), reference


@pytest.mark.parametrize("tricks", [dict(key_offset=True), dict(paired_head_layers=(0, 1))])
def test_fp8_trains_with_the_key_offset_and_paired_heads(tricks, monkeypatch):
    calls, (loss, grads), (reference_loss, reference_grads) = fp8_and_reference(monkeypatch, **tricks)
    assert len(calls) == 3 * (2 * 6 + 1)
    assert loss.item() == pytest.approx(reference_loss.item(), rel=2e-2)
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference_grads[name].flatten(), dim=0)
        assert cosine > 0.95, (name, cosine)


def test_compiled_attention_quantises_its_shared_input_once():
    # under torch.compile the partitioner inductor uses removes common subexpressions: the input that feeds q, k and v
    # is scaled and cast once, the output projection's input once more, each weight and each gradient once
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    amax_counts = {}

    def counting(graph_name):
        def compile_graph(graph, example_inputs):
            amax_counts[graph_name] = sum(node.target == torch.ops.aten.amax.default for node in graph.graph.nodes)
            return make_boxed_func(graph.forward)
        return compile_graph
    model = tiny_model()
    model.set_fp8(True)
    inputs, _, cu_seqlens, max_seqlen = batch()
    cos, sin = model.rotary_cos[:len(inputs)], model.rotary_sin[:len(inputs)]
    attention_batch = sc.AttentionBatch(cu_seqlens, max_seqlen, cos, sin, backend="flex")  # flex: one graph
    attention = model.blocks[0].attn
    backend = aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward"),
                           partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(lambda x: attention(x, None, None, attention_batch), backend=backend, fullgraph=True)
    compiled(torch.randn(len(inputs), 64, requires_grad=True)).float().square().sum().backward()
    assert amax_counts == {"forward": 4 + 2, "backward": 4}


def test_fp8_trains_the_linears_and_head_and_leaves_evaluation_in_bf16(monkeypatch):
    reference_loss, reference_grads = loss_and_grads(tiny_model())
    model = tiny_model()
    model.set_fp8(True)
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm(calls))
    loss, grads = loss_and_grads(model)
    assert len(calls) == 3 * (2 * 6 + 1)  # forward, grad_x, grad_weight of 6 linears per layer and the head
    assert loss.item() == pytest.approx(reference_loss.item(), rel=2e-2)
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference_grads[name].flatten(), dim=0)
        assert cosine > 0.95, (name, cosine)
    inputs, targets, cu_seqlens, max_seqlen = batch()
    calls.clear()
    with torch.no_grad():
        logits = model(inputs, cu_seqlens, max_seqlen)
    assert not calls
    with torch.no_grad():
        torch.testing.assert_close(logits, tiny_model()(inputs, cu_seqlens, max_seqlen), rtol=0, atol=0)
    for state in model.state_dict().values():
        assert state.dtype == torch.float32  # checkpoints keep the fp32 master weights


def test_shapes_that_do_not_fit_take_the_bf16_path(monkeypatch):
    # 15 rows: torch._scaled_mm's backward needs the token count as a multiple of 16
    model = tiny_model()
    model.set_fp8(True)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *args, **kwargs: pytest.fail("fp8 matmul with 15 rows"))
    x = torch.randn(15, 64, dtype=torch.bfloat16, requires_grad=True)
    linear = model.blocks[0].mlp.c_fc
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight.bfloat16()))


@pytest.mark.parametrize("settings, fp8_linears", [(dict(model_dim=40, head_dim=8), 0),  # no block nor the head
                                                     (dict(vocab_size=264), 2 * 6)])  # the blocks, not the head
def test_a_model_whose_widths_do_not_fit_trains_those_linears_in_bf16(settings, fp8_linears, monkeypatch):
    # torch._scaled_mm needs every dimension a multiple of 16: a width of 40 or a vocabulary of 264 keeps those
    # matmuls on the bf16 path, in training, with the same result as fp8 off where no linear fits
    calls, (loss, grads), (reference_loss, reference_grads) = fp8_and_reference(monkeypatch, **settings)
    assert len(calls) == 3 * fp8_linears
    if not fp8_linears:
        assert torch.equal(loss, reference_loss)
        assert all(torch.equal(grad, reference_grads[name]) for name, grad in grads.items())
    assert loss.item() == pytest.approx(reference_loss.item(), rel=2e-2)


def test_fp8_under_torch_compile_matches_eager():
    eager, compiled = tiny_model(), tiny_model().compile_layers("aot_eager")
    for model in (eager, compiled):
        model.set_fp8(True)
    torch._dynamo.reset()
    eager_loss, eager_grads = loss_and_grads(eager)
    compiled_loss, compiled_grads = loss_and_grads(compiled, backend="flex")  # flex: the layers compile
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=1e-3)
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=2e-2, atol=2e-3)


def test_unknown_gradient_format():
    with pytest.raises(ValueError, match="unknown fp8 gradient format 'e3m4'; valid: e4m3, e5m2"):
        tiny_model().set_fp8(True, "e3m4")


@pytest.mark.parametrize("capability, dtype, expected", [
    ((9, 0), torch.bfloat16, True), ((8, 9), torch.bfloat16, True), ((8, 0), torch.bfloat16, False),
    ((9, 0), torch.float16, False)])
def test_fp8_supported_needs_capability_8_9_and_bf16(capability, dtype, expected, monkeypatch):
    monkeypatch.setattr(sc, "current_gpu", lambda device: sc.GpuInfo("gpu", capability, 80.0))
    assert sc.fp8_supported("cuda", dtype) is expected


def test_fp8_supported_is_false_on_the_cpu():
    assert not sc.fp8_supported("cpu", torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# 03's setting
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--preset=speedrun"], False), (["--preset=node"], False), (["--preset=tiny"], False),
    (["--preset=speedrun", "--fp8=true"], True), (["--preset=tiny", "--fp8=true"], True)])
def test_pretrain_fp8_setting(argv, expected):
    assert configure(PretrainConfig, argv, {}).fp8 is expected


def test_pretrain_fp8_setting_rejects_a_non_boolean():
    with pytest.raises(sc.ConfigError, match="fp8"):
        configure(PretrainConfig, ["--preset=tiny", "--fp8=maybe"], {})
