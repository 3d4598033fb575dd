"""Hostile checkpoints: damaged, truncated, empty, foreign and code-running files are refused with a message naming
the file and the notebook that writes it; resume falls back to the previous good checkpoint; a vocabulary or a
tokenizer fingerprint that does not match the tokenizer is refused; a complete run says so; another number of
processes resumes or says why not; a NaN or infinite loss stops training before anything is saved."""
import dataclasses
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import stackcore as sc
from notebooks.training import (NonFiniteLossError, RunLog, check_finite_loss, resume_training, run_is_complete,
                               save_checkpoint, start_training)

ROOT = Path(__file__).resolve().parents[1]
BOS = 511
SINGLE = sc.DistInfo(0, 1, 0, "cpu")


def tiny_model(seed=0, vocab=512):
    torch.manual_seed(seed)
    return sc.GPT(sc.GPTConfig(vocab_size=vocab, depth=2, model_dim=64, head_dim=32, max_seq_len=64))


def make_loader(directory):
    if not (directory / "train_000000.bin").exists():
        rng = np.random.default_rng(0)
        docs = [np.concatenate([[BOS], rng.integers(0, 500, rng.integers(5, 60))]) for _ in range(200)]
        sc.write_shard(directory / "train_000000.bin", np.concatenate(docs), vocab_size=512)
    return sc.PretrainLoader(directory, "train", tokens=64, bos_id=BOS, vocab_size=512, max_doc_len=64)


def train_and_save(tmp_path, steps=(1, 2), run="pretrain", dist_info=SINGLE, seed=0):
    """A tiny run that saves after each of `steps`; returns its checkpoint folder and the last model."""
    model, loader = tiny_model(seed), make_loader(tmp_path / "shards")
    optimizers = sc.build_optimizers(model)
    directory = tmp_path / "checkpoints" / run
    for step in steps:
        batch = loader.next_batch()
        model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets).backward()
        sc.step_optimizers(optimizers)
        save_checkpoint(directory, step, model, optimizers, loader, sc.GPTConfig(), dist_info)
    return directory, model


def fresh(tmp_path):
    model = tiny_model(seed=7)
    return model, sc.build_optimizers(model), make_loader(tmp_path / "shards")


class Hostile:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(100, len(data), 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated": truncate,
    "empty": lambda path: path.write_bytes(b""),
    "random bytes": lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
    "text": lambda path: path.write_text('{"model": "not a tensor"}'),
    "zip of other files": lambda path: zipfile.ZipFile(path, "w").writestr("hello.txt", "hi"),
    "flipped bytes": flip_bytes,
    "foreign torch file": lambda path: torch.save({"weights": torch.zeros(3)}, path),
    "a list": lambda path: torch.save([1, 2, 3], path),
    "half a zip": lambda path: path.write_bytes(b"PK\x03\x04" + b"\x00" * 100),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("run, notebook", [("pretrain", "03_pretrain"), ("sft", "05_sft"), ("rl", "06_rl")])
def test_damaged_checkpoint_names_file_and_notebook(tmp_path, damage, run, notebook):
    directory, _ = train_and_save(tmp_path, steps=(1,), run=run)
    path = directory / "step_000001.pt"
    DAMAGES[damage](path)
    with pytest.raises(sc.DamagedCheckpointError) as error:
        sc.load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and f"notebooks/{notebook}" in message, message
    assert "Traceback" not in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("where", ["model", "config", "rank file"])
def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, writer, where):
    directory, _ = train_and_save(tmp_path, steps=(1,))
    marker = tmp_path / "pwned"
    path = directory / ("step_000001.rank0.pt" if where == "rank file" else "step_000001.pt")
    state = torch.load(path, weights_only=True)
    state["loader" if where == "rank file" else where] = Hostile(marker)
    if writer == "pickle":
        path.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, path)
    with pytest.raises(sc.CheckpointError) as error:
        if where == "rank file":
            resume_training(directory, *fresh(tmp_path), SINGLE, "03_pretrain")
        else:
            sc.load_checkpoint(path)
    assert not marker.exists()
    assert str(path) in str(error.value) and "could run code" in str(error.value)


