"""Table of figures from 03_pretrain logs: python3 parse.py [--skip=5] LOG... (matmul rate read from env.log if given)."""
import json, re, statistics, sys
skip = 5
args = [a for a in sys.argv[1:] if not a.startswith("--skip=") or not (skip := int(a.split("=")[1]))]
rate = None
rows = []
for path in args:
    text = open(path, errors="replace").read()
    m = re.search(r"-> ([\d.]+) TFLOP/s", text)
    if m:
        rate = float(m.group(1)); continue
    steps = [(int(s), float(t), float(mfu), float(ms)) for s, t, mfu, ms in re.findall(
        r"step\s+(\d+)/\d+ \| loss [\d.naninf]+ \| ([\d,]+) tok/s \| MFU ([\d.]+)% \| (\d+) ms", text.replace(",", ""))]
    summ = None
    m = re.search(r"^\{\n \"run\".*?^\}", text, re.S | re.M)
    if m:
        summ = json.loads(m.group(0))
    backend = re.search(r"attention backend: (\w+) \(available here: ([^)]*)\)", text)
    gflop = re.search(r"([\d.]+) GFLOP per token", text)
    model = re.search(r"model: depth (\d+).*?([\d.]+) M parameters", text)
    micro = re.search(r"micro_tokens\W+(\d+)", text)
    steady = [s for s in steps if s[0] > skip]
    rec = len(re.findall(r"Recompiling function", text))
    limit = len(re.findall(r"recompile_limit|cache_size_limit", text))
    oom = "OutOfMemoryError" in text
    tb = "Traceback" in text
    row = dict(log=path.split("/")[-1], backend=backend.group(1) if backend else "?",
               available=backend.group(2) if backend else "?", depth=model.group(1) if model else "?",
               params_M=model.group(2) if model else "?", gflop_per_tok=gflop.group(1) if gflop else "?",
               micro_tokens=micro.group(1) if micro else "?", steps_logged=len(steps), recompiles=rec,
               recompile_limit_hits=limit, oom=oom, traceback=tb)
    if steady:
        ms = [s[3] for s in steady]
        med = statistics.median(ms)
        row.update(steady_steps=len(steady), ms_median=med, ms_mean=round(statistics.mean(ms), 1),
                   ms_min=min(ms), ms_max=max(ms), tok_s_median=round(524288 / (med / 1e3)),
                   mfu_989_median=round(statistics.median(s[2] for s in steady), 1))
        if rate:
            row["mfu_measured_median"] = round(row["mfu_989_median"] * 989 / rate, 1)
        row["per_step_ms"] = [s[3] for s in steps]
    if summ:
        row.update(first_step_s=summ.get("first_step_seconds"), peak_mem_GB=summ.get("peak_memory_GB"),
                   final_val_bpb=summ.get("final_val_bpb"), summary_tok_s=summ.get("tokens_per_second"),
                   device=summ.get("device"))
    rows.append(row)
print(f"matmul bf16 8192^3 measured: {rate} TFLOP/s")
for r in rows:
    print(json.dumps(r))
keys = ["log", "backend", "depth", "micro_tokens", "ms_median", "tok_s_median", "mfu_989_median",
        "mfu_measured_median", "first_step_s", "peak_mem_GB", "final_val_bpb", "recompiles", "oom"]
print(" | ".join(keys))
for r in rows:
    print(" | ".join(str(r.get(k, "-")) for k in keys))
