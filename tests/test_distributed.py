"""Data parallelism: two ranks (gloo, spawned processes) make the very update one process makes from the same global
batch, for SFT (notebooks/sft.py's sft_backward on the SFTLoader's rank sharding) and for RL's policy gradient on
fixed rollouts (notebooks/rl.py's policy_gradient_backward; pass@k split over ranks); two "nodes" of one rank each
train 03 through torchrun's c10d rendezvous on 127.0.0.1; 07 runs on rank 0 only; the tutorial's memory table is
what tutorials/memory_per_gpu.py's memory_estimate computes."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stackcore as sc
from data import gsm8k, sft
from notebooks import rl
from notebooks.chat_session import run_on_rank_zero_only
from notebooks.training import resume_training, save_checkpoint
from notebooks.sft import evaluate_sft_loss, sft_backward

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512  # the tiny tokenizer's (conftest)
SEQ_LEN = 256


def perturbed_model() -> sc.GPT:
    """A small GPT whose zero-initialised projections and head are made non-zero, so every weight gets a gradient."""
    torch.manual_seed(0)
    model = sc.GPT(sc.GPTConfig(vocab_size=VOCAB, depth=2, model_dim=64, head_dim=16, max_seq_len=SEQ_LEN))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def comparable_optimizers(model: sc.GPT) -> list[torch.optim.Optimizer]:
    """03's optimizers, with Adam's eps raised from its tiny default: Adam's first step is lr x g / (|g| + eps), about
    lr x sign(g), so a gradient entry that sums to nearly zero could flip a whole lr step between two summation orders
    (one process, or two ranks averaged) on some CPUs. A larger eps keeps the step proportional to such entries."""
    optimizers = sc.build_optimizers(model)
    for group in optimizers[0].param_groups:
        group["eps"] = 1e-6
    return optimizers


def step_and_record(model: sc.GPT, optimizers: list[torch.optim.Optimizer], stats: dict) -> dict:
    """Step, then the weights and the optimizer state by parameter name. After one step Adam's first moment and
    Muon's momentum are (1 - beta) x the averaged gradient, so they show its scale, which the first update hides
    (Adam's is about lr x sign(gradient), Muon's is orthogonalised)."""
    sc.step_optimizers(optimizers)
    names = {p: name for name, p in model.named_parameters()}
    adam, muon = optimizers
    state = {f"adam {names[p]}": s["exp_avg"] for p, s in adam.state.items()}
    state.update({f"muon {names[p]}": s["momentum_buffer"] for p, s in muon.state.items()})
    return {"weights": model.state_dict(), "state": state, "stats": stats}


def _rank_main(rank: int, worker, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=2)
    try:
        torch.save(worker(*args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def on_two_ranks(worker, tmp_path: Path, *args) -> list[dict]:
    """worker(*args) on two gloo ranks in spawned processes; what each returns."""
    mp.start_processes(_rank_main, args=(worker, str(tmp_path), args), nprocs=2, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def assert_same_update(single: dict, ranks: list[dict]) -> None:
    initial = perturbed_model().state_dict()
    moved = {name for name, value in single["weights"].items() if not torch.equal(value, initial[name])}
    assert {"wte.weight", "lm_head.weight", "blocks.0.attn.c_q.weight", "blocks.1.mlp.c_proj.weight"} <= moved
    for rank, result in enumerate(ranks):
        for name, value in single["weights"].items():
            torch.testing.assert_close(result["weights"][name], value, atol=1e-5, rtol=0, msg=f"rank {rank}: {name}")
        for name, value in result["state"].items():  # Muon keeps momentum only for this rank's share
            torch.testing.assert_close(value, single["state"][name], atol=1e-8, rtol=1e-4, msg=f"rank {rank}: {name}")
        shared = {key: value for key, value in result["stats"].items() if key != "passes"}  # passes: per rank
        assert shared == pytest.approx({key: single["stats"][key] for key in shared}, rel=1e-5)
    shares = [{name for name in result["state"] if name.startswith("muon")} for result in ranks]
    assert shares[0].isdisjoint(shares[1])
    assert shares[0] | shares[1] == {name for name in single["state"] if name.startswith("muon")}


# --- SFT ----------------------------------------------------------------------------------------------------------

def write_sft_shards(directory: Path, tokenizer: sc.Tokenizer) -> None:
    """Conversations of unequal lengths and trained shares, so that the ranks' rows differ in trained tokens."""
    convs = (sft.synthetic_conversations(20, seed=1) + sft.identity_conversations(10, seed=2)
             + sft.spelling_conversations(sft.load_words("builtin"), 10, seed=3))
    writer = sft.ConversationWriter(directory, "train", 2000, tokenizer.vocab_size, tokenizer.bos_id)
    for conversation in convs:
        writer.add(*sc.render_conversation(tokenizer, conversation))
    writer.flush()