def test_checkpoints_hold_only_plain_data(tmp_path):
    directory, _ = train_and_save(tmp_path, steps=(1,))
    for path in directory.glob("*.pt"):
        torch.load(path, weights_only=True)  # raises on anything but tensors, numbers, strings and containers


@pytest.mark.parametrize("damaged", ["step_000002.pt", "step_000002.rank0.pt"])
@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped bytes", "foreign torch file"])
def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path, damaged, damage):
    directory, _ = train_and_save(tmp_path, steps=(1, 2))
    DAMAGES[damage](directory / damaged)
    said = []
    step, path, _ = resume_training(directory, *fresh(tmp_path), SINGLE, "03_pretrain", said.append)
    assert (step, path) == (1, directory / "step_000001.pt")
    assert len(said) == 1 and "WARNING" in said[0] and str(directory / damaged) in said[0]
    assert "trying the checkpoint before it" in said[0]


def test_resume_with_every_checkpoint_damaged_says_so(tmp_path):
    directory, _ = train_and_save(tmp_path, steps=(1, 2))
    for path in directory.glob("step_??????.pt"):
        truncate(path)
    with pytest.raises(sc.CheckpointError, match=r"no usable checkpoint in .*all 2 are damaged \(the newest: .*step_000002.pt.*--run_name"):
        resume_training(directory, *fresh(tmp_path), SINGLE, "03_pretrain", lambda line: None)


def test_resume_of_an_empty_folder_starts_from_zero(tmp_path):
    assert resume_training(tmp_path / "none", *fresh(tmp_path), SINGLE, "03_pretrain") == (0, None, {})


def tokenizer_like(vocab_size, fingerprint="0123456789ab"):
    """What model_from_checkpoint asks of a tokenizer: its size and fingerprint."""
    return SimpleNamespace(vocab_size=vocab_size, fingerprint=fingerprint)


@pytest.mark.parametrize("vocab", [1024, 256, 511, 513])
def test_vocabulary_that_does_not_match_the_tokenizer_is_refused(tmp_path, vocab):
    directory, _ = train_and_save(tmp_path, steps=(1,))
    with pytest.raises(sc.CheckpointError) as error:
        sc.model_from_checkpoint(directory / "step_000001.pt", "cpu", tokenizer_like(vocab))
    message = str(error.value)
    assert "vocabulary of 512 tokens" in message and f"has {vocab}" in message and "another tokenizer" in message
    model, _ = sc.model_from_checkpoint(directory / "step_000001.pt", "cpu", tokenizer_like(512))
    assert model.config.vocab_size == 512


def test_a_tokenizer_retrained_at_the_same_size_is_refused_by_its_fingerprint(tmp_path):
    """A checkpoint records the fingerprint of the tokenizer it was trained with; one saved before fingerprints
    existed (none recorded) still loads, as does one of the same tokenizer."""
    directory, _ = train_and_save(tmp_path, steps=(1,))
    path = directory / "step_000001.pt"
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "tokenizer_fingerprint": "aaaaaaaaaaaa"}, path)
    with pytest.raises(sc.CheckpointError) as error:
        sc.model_from_checkpoint(path, "cpu", tokenizer_like(512, "bbbbbbbbbbbb"))
    message = str(error.value)
    assert message.startswith(str(path)) and "fingerprint bbbbbbbbbbbb; the model's: aaaaaaaaaaaa" in message
    assert "run notebooks/02_sharding and 03_pretrain again" in message
    assert sc.model_from_checkpoint(path, "cpu", tokenizer_like(512, "aaaaaaaaaaaa"))[1]["step"] == 1
    torch.save(checkpoint, path)
    assert sc.model_from_checkpoint(path, "cpu", tokenizer_like(512, "bbbbbbbbbbbb"))[1]["step"] == 1


@pytest.mark.parametrize("made_by, folder, retrain", [
    ("05_sft", "mine", "each notebook from 03_pretrain to 05_sft (its maker)"),
    (None, "rl", "each notebook from 03_pretrain to 06_rl (its maker)"),
    ("03_pretrain", "sft", "03_pretrain"), (None, "mine", "03_pretrain")])
