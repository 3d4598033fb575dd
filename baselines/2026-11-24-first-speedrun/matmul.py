"""bf16 matmul rate: 8192^3 random, torch.matmul, median of 10 after warm-up. Prints environment too."""
import statistics, torch
print(f"gpu {torch.cuda.get_device_name()} | torch {torch.__version__} | cuda {torch.version.cuda}")
try:
    from torch.nn.attention import varlen
    import inspect
    print("torch.nn.attention.varlen.varlen_attn signature:", inspect.signature(varlen.varlen_attn))
except Exception as e:
    print("varlen_attn import:", repr(e))
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(5):
    torch.matmul(a, b)
torch.cuda.synchronize()
times = []
for _ in range(10):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); torch.matmul(a, b); e.record(); torch.cuda.synchronize()
    times.append(s.elapsed_time(e) / 1e3)
med = statistics.median(times)
print(f"matmul_bf16_8192 median {med*1e3:.3f} ms -> {2*n**3/med/1e12:.1f} TFLOP/s (min {min(times)*1e3:.3f} ms)")