def sft_loader(shard_dir: Path, bos_id: int, rank: int = 0, world_size: int = 1) -> sc.SFTLoader:
    return sc.SFTLoader(shard_dir, "train", 300, bos_id, VOCAB, SEQ_LEN, rank=rank, world_size=world_size, seed=5)


def sft_step(shard_dir: Path, bos_id: int, batches_per_rank: int) -> dict:
    """One SFT step as 05_sft takes it, on this process's rank."""
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    loader = sft_loader(shard_dir, bos_id, rank, world_size)
    batches = [loader.next_batch() for _ in range(batches_per_rank)]
    model = perturbed_model()
    optimizers = comparable_optimizers(model)
    return step_and_record(model, optimizers, sft_backward(model, batches, "sdpa"))


def test_sft_step_on_two_ranks_equals_one_process_with_the_same_global_batch(tmp_path, tiny_tokenizer):
    tokenizer = sc.Tokenizer.load(tiny_tokenizer)
    shard_dir = tmp_path / "sft"
    write_sft_shards(shard_dir, tokenizer)
    loader = sft_loader(shard_dir, tokenizer.bos_id)
    trained = [int((loader.next_batch().targets >= 0).sum()) for _ in range(4)]
    # rank 0 takes rows 0 and 2, rank 1 rows 1 and 3: a mean per rank would weigh their tokens differently
    assert trained[0] + trained[2] != trained[1] + trained[3]
    torch.set_num_threads(1)
    single = sft_step(shard_dir, tokenizer.bos_id, 4)
    assert single["stats"]["trained_tokens"] == sum(trained)
    assert_same_update(single, on_two_ranks(sft_step, tmp_path, shard_dir, tokenizer.bos_id, 2))


def sft_validation_loss(shard_dir: Path, bos_id: int, steps_per_rank: int) -> dict:
    """05_sft's validation loss on this process's rank."""
    world_size, rank = sc.world_size_and_rank()
    loader = sft_loader(shard_dir, bos_id, rank, world_size)
    return {"loss": evaluate_sft_loss(perturbed_model(), loader, steps_per_rank, "sdpa")}


def test_sft_validation_loss_on_two_ranks_equals_one_process_over_the_same_rows(tmp_path, tiny_tokenizer):
    """Each rank's summed loss and trained tokens are summed over ranks before the division: the mean per trained
    token of all rows, not a mean of the ranks' means."""
    tokenizer = sc.Tokenizer.load(tiny_tokenizer)
    shard_dir = tmp_path / "sft"
    write_sft_shards(shard_dir, tokenizer)
    torch.set_num_threads(1)
    single = sft_validation_loss(shard_dir, tokenizer.bos_id, 4)["loss"]
    assert math.isfinite(single) and single > 0
    for result in on_two_ranks(sft_validation_loss, tmp_path, shard_dir, tokenizer.bos_id, 2):
        assert result["loss"] == pytest.approx(single, rel=1e-6)


# --- RL -----------------------------------------------------------------------------------------------------------

MIXED = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 1], [0, 1, 0, 0]]  # the second group teaches nothing
IDLE_RANK_ZERO = [[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]]  # rank 0's two groups teach nothing