def test_a_checkpoint_of_another_tokenizer_names_the_notebooks_that_make_it_again(tmp_path, made_by, folder,
                                                                                   retrain):
    """06 and 07 load 05's or 06's checkpoints: after 01, 02 and 03 ran again, naming only 02 and 03 would send the
    user back to what they just did; the notebook that wrote the checkpoint (recorded, else known by its run's
    folder) is named too."""
    directory, _ = train_and_save(tmp_path, steps=(1,), run=folder)
    path = directory / "step_000001.pt"
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "made_by": made_by}, path)
    with pytest.raises(sc.CheckpointError) as error:
        sc.model_from_checkpoint(path, "cpu", tokenizer_like(600))
    assert str(error.value).endswith(f"or run notebooks/02_sharding and {retrain} again")


@pytest.mark.parametrize("start, steps, complete", [(100, 100, True), (100, 10, True), (100, 200, False),
                                                    (0, 100, False), (99, 100, False)])
def test_complete_run_says_so_and_points_to_a_new_run(start, steps, complete, tmp_path):
    said = []
    checkpoint = tmp_path / f"step_{start:06d}.pt" if start else None
    assert run_is_complete(start, steps, "pretrain", checkpoint, {}, said.append) is complete
    if complete:
        assert "'pretrain' is already complete" in said[0] and f"--steps={steps}" in said[0]
        assert "start a new run with more steps: --run_name=<new name>" in said[0] and "--resume=false" in said[0]
        assert "summary is left as it is" in said[0] and "cooled" in said[0]
    else:
        assert said == []


def test_resume_from_more_ranks_merges_their_optimizer_shares(tmp_path):
    """Two ranks' files (each here holding the full state, as a single process saves it) resume in one process."""
    directory, trained = train_and_save(tmp_path, steps=(1,), dist_info=sc.DistInfo(0, 2, 0, "cpu"))
    model, optimizers, loader = fresh(tmp_path)
    with pytest.raises(sc.MissingArtifactError, match=r"step_000001.rank1.pt not found"):
        resume_training(directory, model, optimizers, loader, SINGLE, "03_pretrain")
    rank0 = directory / "step_000001.rank0.pt"
    (directory / "step_000001.rank1.pt").write_bytes(rank0.read_bytes())
    assert resume_training(directory, model, optimizers, loader, SINGLE, "03_pretrain")[0] == 1
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))
    assert len(optimizers[1].state) == len(optimizers[1].param_groups[0]["params"]) + sum(
        len(g["params"]) for g in optimizers[1].param_groups[1:])


def test_resume_from_one_rank_in_two_keeps_each_ranks_momentum_share(tmp_path, monkeypatch):
    directory, _ = train_and_save(tmp_path, steps=(1,))
    model, optimizers, loader = fresh(tmp_path)
    monkeypatch.setattr(sc, "world_size_and_rank", lambda: (2, 1))
    step, _, _ = resume_training(directory, model, optimizers, loader, sc.DistInfo(1, 2, 1, "cpu"), "03_pretrain")
    assert step == 1
    for group in optimizers[1].param_groups:
        own = group["params"][-(-len(group["params"]) // 2):]  # rank 1's: the second half, the shorter if odd
        assert [p for p in group["params"] if p in optimizers[1].state] == own


def test_loader_with_a_position_per_rank_says_why_it_cannot_resume(tmp_path):
    class PerRankLoader:
        def state_dict(self):
            return {"cursor": 0}

    directory, _ = train_and_save(tmp_path, steps=(1,))
    model = tiny_model(seed=7)
    with pytest.raises(sc.CheckpointError) as error:
        resume_training(directory, model, sc.build_optimizers(model), PerRankLoader(), sc.DistInfo(0, 2, 0, "cpu"),
                        "05_sft")
    message = str(error.value)
    assert "saved by 1 process(es) and this run has 2" in message and "PerRankLoader keeps a separate position" in message
    assert "resume with 1 process(es)" in message and "not found" not in message


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_stops_training(loss):
    with pytest.raises(NonFiniteLossError, match=rf"the training loss is {loss} at step 7: training stopped"):
        check_finite_loss(loss, 7)


@pytest.mark.parametrize("loss", [0.0, 3.5, 1e30])
def test_finite_loss_passes(loss):
    check_finite_loss(loss, 1)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_never_saved(tmp_path, value):
    model, optimizers, loader = fresh(tmp_path)
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 2)[0, 0] = value
    with pytest.raises(NonFiniteLossError, match="NaN or infinite values"):
        save_checkpoint(tmp_path / "ckpt", 3, model, optimizers, loader, sc.GPTConfig(), SINGLE)
    assert not (tmp_path / "ckpt").exists()


def test_nan_learning_rate_stops_before_the_first_save(tmp_path):
    """What --lr_scale=nan did before settings were checked: the weights go NaN, and nothing is written."""
    model, loader = tiny_model(), make_loader(tmp_path / "shards")
    optimizers = sc.build_optimizers(model, lr_scale=math.nan)
    with pytest.raises(NonFiniteLossError):
        for step in range(1, 4):
            batch = loader.next_batch()
            loss = model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets)
            check_finite_loss(loss.item(), step)
            loss.backward()
            sc.step_optimizers(optimizers)
            save_checkpoint(tmp_path / "ckpt", step, model, optimizers, loader, sc.GPTConfig(), SINGLE)
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("*.pt"))


