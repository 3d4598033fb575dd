"""The record machinery of baselines/: time to a target, the spread over seeds, the code header of the logs, the
.xz reader, and one CPU run of the bench and reproduce path in the tiny preset."""
import gzip
import json
import lzma
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from data.synthetic import synthetic_documents

sys.path.insert(0, str(ROOT / "baselines"))
import bench_pretrain as bench  # noqa: E402
import reproduce  # noqa: E402
import vs_nanochat  # noqa: E402


def evaluations(*points):
    return [{"step": step, "tokens": step * 100, "train_seconds": seconds, "val_bpb": bpb}
            for step, seconds, bpb in points]


def test_time_to_target_is_the_first_evaluation_at_or_below_it_without_interpolation():
    val = evaluations((0, 0.0, 3.0), (10, 50.0, 1.60), (20, 60.0, 1.52), (30, 70.0, 1.40))
    assert bench.first_at_or_below(val, 1.52)["step"] == 20  # at the target counts
    assert bench.first_at_or_below(val, 1.55)["train_seconds"] == 60.0  # not interpolated between 50 and 60
    assert bench.first_at_or_below(val, 1.30) is None
    run = bench.summarize({"step_seconds": [40.0, 1.0, 1.0, 3.0], "tokens_per_step": 100, "val": val}, 1.45)
    assert (run["target_step"], run["target_seconds"]) == (30, 70.0)
    assert run["compile_seconds"] == 39.0 and run["tokens_per_second"] == 100.0 and run["best_val_bpb"] == 1.40
    assert bench.summarize({**run, "val": val[:2]}, 1.45)["target_seconds"] is None


def test_the_spread_over_seeds_counts_the_seeds_that_missed_the_target():
    stats = bench.spread([10.0, 14.0, None])
    assert stats == {"n": 2, "runs": 3, "mean": 12.0, "std": pytest.approx(2 ** 0.5 * 2), "min": 10.0, "max": 14.0}
    assert bench.fmt_spread(stats, ".1f") == "12.0 ± 2.8 (10.0 to 14.0) (2 of 3 runs)"
    assert bench.spread([5.0])["std"] is None and bench.fmt_spread(bench.spread([None]), ".1f") == "- (0 of 1)"
    runs = [{key: float(i) for key in bench.AGGREGATED} for i in (1, 3)]
    assert bench.aggregate(runs)["target_seconds"]["mean"] == 2.0


def test_a_compile_cache_is_an_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.compile_cache_folder("cache/sweep") == tmp_path / "cache" / "sweep"
    assert (tmp_path / "cache" / "sweep").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception, match="--compile_cache 'file/sub' is not a folder this user can write"):
        bench.compile_cache_folder("file/sub")


def test_seeds_are_integers_without_repeats():
    assert bench.parse_seeds("0,1,7") == [0, 1, 7]
    for bad in ("0,a", "1,1", ""):
        with pytest.raises(Exception, match="--seeds"):
            bench.parse_seeds(bad)


