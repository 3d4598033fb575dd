"""The pretraining loader, bits per byte, learning on a synthetic task, and checkpoint resume."""
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import stackcore as sc
from notebooks.config import accumulation_steps
from notebooks.training import (RunLog, drop_metrics_after, resume_training, save_checkpoint, start_training,
                                weights_origin)

BOS = 511


def make_shards(directory, docs_per_shard=(30, 30), seed=0):
    rng = np.random.default_rng(seed)
    all_docs = []
    for index, count in enumerate(docs_per_shard):
        docs = [np.concatenate([[BOS], rng.integers(0, 500, rng.integers(5, 120))]) for _ in range(count)]
        sc.write_shard(directory / f"train_{index:06d}.bin", np.concatenate(docs), vocab_size=512)
        all_docs.append(docs)
    return all_docs


def test_batches_start_at_bos_and_boundaries_follow_documents(tmp_path):
    make_shards(tmp_path)
    loader = sc.PretrainLoader(tmp_path, "train", tokens=200, bos_id=BOS, vocab_size=512, max_doc_len=50)
    for _ in range(20):
        batch = loader.next_batch()
        inputs, targets, cu = batch.inputs.numpy(), batch.targets.numpy(), batch.cu_seqlens.numpy()
        assert inputs[0] == BOS and len(inputs) == len(targets) == 200
        assert np.array_equal(inputs[1:], targets[:-1])  # targets are the next tokens
        assert cu[0] == 0 and cu[-1] == 200 and np.all(np.diff(cu) > 0) and np.diff(cu).max() <= 50
        assert set(np.flatnonzero(inputs == BOS)) <= set(cu[:-1])  # a boundary at every document start
        assert batch.max_seqlen == np.diff(cu).max()
    assert loader.position["epoch"] >= 1  # 20 x 200 tokens is more than the two shards: it wrapped around


def test_ranks_take_disjoint_rows_of_one_stream(tmp_path):
    make_shards(tmp_path)
    single = sc.PretrainLoader(tmp_path, "train", tokens=100, bos_id=BOS, vocab_size=512, max_doc_len=64)
    ranks = [sc.PretrainLoader(tmp_path, "train", tokens=100, bos_id=BOS, vocab_size=512, max_doc_len=64,
                               rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        expected = [single.next_batch().inputs for _ in range(2)]
        for rank, loader in enumerate(ranks):
            assert torch.equal(loader.next_batch().inputs, expected[rank])


def test_loader_resumes_from_its_state(tmp_path):
    make_shards(tmp_path)
    args = dict(tokens=150, bos_id=BOS, vocab_size=512, max_doc_len=64)
    loader = sc.PretrainLoader(tmp_path, "train", **args)
    for _ in range(7):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch().inputs for _ in range(5)]
    resumed = sc.PretrainLoader(tmp_path, "train", **args)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch().inputs, e) for e in expected)


def test_loader_errors(tmp_path):
    make_shards(tmp_path, docs_per_shard=(2,))
    with pytest.raises(sc.ShardError, match="too few"):
        sc.PretrainLoader(tmp_path, "train", tokens=10_000, bos_id=BOS, vocab_size=512, max_doc_len=64)
    with pytest.raises(sc.ShardError, match="beyond the vocabulary"):
        sc.PretrainLoader(tmp_path, "train", tokens=10, bos_id=BOS, vocab_size=300, max_doc_len=64)


def tiny_model(vocab=512, seed=0):
    torch.manual_seed(seed)
    return sc.GPT(sc.GPTConfig(vocab_size=vocab, depth=2, model_dim=64, head_dim=32, max_seq_len=128))


def test_bits_per_byte_matches_hand_computation(tmp_path):
    make_shards(tmp_path)
    model = tiny_model()
    token_bytes = torch.randint(0, 4, (512,), dtype=torch.int32)  # some tokens count 0 bytes, like specials
    loader = sc.PretrainLoader(tmp_path, "train", tokens=128, bos_id=BOS, vocab_size=512, max_doc_len=128)
    bpb = sc.evaluate_bpb(model, loader, 3, token_bytes, "sdpa")
    loader.load_state_dict({"shard": 0, "offset": 0, "epoch": 0})
    nats = total = counted_tokens = 0.0
    for _ in range(3):
        batch = loader.next_batch()
        with torch.no_grad():
            losses = model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets, loss_reduction="none")
        weights = token_bytes[batch.targets].double()
        nats += float((losses.double() * (weights > 0)).sum())
        total += float(weights.sum())
        counted_tokens += float((weights > 0).sum())
    assert bpb == pytest.approx(nats / (math.log(2) * total), rel=1e-9)
    assert nats == pytest.approx(math.log(512) * counted_tokens, rel=1e-5)  # zero-init head: uniform prediction