def test_a_run_saved_before_newer_model_settings_resumes_with_them_off(tmp_path):
    # GPTConfig grows switches (smear, backout): a checkpoint written before them has no such keys, means them off,
    # and must resume; a checkpoint of another model must not
    directory, _ = train_and_save(tmp_path, steps=(1,))
    path = directory / "step_000001.pt"
    state = torch.load(path, weights_only=True)
    for key in ("smear", "backout"):
        del state["model_config"][key]
    torch.save(state, path)
    assert resume_training(directory, *fresh(tmp_path), SINGLE, "03_pretrain")[0] == 1
    torch.save({**state, "model_config": {**state["model_config"], "smear": True}}, path)
    with pytest.raises(sc.CheckpointError, match=r"holds a different model \(smear True there, False here\)"):
        resume_training(directory, *fresh(tmp_path), SINGLE, "03_pretrain", lambda line: None)


def test_a_different_model_is_refused_with_both_ways_out_and_what_starting_over_costs(tmp_path):
    """A user who changed --depth on the default run name is offered a new run or starting this one over; the
    second deletes the run's checkpoints (which 05 may have started from) at its first save: the message says
    so."""
    directory, _ = train_and_save(tmp_path, steps=(1,))
    deeper = sc.GPT(dataclasses.replace(tiny_model().config, depth=3))
    with pytest.raises(sc.CheckpointError) as error:
        resume_training(directory, deeper, sc.build_optimizers(deeper), make_loader(tmp_path / "shards"), SINGLE,
                        "03_pretrain", lambda line: None)
    message = str(error.value)
    assert "(depth 2 there, 3 here)" in message and "--run_name=<new name>" in message
    assert "--resume=false (its checkpoints go at the new run's first save)" in message


def test_resuming_after_a_new_tokenizer_names_the_vocabulary_sizes_and_why(tmp_path):
    # 01 run again with another vocab_size, then 03 with the same run_name: the message names both sizes
    directory, model = train_and_save(tmp_path, steps=(1,))
    path = directory / "step_000001.pt"
    state = torch.load(path, weights_only=True)
    vocab = model.config.vocab_size
    torch.save({**state, "model_config": {**state["model_config"], "vocab_size": vocab + 8}}, path)
    with pytest.raises(sc.CheckpointError, match=rf"\(vocab_size {vocab + 8} there, {vocab} here: 01_tokenizer ran "
                                                 rf"again since this run began\); keep that run and start a new one "
                                                 rf"with --run_name=<new name>"):
        resume_training(directory, *fresh(tmp_path), SINGLE, "03_pretrain", lambda line: None)