def test_the_reader_takes_xz_and_gz_and_names_the_bad_line(tmp_path):
    docs = ["first document", "second, with ünïcode"]
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    for opener, name in ((lzma.open, "train.jsonl.xz"), (gzip.open, "val.jsonl.gz")):
        with opener(tmp_path / name, "wt", encoding="utf-8") as f:
            f.write(lines)
        assert list(bench.read_texts(bench.split_file(tmp_path, name.split(".")[0]))) == docs
    with lzma.open(tmp_path / "bad.jsonl.xz", "wt") as f:
        f.write(lines + '{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl\.xz:3: not a JSON object with a 'text' field"):
        list(bench.read_texts(tmp_path / "bad.jsonl.xz"))
    with pytest.raises(FileNotFoundError, match="no test.jsonl.xz or test.jsonl.gz"):
        bench.split_file(tmp_path, "test")


def test_the_code_header_is_the_commit_and_diff_or_the_source(monkeypatch):
    header = bench.code_header()
    assert header.startswith("=" * 100 + "\ncode that ran\n")
    assert "commit " in header and "git diff HEAD" in header
    monkeypatch.setattr(bench, "git", lambda *args: (_ for _ in ()).throw(OSError("no git")))
    source = bench.code_header()
    assert "no git checkout" in source and "def code_header" in source and "class PretrainConfig" in source


def write_corpus(folder, train_docs=300, val_docs=12):
    folder.mkdir()
    for opener, name, docs in ((lzma.open, "train.jsonl.xz", synthetic_documents(train_docs, seed=0)),
                               (gzip.open, "val.jsonl.gz", synthetic_documents(val_docs, seed=1))):
        with opener(folder / name, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)
    return folder


def test_records_name_their_bench_command():
    records = reproduce.records()
    assert records, "no record with a record.json"
    for name, record in records.items():
        assert (ROOT / "baselines" / name / "README.md").is_file(), name
        assert record["script"] in reproduce.SCRIPTS and isinstance(record["args"], list), name
    with pytest.raises(SystemExit, match="no record 'nope'"):
        reproduce.main(["--data=x", "--record=nope"])


def test_reproduce_runs_a_record_in_the_tiny_preset_with_two_seeds(tmp_path, stack_home):
    data, out = write_corpus(tmp_path / "books"), tmp_path / "out"
    command = [sys.executable, "baselines/reproduce.py", f"--data={data}", f"--out={out}", "--seeds=0,1",
               "--record=2026-11-30-books-vs-nanochat",  # 03's defaults, no time to the target recorded
               "--", "--preset=tiny", "--steps=4", "--eval_every=2", "--vocab_size=512", "--eval_batch_tokens=512",
               "--target=1.3", "--timeout=300"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**bench.os.environ, "STACK_HOME": str(stack_home)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "ours_d12.json").read_text())
    assert summary["seeds"] == [0, 1] and [run["seed"] for run in summary["runs"]] == [0, 1]
    for run in summary["runs"]:
        assert run["rc"] == 0 and run["steps_done"] == 4 and [v["step"] for v in run["val"]] == [0, 2, 4]
        hit = next(v for v in run["val"] if v["val_bpb"] <= 1.3)  # the synthetic text is learnt within 4 steps
        assert (run["target_step"], run["target_seconds"]) == (hit["step"], hit["train_seconds"]) and hit["step"] > 0
        log = (out / f"{run['name']}.log").read_text()
        assert log.startswith("=" * 100 + "\ncode that ran\n") and "step     4/4" in log
    to_target = summary["spread"]["target_seconds"]  # two seeds, two runs with their own times
    assert to_target["n"] == 2 and to_target["std"] > 0 and to_target["min"] < to_target["mean"] < to_target["max"]
    assert summary["spread"]["final_val_bpb"]["std"] > 0  # and their own initialisations
    assert f"time to val bpb 1.3 {to_target['mean']:.1f} ± {to_target['std']:.1f}" in result.stdout
    assert "| target_seconds | - |" in result.stdout  # the record's figure beside the rerun's
    # a second data folder in the same STACK_HOME is refused, not trained on the first one's shards
    other = write_corpus(tmp_path / "other", train_docs=301)
    refused = subprocess.run([*command[:2], f"--data={other}", *command[3:]], cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env={**bench.os.environ, "STACK_HOME": str(stack_home)})
    assert refused.returncode != 0 and "was made from other files" in refused.stderr