def copy_task_shards(directory, docs=400, seed=0):
    """Documents BOS a b c ... a b c: the second half repeats the first, so a model that learns to copy
    predicts it perfectly."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(docs):
        half = rng.integers(0, 64, 16)
        parts.append(np.concatenate([[BOS], half, half]))
    sc.write_shard(directory / "train_000000.bin", np.concatenate(parts), vocab_size=512)


def test_tiny_model_learns_a_copy_task(tmp_path):
    copy_task_shards(tmp_path)
    model = tiny_model()
    optimizers = sc.build_optimizers(model)
    loader = sc.PretrainLoader(tmp_path, "train", tokens=33 * 8, bos_id=BOS, vocab_size=512, max_doc_len=64)
    for step in range(150):
        batch = loader.next_batch()
        sc.apply_schedule(optimizers, sc.lr_multiplier(step, 150, 0, 0.4), sc.muon_momentum(step, 50))
        loss = model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets)
        loss.backward()
        sc.step_optimizers(optimizers)
    # first half: random digits, ln(64) = 4.16 nats at best; second half: copyable, ~0. The mean of a perfect model
    # is about 16/33 x 4.16 = 2.0 nats; the uniform start is ln(512) = 6.24.
    assert loss.item() < 2.4


def test_checkpoint_resume_is_bit_identical(tmp_path):
    copy_task_shards(tmp_path / "shards")
    dist_info = sc.DistInfo(0, 1, 0, "cpu")

    def make():
        model = tiny_model(seed=1)
        optimizers = sc.build_optimizers(model)
        loader = sc.PretrainLoader(tmp_path / "shards", "train", tokens=66, bos_id=BOS, vocab_size=512,
                                   max_doc_len=64)
        return model, optimizers, loader

    def train(model, optimizers, loader, steps):
        for step in steps:
            batch = loader.next_batch()
            sc.apply_schedule(optimizers, sc.lr_multiplier(step, 10, 0, 0.4), sc.muon_momentum(step, 5))
            model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets).backward()
            sc.step_optimizers(optimizers)

    straight = make()
    train(*straight, range(10))
    first = make()
    train(*first, range(5))
    path = save_checkpoint(tmp_path / "ckpt", 5, first[0], first[1], first[2], sc.GPTConfig(), dist_info)
    assert sc.latest_checkpoint(tmp_path / "ckpt") == path
    model = tiny_model(seed=2)  # other weights: resuming must replace them
    optimizers = sc.build_optimizers(model)
    loader = make()[2]
    step, resumed, _ = resume_training(path.parent, model, optimizers, loader, dist_info, "03_pretrain")
    assert (step, resumed) == (5, path)
    train(model, optimizers, loader, range(step, 10))
    for (name, a), b in zip(straight[0].state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    other = sc.GPT(sc.GPTConfig(vocab_size=512, depth=2, model_dim=64, head_dim=32, max_seq_len=64))
    with pytest.raises(ValueError, match="different model"):
        resume_training(path.parent, other, sc.build_optimizers(other), make()[2], dist_info, "03_pretrain")


def one_process_run(tmp_path):
    """What start_training takes for a one-process run of the tiny model on the task shards."""
    (tmp_path / "shards").mkdir(parents=True, exist_ok=True)
    copy_task_shards(tmp_path / "shards")
    model = tiny_model()
    loader = sc.PretrainLoader(tmp_path / "shards", "train", tokens=66, bos_id=BOS, vocab_size=512, max_doc_len=64)
    return sc.DistInfo(0, 1, 0, "cpu"), model, sc.build_optimizers(model), loader


def test_resumed_run_drops_the_records_logged_after_its_checkpoint(tmp_path):
    """Stopped at step 7 after a checkpoint at step 5: steps 6 and 7 are trained again, so they are logged once."""
    dist_info, model, optimizers, loader = one_process_run(tmp_path)
    save_checkpoint(tmp_path / "ckpt", 5, model, optimizers, loader, sc.GPTConfig(), dist_info)
    run_log = RunLog(tmp_path / "run")
    for step in range(1, 8):
        run_log.log(step=step, loss=1.0 / step)
        if step == 5:
            run_log.log(step=5, val_bpb=0.5)  # the evaluation before the checkpoint stays
    with open(run_log.path, "a") as f:
        f.write('{"step": 8, "lo')  # torn by the kill
    start, complete, _ = start_training(tmp_path / "ckpt", tmp_path / "run", model, optimizers, loader, dist_info,
                                     "03_pretrain", "run", 10, resume=True, log=lambda line: None)
    assert (start, complete) == (5, False)
    assert [record["step"] for record in run_log.read()] == [1, 2, 3, 4, 5, 5]


def test_a_run_started_over_sets_the_earlier_run_aside_until_its_first_checkpoint(tmp_path):
    """--resume=false on a run saved up to step 8: its checkpoints and metrics leave the run folder, else the newest
    of them (a later step than the new run reaches) would be what 04-07 load and what the next resume continues; they
    wait in ckpt/replaced, so that a mistaken start over that stops before saving loses nothing."""
    dist_info, model, optimizers, loader = one_process_run(tmp_path)
    for step in (4, 8):
        save_checkpoint(tmp_path / "ckpt", step, model, optimizers, loader, sc.GPTConfig(), dist_info)
    RunLog(tmp_path / "run").log(step=8, loss=1.0)
    (tmp_path / "ckpt" / "notes.txt").write_text("not a checkpoint")
    said = []
    start, complete, _ = start_training(tmp_path / "ckpt", tmp_path / "run", model, optimizers, loader, dist_info,
                                     "03_pretrain", "run", 6, resume=False, log=said.append)
    assert (start, complete) == (0, False) and sc.latest_checkpoint(tmp_path / "ckpt") is None
    assert sorted(path.name for path in (tmp_path / "ckpt" / "replaced").iterdir()) == [
        "metrics.jsonl", "step_000004.pt", "step_000004.rank0.pt", "step_000008.pt", "step_000008.rank0.pt"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert said == [f"starting over: the earlier run's 2 checkpoint(s) wait in {tmp_path / 'ckpt' / 'replaced'} until "
                    f"this run's first checkpoint deletes them (move them elsewhere to keep them)"]
    start_training(tmp_path / "ckpt", tmp_path / "run", model, optimizers, loader, dist_info,  # again, nothing saved
                   "03_pretrain", "run", 6, resume=False, log=said.append)
    assert len(list((tmp_path / "ckpt" / "replaced").glob("step_*.pt"))) == 4 and len(said) == 1
    save_checkpoint(tmp_path / "ckpt", 2, model, optimizers, loader, sc.GPTConfig(), dist_info)
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir()) == [
        "notes.txt", "step_000002.pt", "step_000002.rank0.pt"]


@dataclass
class FineTuneConfig:
    """A run's settings with a starting checkpoint, as 05_sft's and 06_rl's have: a longer run can start from one."""
    checkpoint: str = ""