def fixed_rollouts(rewards: list[list[int]]) -> list[rl.RolloutGroup]:
    """Four prompts of four answers each, with forced (mask 0) tokens inside some answers and fixed rewards: the
    rollouts and rewards are data, so the comparison does not depend on sampling."""
    rng = np.random.default_rng(0)
    groups = []
    for problem, row in enumerate(rewards):
        prompt = gsm8k.TaskPrompt(rng.integers(1, VOCAB, int(rng.integers(4, 9))).tolist(), "0", problem)
        sequences, masks = [], []
        for _ in row:
            answer = rng.integers(1, VOCAB, int(rng.integers(3, 12))).tolist()
            forced = (rng.random(len(answer)) < 0.2).astype(int).tolist()
            sequences.append([*prompt.ids, *answer])
            masks.append([0] * len(prompt.ids) + [1 - f for f in forced])
        groups.append(rl.RolloutGroup(prompt, sequences, masks, [""] * len(row), [float(r) for r in row]))
    return groups


def rl_step(rewards: list[list[int]], pass_tokens: int) -> dict:
    """One policy-gradient step as 06_rl takes it: this rank's contiguous share of the step's prompts."""
    groups = fixed_rollouts(rewards)
    share = sc.rank_share(len(groups))
    model = perturbed_model()
    optimizers = comparable_optimizers(model)
    stats = rl.policy_gradient_backward(model, groups[share.start:share.stop], "sdpa", pass_tokens, "cpu")
    return step_and_record(model, optimizers, stats)


@pytest.mark.parametrize("rewards, trained", [(MIXED, 12), (IDLE_RANK_ZERO, 8)])
def test_policy_gradient_on_two_ranks_equals_one_process_on_the_same_rollouts(tmp_path, rewards, trained):
    torch.set_num_threads(1)
    single = rl_step(rewards, 10_000)
    groups = fixed_rollouts(rewards)
    assert single["stats"]["sampled_tokens"] == sum(sum(mask) for group in groups for mask in group.masks)
    assert single["stats"]["trained_sequences"] == trained
    # rank 0 takes groups 0 and 1, rank 1 groups 2 and 3, in passes of at most 40 tokens; with IDLE_RANK_ZERO
    # rank 0 has nothing to train and still takes part in the gradient average
    assert_same_update(single, on_two_ranks(rl_step, tmp_path, rewards, 40))


def pass_at_k(tokenizer_dir: Path) -> dict[str, float]:
    tokenizer = sc.Tokenizer.load(tokenizer_dir)
    model = perturbed_model()
    prompts = [gsm8k.TaskPrompt(sc.render_for_completion(tokenizer, problem.prompt()), problem.gold, i)
               for i, problem in enumerate(gsm8k.synthetic_problems(3, seed=0))]
    return rl.evaluate_pass_at_k(sc.Engine(model, tokenizer), prompts, lambda text, gold: float(len(text) % 2),
                                 num_samples=4, max_tokens=8, seed=1)


def test_pass_at_k_on_two_ranks_equals_one_process(tmp_path, tiny_tokenizer):
    torch.set_num_threads(1)
    single = pass_at_k(tiny_tokenizer)
    assert 0 < single["pass@1"] < 1  # the odd-length reward splits the samples
    ranks = on_two_ranks(pass_at_k, tmp_path, tiny_tokenizer)  # 3 prompts: rank 0 samples two, rank 1 one
    assert ranks[0] == ranks[1] == pytest.approx(single)


def test_rank_share_is_contiguous_and_covers_every_item(monkeypatch):
    for count, world_size in ((16, 2), (3, 2), (5, 4), (1, 8)):
        monkeypatch.setattr(sc, "world_size_and_rank", lambda: (world_size, rank))
        shares = []
        for rank in range(world_size):
            shares.extend(sc.rank_share(count))
        assert shares == list(range(count))


# --- 07 on rank 0 only --------------------------------------------------------------------------------------------