@pytest.mark.parametrize("change, refusal", [
    ({"newer_switch": False, "not_a_setting": 1},
     r"setting\(s\) this code does not know \(newer_switch, not_a_setting\): it was saved by a newer DecoderStack"),
    ({"head_dim": 7}, "holds a model configuration this code refuses: model_dim .* divisible by head_dim 7"),
], ids=["newer_code", "refused_values"])
def test_a_model_setting_this_code_lacks_or_refuses_is_named(tmp_path, change, refusal):
    # a checkpoint of a newer DecoderStack (a switch added since) stops resuming and loading with its name, not a
    # "different model" or a TypeError from GPTConfig
    directory, _ = train_and_save(tmp_path, steps=(1,))
    path = directory / "step_000001.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "model_config": {**state["model_config"], **change}}, path)
    with pytest.raises(sc.CheckpointError, match=refusal):
        resume_training(directory, *fresh(tmp_path), SINGLE, "03_pretrain", lambda line: None)
    with pytest.raises(sc.CheckpointError, match=refusal):
        sc.model_from_checkpoint(path, "cpu")


def file_in_the_way(tmp_path, name):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("not a folder")


def metrics_folder(tmp_path):
    (tmp_path / "runs" / "pretrain" / "metrics.jsonl").mkdir(parents=True)


@pytest.mark.parametrize("damage, blocked, refusal", [
    (lambda tmp_path: file_in_the_way(tmp_path, "checkpoints/pretrain"), "checkpoints/pretrain",
     "run 'pretrain' cannot keep its files there"),
    (lambda tmp_path: file_in_the_way(tmp_path, "runs/pretrain"), "runs/pretrain",
     "run 'pretrain' cannot keep its files there"),
    (lambda tmp_path: file_in_the_way(tmp_path, "checkpoints"), "checkpoints/pretrain",
     "run 'pretrain' cannot keep its files there"),
    (metrics_folder, "runs/pretrain/metrics.jsonl", "not a file, so run 'pretrain' cannot log to it"),
], ids=["checkpoint_folder_is_a_file", "run_folder_is_a_file", "checkpoints_is_a_file", "metrics_is_a_folder"])
def test_a_run_whose_folders_cannot_be_written_stops_before_training(tmp_path, damage, blocked, refusal):
    """A file where the run's checkpoint folder goes let 03_pretrain train until its first save and then lose every
    step with a FileExistsError traceback; a folder named metrics.jsonl ended it with IsADirectoryError."""
    damage(tmp_path)
    model, optimizers, loader = fresh(tmp_path)
    with pytest.raises(sc.ConfigError) as error:
        start_training(tmp_path / "checkpoints" / "pretrain", tmp_path / "runs" / "pretrain", model, optimizers,
                       loader, SINGLE, "03_pretrain", "pretrain", 10, True, lambda line: None)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / blocked}: {refusal}") and "--run_name=<new name>" in message, message


def test_damaged_lines_of_metrics_jsonl_are_left_out_of_the_curves(tmp_path):
    """A complete run (nothing resumed, so nothing cleaned) with a torn metrics.jsonl line ended 03_pretrain's curves
    cell with a JSONDecodeError."""
    run_log = RunLog(tmp_path)
    run_log.log(step=1, loss=2.5)
    with open(run_log.path, "ab") as file:
        file.write(b'{"step": 2, "loss": \n\x00\xff garbage\n[1, 2]\n')
    run_log.log(step=3, loss=2.0)
    assert run_log.read() == [{"step": 1, "loss": 2.5}, {"step": 3, "loss": 2.0}]


@pytest.mark.parametrize("raised", ["sc.DamagedCheckpointError('/x/step_000004.pt is damaged')",
                                    "sc.CheckpointError('/x/step_000004.pt holds a different model')",
                                    "sc.ShardError('/x/train_000000.bin: truncated')"])
def test_a_damaged_file_ends_a_twin_in_one_line_naming_it(tmp_path, raised):
    script = tmp_path / "twin.py"
    script.write_text(f"import stackcore as sc\nfrom notebooks.runtime import end_scripts_on_user_errors\n"
                      f"end_scripts_on_user_errors()\nraise {raised}\n")
    result = subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("twin.py: error: /x/")