def start_again(tmp_path, steps, origin=None, log=lambda line: None, tokenizer_fingerprint=None):
    dist_info, model, optimizers, loader = one_process_run(tmp_path)
    return start_training(tmp_path / "ckpt", tmp_path / "run", model, optimizers, loader, dist_info, "03_pretrain",
                          "run", steps, resume=True, log=log, origin=origin,
                          tokenizer_fingerprint=tokenizer_fingerprint)


def save_run(tmp_path, step, total_steps, config=None, **extra):
    dist_info, model, optimizers, loader = one_process_run(tmp_path)
    return save_checkpoint(tmp_path / "ckpt", step, model, optimizers, loader, config or sc.GPTConfig(), dist_info,
                           {"total_steps": total_steps, **extra})


def test_a_finished_run_given_more_steps_is_refused_instead_of_raising_its_cooled_rates(tmp_path):
    """Stretched to 10 steps, the schedule of a 6-step run that cooled to zero would give its learning rates back."""
    path = save_run(tmp_path, 6, 6)
    with pytest.raises(sc.CheckpointError) as error:
        start_again(tmp_path, 10)
    message = str(error.value)
    assert "'run' was started for 6 steps" in message and f"{path} is at step 6" in message
    assert "--steps=10 would stretch" in message and "resume it with --steps=6" in message
    assert "start a new run with more steps: --run_name=<new name>" in message
    said = []
    assert start_again(tmp_path, 4, log=said.append)[:2] == (6, True)  # fewer steps: nothing to train, not refused
    assert "already complete" in said[0] and "start a new run with more steps" in said[0] and "--steps=<more" in said[0]


