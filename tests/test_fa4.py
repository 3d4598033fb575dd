"""FlashAttention-4 in training: a fake `flash_attn.cute` module with FA4's calling convention (its keywords, None for
an unlimited left window, (out, lse) returned) computes the reference with autograd, so that the flash backend's
forward and backward calls are checked on the CPU through the real import path; and the backend check against SDPA
(_matches_sdpa) refuses a function whose backward is wrong."""
import sys
import types

import pytest
import torch

import stackcore as sc
from test_model import DOC_LENGTHS, cu_seqlens_of, naive_attention


def fa4_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None, page_table=None,
                    softmax_scale=None, causal=False, window_size=(None, None), return_lse=False, **unused):
    """flash_attn.cute.flash_attn_varlen_func as of flash-attn-4 4.0.0b36, computed by the float64 reference."""
    assert qv is None and not unused and causal and window_size[1] in (0, None)
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
    left = window_size[0]
    assert left is None or left >= 0, f"FA4 reads a left window of {left} as a window, not as unlimited"
    out = naive_attention(q, k, v, cu_seqlens_q, None if left is None else left + 1).to(q.dtype)
    return out, torch.zeros(q.size(1), q.size(0))


@pytest.fixture
def fake_fa4(monkeypatch):
    package, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    fa4_varlen_func.__module__ = "flash_attn.cute.interface"
    cute.flash_attn_varlen_func = fa4_varlen_func
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # no FA3: the import falls through to FA4
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    sc._flash_varlen_function.cache_clear()
    yield
    sc._flash_varlen_function.cache_clear()


@pytest.mark.parametrize("window", [None, 1, 4])
def test_flash_backend_trains_through_fa4(fake_fa4, window):
    assert sc._flash_varlen_function() is fa4_varlen_func
    torch.manual_seed(0)
    cu_seqlens, total = cu_seqlens_of(DOC_LENGTHS), sum(DOC_LENGTHS)
    q, k, v = (torch.randn(total, 3, 16, requires_grad=True) for _ in range(3))
    upstream = torch.randn(total, 3, 16)
    out = sc.attention(q, k, v, cu_seqlens, max(DOC_LENGTHS), window, "flash")
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = naive_attention(*leaves, cu_seqlens, window)
    expected_grads = torch.autograd.grad(expected, leaves, upstream.double())
    torch.testing.assert_close(out.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, atol=1e-5, rtol=1e-5)


def test_the_check_against_sdpa_passes_fa4(fake_fa4):
    assert sc._matches_sdpa(sc._flash_attention, torch.device("cpu"), torch.float32)


class _WrongBackward(torch.autograd.Function):
    """The right forward with a gradient twice too large for q: what a calling-convention slip in a backward does."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, window):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = sc._sdpa_attention(*leaves, cu_seqlens, 0, window)
        ctx.save_for_backward(out, *leaves)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        out, *leaves = ctx.saved_tensors
        with torch.enable_grad():
            grad_q, grad_k, grad_v = torch.autograd.grad(out, leaves, grad_out)
        return 2 * grad_q, grad_k, grad_v, None, None


def test_the_check_against_sdpa_catches_a_wrong_backward():
    def wrong_backward(q, k, v, cu_seqlens, max_seqlen, window):
        return _WrongBackward.apply(q, k, v, cu_seqlens, window)

    cpu = torch.device("cpu")
    assert sc._matches_sdpa(wrong_backward, cpu, torch.float32, backward=False)  # its forward is right
    assert not sc._matches_sdpa(wrong_backward, cpu, torch.float32)


def test_the_check_against_sdpa_catches_a_window_off_by_one():
    def wide_window(q, k, v, cu_seqlens, max_seqlen, window):
        return sc._sdpa_attention(q, k, v, cu_seqlens, max_seqlen, None if window is None else window + 1)

    assert not sc._matches_sdpa(wide_window, torch.device("cpu"), torch.float32)