def test_one_process_notebooks_go_on_on_rank_zero_and_leave_on_the_others(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run_on_rank_zero_only("07_chat")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    run_on_rank_zero_only("07_chat")
    assert "rank 0 of 2 goes on alone" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as leaving:
        run_on_rank_zero_only("07_chat")
    assert leaving.value.code == 0 and "rank 1 of 2 has nothing to do" in capsys.readouterr().out


# --- two nodes through the c10d rendezvous ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_rank_train_through_the_c10d_rendezvous(stack_home):
    env = {**os.environ, "STACK_HOME": str(stack_home), "STACK_PRESET": "tiny", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU (gloo) path, also where GPUs are
    for twin in ("01_tokenizer.py", "02_sharding.py"):
        subprocess.run([sys.executable, f"notebooks/{twin}"], cwd=ROOT, env=env, check=True, capture_output=True,
                       timeout=300)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                               "--rdzv-id=h23-two-nodes", "--rdzv-conf=join_timeout=120", "notebooks/03_pretrain.py",
                               "--steps=2", "--eval_every=2", "--run_name=nodes"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for node in range(2)]
    try:
        outputs = [node.communicate(timeout=400)[0] for node in nodes]
    finally:  # a side that failed or hung leaves nothing running
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    summary = json.loads((stack_home / "runs" / "nodes" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 2
    # global rank 1 (LOCAL_RANK 0 on its node) wrote its optimizer and loader state; rank 0 alone logged
    checkpoints = stack_home / "checkpoints" / "nodes"
    assert {p.name for p in checkpoints.iterdir()} >= {"step_000002.pt", "step_000002.rank0.pt",
                                                       "step_000002.rank1.pt"}
    assert sum(output.count("val bpb") for output in outputs) == 2  # steps 0 and 2, printed once each


# --- memory per GPU -----------------------------------------------------------------------------------------------

def memory_script():
    spec = importlib.util.spec_from_file_location("memory_per_gpu", ROOT / "tutorials" / "memory_per_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_tutorials_memory_table_is_what_memory_estimate_computes():
    tutorial = (ROOT / "tutorials" / "02_headless_and_torchrun.md").read_text()
    assert memory_script().memory_table([12, 20, 26]) in tutorial  # the defaults of the script, as the tutorial runs it
    bad = subprocess.run([sys.executable, "tutorials/memory_per_gpu.py", "--depths=12,x"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--depths='12,x'" in bad.stderr


def test_memory_estimate_follows_the_models_sizes():
    with torch.device("meta"):
        model = sc.GPT(sc.GPTConfig(depth=4, vocab_size=1024, max_seq_len=512))
    counts, memory_estimate = model.num_params(), memory_script().memory_estimate
    one, two = memory_estimate(model, 4096, 1), memory_estimate(model, 4096, 2)
    assert one["weights"] == one["gradients"] == 4 * counts["total"]
    assert one["adam_state"] == 8 * (counts["total"] - counts["matrices"])
    assert one["muon_momentum"] == 4 * counts["matrices"] == 2 * two["muon_momentum"]  # shared over the ranks
    assert memory_estimate(model, 8192, 1)["activations"] == 2 * one["activations"]
    assert one["total"] == sum(value for key, value in one.items() if key != "total")
    assert memory_estimate(model, 4096, 1, torch.float32)["weight_copies"] == 0


# --- ranks that see different checkpoints -------------------------------------------------------------------------

def resume_where_rank_one_sees_nothing(directory: Path, empty: Path) -> str:
    model = perturbed_model()
    try:
        resume_training(directory if dist.get_rank() == 0 else empty, model, sc.build_optimizers(model), None,
                        sc.DistInfo(dist.get_rank(), 2, 0, "cpu"), "03_pretrain", log=lambda message: None)
    except sc.CheckpointError as error:
        return str(error)
    return "resumed"


def test_ranks_that_see_different_checkpoints_stop_together_instead_of_waiting(tmp_path):
    """Several nodes with a STACK_HOME each: rank 0 finds a checkpoint, rank 1 none. Both stop with the reason."""
    model = perturbed_model()
    directory = tmp_path / "checkpoints" / "pretrain"

    class NoLoader:
        def state_dict(self):
            return {}

    save_checkpoint(directory, 1, model, sc.build_optimizers(model), NoLoader(), sc.GPTConfig(),
                    sc.DistInfo(0, 1, 0, "cpu"))
    (tmp_path / "empty").mkdir()
    messages = on_two_ranks(resume_where_rank_one_sees_nothing, tmp_path, directory, tmp_path / "empty")
    assert all("the ranks see different checkpoints" in message and "shared filesystem" in message
               for message in messages), messages


def test_more_ranks_per_node_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node=2 on a one-GPU machine: the second rank names the problem instead of failing in CUDA
    with 'invalid device ordinal'. The GPUs are faked, so this runs the same on CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(sc.ConfigError, match=r"local rank 1, but the node shows 1 GPU\(s\): start at most"):
        sc.init_distributed()


def test_muon_that_is_not_distributed_steps_alone_under_several_ranks(monkeypatch):
    # 03's look-inside cell steps a Muon on CPU tensors on every rank: under torchrun on GPUs, NCCL cannot reduce
    # them, so such a Muon must make no collective call and update every matrix itself
    grads = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def stepped(**options):
        weights = [torch.nn.Parameter(torch.zeros(8, 4)) for _ in grads]
        for weight, grad in zip(weights, grads):
            weight.grad = grad.clone()
        sc.Muon(weights, lr=1.0, **options).step()
        return torch.stack([w.detach() for w in weights])

    alone = stepped()
    monkeypatch.setattr(sc, "world_size_and_rank", lambda: (2, 1))  # no process group: a collective would raise
    assert torch.equal(stepped(distributed=False), alone)
    with pytest.raises((RuntimeError, ValueError)):
        stepped()


def test_step_optimizers_averages_the_gradients_of_a_muon_that_steps_alone(monkeypatch):
    # a distributed Muon reduce-scatters its gradients in step(); one that steps alone must be given the average,
    # or every rank would move its copy of the weights its own way
    weights = [torch.nn.Parameter(torch.zeros(8, 4)) for _ in range(2)]
    for weight in weights:
        weight.grad = torch.ones(8, 4)
    grads = [weight.grad for weight in weights]
    reduced = []

    class Done:
        def wait(self):
            pass

    def all_reduce(tensor, async_op=False):
        reduced.append(tensor)
        tensor.add_(1)  # the other rank's gradient: all ones too
        return Done()

    monkeypatch.setattr(sc, "world_size_and_rank", lambda: (2, 0))
    monkeypatch.setattr(sc.dist, "all_reduce", all_reduce)
    sc.step_optimizers([sc.Muon(weights, lr=1.0, distributed=False)])
    assert [id(grad) for grad in reduced] == [id(grad) for grad in grads]
    assert all(torch.equal(grad, torch.ones(8, 4)) for grad in grads)  # the sum over both ranks, halved
    assert all(weight.grad is None and weight.abs().sum() > 0 for weight in weights)


def test_muon_that_is_not_distributed_keeps_every_momentum_on_load_under_several_ranks(monkeypatch):
    # a distributed Muon keeps only its rank's share of a checkpoint's momentum; one that steps alone needs all of it
    weights = [torch.nn.Parameter(torch.zeros(8, 4)) for _ in range(3)]
    for i, weight in enumerate(weights):
        weight.grad = torch.full((8, 4), float(i + 1))
    saved = sc.Muon(weights, distributed=False)
    saved.step()
    monkeypatch.setattr(sc, "world_size_and_rank", lambda: (2, 1))  # rank 1's share of 3 matrices: the third
    for distributed, kept in ((False, weights), (True, weights[2:])):
        loaded = sc.Muon(weights, distributed=distributed)
        loaded.load_state_dict(saved.state_dict())
        assert [id(p) for p in loaded.state] == [id(p) for p in kept]
        assert all(torch.equal(loaded.state[p]["momentum_buffer"], saved.state[p]["momentum_buffer"]) for p in kept)
