"""The Triton decode attention kernel (KVCache.attend's "triton" path, stackcore sections 5-6) against the SDPA
reference: random caches with ragged lengths and windows, and greedy decoding through it against the full forward.

The kernel runs in a subprocess with TRITON_INTERPRET=1 (triton reads it when the kernels are decorated, at import),
on float32 CPU tensors; on a machine with a GPU the same checks also run there, in bf16, without the interpreter.
"""
import os
import subprocess
import sys

import pytest
import torch

import stackcore as sc

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKS = r"""
import sys, torch, stackcore as sc

device, dtype, tolerance = sys.argv[1], getattr(torch, sys.argv[2]), float(sys.argv[3])
config = sc.GPTConfig(vocab_size=64, depth=1, model_dim=64, head_dim=16, max_seq_len=300)
generator = torch.Generator().manual_seed(0)
# (rows, capacity, window, query positions): length 1, length == capacity, windows shorter and longer than the
# lengths, one and several splits (sc.DECODE_SPLIT positions each), non-power-of-two capacities
CASES = [(1, 1, None, [0]), (1, 7, None, [6]), (1, 130, 300, [129]), (3, 130, None, [0, 129, 64]),
         (3, 130, 5, [0, 129, 64]), (4, 257, 70, [256, 1, 127, 200]), (2, 257, 1, [3, 256])]
for rows, capacity, window, positions in CASES:
    cache = sc.KVCache(config, rows, capacity, device, dtype)
    assert cache.decode_kernel() == "triton", cache.decode_kernel()
    for t in (cache.k, cache.v):
        t.copy_(torch.randn(t.shape, generator=generator))
    q = torch.randn(rows, config.n_heads, config.head_dim, generator=generator).to(device, dtype)
    at = torch.tensor(positions, device=device)
    kernel = cache.attend(0, q, window, at)
    cache.attention = "sdpa"
    assert cache.decode_kernel() == "sdpa"
    reference = cache.attend(0, q, window, at)
    error = (kernel.float() - reference.float()).abs().max().item()
    assert kernel.shape == q.shape and error < tolerance, (rows, capacity, window, positions, error)

# greedy decoding through the kernel, one token a step after a prefill, against the full forward pass
torch.manual_seed(0)
model = sc.GPT(sc.GPTConfig(vocab_size=128, depth=2, model_dim=64, head_dim=16, max_seq_len=64, short_window=5))
with torch.no_grad():
    for parameter in model.parameters():
        parameter.add_(0.1 * torch.randn_like(parameter))
model = model.to(device).eval()
model.set_compute_dtype(dtype)
ids = torch.randint(0, 128, (2, 8), generator=generator).to(device)
with torch.no_grad():
    cache = sc.KVCache(model.config, 2, 20, device, dtype)
    logits = model(ids, kv_cache=cache)[:, -1]
    tokens = ids
    for _ in range(12):
        assert cache.decode_kernel() == "triton"
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
        logits = model(tokens[:, -1:], kv_cache=cache)[:, -1]
    for row in range(2):
        full = model(tokens[row])[-12:]
        assert torch.equal(full.argmax(-1)[:-1], tokens[row, -11:]), row
        cached_error = (full[-1].float() - logits[row].float()).abs().max().item()
        assert cached_error < 20 * tolerance, cached_error
print("DECODE-KERNEL-OK")
"""


def run_checks(device: str, dtype: str, tolerance: float, interpret: bool) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", **({"TRITON_INTERPRET": "1"} if interpret else {}))
    result = subprocess.run([sys.executable, "-c", CHECKS, device, dtype, str(tolerance)], cwd=HERE, env=env,
                            capture_output=True, text=True, timeout=300)
    assert "DECODE-KERNEL-OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(sc.triton is None, reason="triton not installed")
def test_decode_kernel_matches_sdpa_and_the_full_forward_under_the_interpreter():
    run_checks("cpu", "float32", 1e-5, interpret=True)


@pytest.mark.skipif(sc.triton is None or not torch.cuda.is_available(), reason="needs triton and a GPU")
def test_decode_kernel_matches_sdpa_and_the_full_forward_on_the_gpu():
    run_checks("cuda", "bfloat16", 2e-2, interpret=False)


def test_the_cpu_without_the_interpreter_and_a_forced_cache_attend_through_sdpa():
    config = sc.GPTConfig(vocab_size=64, depth=1, model_dim=64, head_dim=16, max_seq_len=32)
    assert sc.KVCache(config, 2, 8, "cpu", torch.float32).decode_kernel() == "sdpa"
    forced = sc.KVCache(config, 2, 8, "cpu", torch.float32, attention="sdpa")
    assert forced.rows(0, 1).attention == "sdpa" and forced.decode_kernel() == "sdpa"
    with pytest.raises(ValueError, match="cache attention must be 'auto' or 'sdpa', got 'flash'"):
        sc.KVCache(config, 2, 8, "cpu", torch.float32, attention="flash")