NANOCHAT_LOG = """Total batch size 524,288 => gradient accumulation steps: 8
Step 00000 | Validation bpb: 3.2000
step 00000/00020 (0.00%) | loss: 10.0 | lrm: 1.00 | dt: 60000.00ms | tok/sec: 8,738 | mfu: 1.0
step 00001/00020 (5.00%) | loss: 9.0 | lrm: 1.00 | dt: 1000.00ms | tok/sec: 524,288 | mfu: 40.0
Step 00002 | Validation bpb: 1.9000
step 00002/00020 (10.00%) | loss: 8.0 | lrm: 1.00 | dt: 1000.00ms | tok/sec: 524,288 | mfu: 40.0
Step 00003 | Validation bpb: 1.8200
Peak memory usage: 1024.00MiB
Total training time: 1.04m
"""


def test_vs_nanochat_compares_times_to_the_peers_best_bpb(tmp_path):
    peer = tmp_path / "peer"
    peer.mkdir()
    (peer / "nanochat_d12_bf16.log").write_text(NANOCHAT_LOG)
    theirs = vs_nanochat.parse_nanochat_log(peer / "nanochat_d12_bf16.log")
    assert theirs["best_val_bpb"] == 1.82 and theirs["target_seconds"] == 62.0 and theirs["target_step"] == 3
    runs = [bench.summarize({"seed": seed, "step_seconds": [30.0, 1.0, 1.0], "tokens_per_step": 524288,
                             "peak_memory_GB": 1.0, "val": val}, 1.52)
            for seed, val in enumerate((evaluations((2, 31.0, 1.9), (3, 32.0, 1.8)),
                                        evaluations((2, 31.0, 1.81), (3, 32.0, 1.5))))]
    ours = {"runs": runs, "spread": bench.aggregate(runs), "target_bpb": 1.52}
    table = "\n".join(vs_nanochat.depth_rows(12, ours, [theirs]))
    assert "| d12 training s to nanochat's best bpb 1.8200 (compilation counted) | 31.5 ± 0.7 (31.0 to 32.0) | " \
           "62.0 | 0.51 missed |" in table
    assert "| d12 training s to the target 1.52 (compilation counted) | 32.0 (1 of 2 runs) | - |" in table
    assert "| d12 training s to nanochat's best bpb 1.8200 (without compilation) | 2.5 ± 0.7" in table
    assert "| d12 runs: seeds (steps done) / nanochat variant (steps done) | 0 (3), 1 (3) | defaults (3) |" in table


def test_a_terminated_benchmark_stops_its_run_and_exits_at_once(tmp_path):
    # `timeout` (or a scheduler) sends SIGTERM: the run's process group dies and the benchmark exits with 124 at
    # once, not when its own, longer timer would have fired
    script = (f"import sys; sys.path.insert(0, {str(ROOT / 'baselines')!r}); import bench_pretrain as b; "
              f"b.run_logged([sys.executable, '-c', 'import time; print(\"started\", flush=True); time.sleep(300)'], "
              f"__import__('pathlib').Path({str(tmp_path / 'run.log')!r}), 300, dict(__import__('os').environ), '')")
    bench_process = subprocess.Popen([sys.executable, "-c", script])
    log = tmp_path / "run.log"
    for _ in range(200):
        if log.exists() and "started" in log.read_text():
            break
        time.sleep(0.05)
    started = time.time()
    bench_process.terminate()
    assert bench_process.wait(timeout=30) == 124
    assert time.time() - started < 10


def test_bench_decode_runs_on_the_cpu_with_the_switches_and_its_engine_matches_eager_decoding(tmp_path):
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, str(ROOT / "baselines" / "bench_decode.py"), "--depths=2", "--vocab_size=1024",
                    "--prompt_len=32", "--decode=16", "--batches=1,3", "--key_offset=1", "--smear=1", "--backout=1",
                    f"--out={out}"], check=True, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(out.read_text())
    assert result["key_offset"] and result["smear"] and result["backout"]
    depth = result["depths"]["2"]
    assert depth["greedy_tokens_equal_eager"]
    assert set(depth["batches"]) == {"1", "3"}
    assert all(row["step_tokens_per_s"] > 0 and row["bound_tokens_per_s"] > 0 for row in depth["batches"].values())