def test_an_interrupted_run_resumes_with_its_own_steps_and_refuses_others(tmp_path):
    save_run(tmp_path, 3, 6)
    assert start_again(tmp_path, 6)[:2] == (3, False)
    with pytest.raises(sc.CheckpointError, match="--steps=5 would squeeze its learning-rate schedule"):
        start_again(tmp_path, 5)
    with pytest.raises(sc.CheckpointError, match="--steps=2 would squeeze"):  # not "complete": its rates never cooled
        start_again(tmp_path, 2)


def test_a_longer_fine_tuning_run_is_offered_from_the_checkpoints_weights(tmp_path):
    path = save_run(tmp_path, 6, 6, FineTuneConfig())
    with pytest.raises(sc.CheckpointError, match=rf"start a new run from its weights: --run_name=<new name> "
                                                  rf"--checkpoint={path}"):
        start_again(tmp_path, 8)


def test_a_run_trained_with_another_tokenizer_is_not_resumed(tmp_path):
    """01 retrained the tokenizer (same size) since the checkpoint: going on would teach the old model ids that now
    mean other text, and its next checkpoint would record the new tokenizer. A checkpoint that records none (saved
    before fingerprints) resumes."""
    path = save_run(tmp_path, 3, 6, tokenizer_fingerprint="aaaaaaaaaaaa")
    assert start_again(tmp_path, 6, tokenizer_fingerprint="aaaaaaaaaaaa")[:2] == (3, False)
    with pytest.raises(sc.CheckpointError) as error:
        start_again(tmp_path, 6, tokenizer_fingerprint="bbbbbbbbbbbb")
    message = str(error.value)
    assert f"'run' was trained with another tokenizer ({path} records fingerprint aaaaaaaaaaaa, the tokenizer now " \
           f"has bbbbbbbbbbbb)" in message and "--resume=false" in message
    save_run(tmp_path, 3, 6)
    assert start_again(tmp_path, 6, tokenizer_fingerprint="bbbbbbbbbbbb")[:2] == (3, False)


def test_a_resumed_run_gets_back_the_totals_of_its_earlier_sessions(tmp_path):
    """03's training seconds (06's rollout seconds and tokens) add up over sessions instead of restarting at 0."""
    save_run(tmp_path, 3, 6, totals={"train_seconds": 12.5, "answer_tokens": 40})
    assert start_again(tmp_path, 6) == (3, False, {"train_seconds": 12.5, "answer_tokens": 40})
    (tmp_path / "ckpt" / "step_000003.pt").unlink()
    assert start_again(tmp_path, 6) == (0, False, {})


def test_a_run_whose_starting_model_changed_is_refused_even_when_complete(tmp_path):
    """05 fine-tuned 03's step-4 model; 03 has trained on to step 8 since. Resuming (or calling the run complete)
    would mix two bases: it stops and says what to do. The same weights under another path still resume."""
    base = one_process_run(tmp_path / "base")[1]
    first = weights_origin(tmp_path / "base" / "step_000004.pt", {"model": base.state_dict(), "step": 4})
    save_run(tmp_path, 6, 6, FineTuneConfig(), origin=first)
    with torch.no_grad():
        next(base.parameters()).add_(1e-3)  # trained further
    later = weights_origin(tmp_path / "base" / "step_000008.pt", {"model": base.state_dict(), "step": 8})
    assert later["weights"] != first["weights"]
    with pytest.raises(sc.CheckpointError) as error:
        start_again(tmp_path, 6, later)
    message = str(error.value)
    assert f"was trained from {first['path']} (step 4)" in message and f"now {later['path']} (step 8)" in message
    assert "--run_name=<new name>" in message and f"--checkpoint={first['path']}" in message
    moved = {**first, "path": "/content/drive/step_000004.pt"}
    assert start_again(tmp_path, 6, moved)[:2] == (6, True)


def test_a_starting_checkpoint_overwritten_in_place_is_not_offered_back(tmp_path):
    """03 started over under the same run name rewrites the file 05 started from: passing that path back (the way
    out for a base that trained further) would load the new model and be refused again, so it is not offered."""
    base = one_process_run(tmp_path / "base")[1]
    path = tmp_path / "base" / "step_000004.pt"
    first = weights_origin(path, {"model": base.state_dict(), "step": 4})
    save_run(tmp_path, 6, 6, FineTuneConfig(), origin=first)
    with torch.no_grad():
        next(base.parameters()).add_(1e-3)  # started over: other weights in the same file
    with pytest.raises(sc.CheckpointError) as error:
        start_again(tmp_path, 6, weights_origin(path, {"model": base.state_dict(), "step": 4}))
    message = str(error.value)
    assert f"the old one is gone: {path} now holds the new one" in message and "--checkpoint=" not in message
    assert "--run_name=<new name>" in message and "--resume=false" in message


def saved_files(directory):
    return sorted(path.name for path in directory.iterdir())


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    """keep=2: each save removes what is older than the one before it, model and rank files together; keep=0 all."""
    dist_info, model, optimizers, loader = one_process_run(tmp_path)
    for step in range(1, 5):
        save_checkpoint(tmp_path / "ckpt", step, model, optimizers, loader, sc.GPTConfig(), dist_info, keep=2)
        assert len(saved_files(tmp_path / "ckpt")) == 2 * min(step, 2)
    assert saved_files(tmp_path / "ckpt") == ["step_000003.pt", "step_000003.rank0.pt", "step_000004.pt",
                                              "step_000004.rank0.pt"]
    for step in (5, 6):
        save_checkpoint(tmp_path / "ckpt", step, model, optimizers, loader, sc.GPTConfig(), dist_info, keep=0)
    assert len(saved_files(tmp_path / "ckpt")) == 8


def test_pruning_keeps_the_checkpoint_just_written_beside_a_later_damaged_one(tmp_path):
    """A damaged step 9 made the run resume from step 4; saving step 5 with keep=1 removes step 4, never step 5, and
    leaves step 9 (not an earlier step of this run) for the next save of step 9 to replace."""
    dist_info, model, optimizers, loader = one_process_run(tmp_path)
    for step in (4, 9):
        save_checkpoint(tmp_path / "ckpt", step, model, optimizers, loader, sc.GPTConfig(), dist_info)
    (tmp_path / "ckpt" / "step_000009.pt").write_bytes(b"torn")
    save_checkpoint(tmp_path / "ckpt", 5, model, optimizers, loader, sc.GPTConfig(), dist_info, keep=1)
    assert saved_files(tmp_path / "ckpt") == ["step_000005.pt", "step_000005.rank0.pt", "step_000009.pt",
                                              "step_000009.rank0.pt"]


def test_dropping_later_records_keeps_those_around_damaged_lines(tmp_path):
    """A damaged line (torn, not an object, a step that is no number, bytes that are no text) goes alone: the records
    up to the checkpoint's step after it stay, and no line stops the resume with a traceback."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo\n[3]\n"text"\n{"step": "4"}\n{"step": null}\n\xff\xfe\n\n'
                     b'{"loss": 1.0}\n{"step": 5}\n{"step": 6}\n{"step": 5.5}\n')
    drop_metrics_after(path, 5)
    assert path.read_text() == '{"step": 1}\n{"loss": 1.0}\n{"step": 5}\n'


def test_missing_checkpoint_names_the_notebook(tmp_path):
    with pytest.raises(sc.MissingArtifactError, match="03_pretrain"):
        sc.load_checkpoint(tmp_path / "step_000001.pt")


def test_accumulation_steps_split_the_global_batch_or_explain_why_not():
    assert accumulation_steps(524_288, 65_536, 1) == 8
    assert accumulation_steps(524_288, 65_536, 8) == 1
    for tokens_per_step, micro_tokens, world_size in ((100_000, 65_536, 1), (65_536, 65_536, 2)):
        with pytest.raises(sc.ConfigError, match="multiple of micro_tokens x ranks"):
            accumulation_steps(tokens_per_step, micro_tokens, world_size)
    hint = "pass --tokens_per_step=4096, or a smaller --micro_tokens that divides 1024"
    with pytest.raises(sc.ConfigError, match=hint):
        accumulation_steps(2048, 2048, 2)  # 05's tiny preset under torchrun with two processes
