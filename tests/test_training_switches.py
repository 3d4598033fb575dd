"""The training switches of issue 21 (03_pretrain's normuon, cautious_weight_decay, batch_start_tokens and
batch_ramp_steps): each changes what it should, as a reference written out here computes it, and nothing else."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stackcore as sc
from notebooks.config import configure
from notebooks.training import batch_size_schedule
from test_distributed import on_two_ranks
from test_hostile_config import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
PretrainConfig = CONFIGS["03_pretrain"]


def muon_deltas(shape, grads, **options):
    """The change of a weight (random, seed 1) after each Muon step on the gradients `grads`, lr 1."""
    weight = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    optimizer = sc.Muon([weight], lr=1.0, **options)
    deltas = []
    for grad in grads:
        before = weight.detach().clone()
        weight.grad = grad.clone()
        optimizer.step()
        deltas.append(weight.detach() - before)
    return deltas


def random_grads(shape, steps=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # rows of very different sizes, so that the orthogonalised update's rows differ in size too
    row_scale = torch.logspace(-1, 1, shape[0])[:, None]
    return [torch.randn(shape, generator=generator) * row_scale for _ in range(steps)]


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)], ids=["tall", "wide"])
def test_normuon_divides_the_long_side_by_its_running_rms_and_keeps_the_norm(shape):
    """Reference: plain Muon's update D_t (the same gradients give the same D_t, whatever the weight), then an EMA
    v_t = beta2 v_{t-1} + (1 - beta2) mean(D_t^2) per slice of the long side, D_t / sqrt(v_t) rescaled to |D_t|."""
    grads = random_grads(shape)
    plain = muon_deltas(shape, grads)
    normed = muon_deltas(shape, grads, normuon=True, beta2=0.9)
    reduce = -1 if shape[0] >= shape[1] else -2
    second_moment = torch.zeros(1)
    for step, (d, n) in enumerate(zip(plain, normed)):
        second_moment = 0.9 * second_moment + 0.1 * d.square().mean(dim=reduce, keepdim=True)
        expected = d / second_moment.sqrt()
        expected = expected * d.norm() / expected.norm()
        torch.testing.assert_close(n, expected, rtol=1e-4, atol=1e-6, msg=f"step {step}")
        assert not torch.allclose(n, d, rtol=1e-2, atol=1e-4)  # the switch changes the update
    first_rms = normed[0].square().mean(dim=reduce)
    torch.testing.assert_close(first_rms, first_rms.mean().expand_as(first_rms), rtol=1e-4, atol=0)  # equalised


def test_normuon_state_is_saved_with_the_optimizer():
    weight = torch.nn.Parameter(torch.randn(32, 8))
    optimizer = sc.Muon([weight], normuon=True)
    weight.grad = torch.randn(32, 8)
    optimizer.step()
    assert optimizer.state_dict()["state"][0]["second_moment"].shape == (32, 1)


def test_cautious_weight_decay_decays_only_where_update_and_weight_agree_in_sign():
    shape, lr, decay = (24, 24), 0.1, 0.5
    grads = random_grads(shape, steps=1)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1))  # muon_deltas' starting weight
    (update,) = muon_deltas(shape, grads)  # lr 1, no decay: -update direction
    direction = -update  # the step is weight - lr * direction
    agree = direction * start >= 0
    assert 0.2 < agree.float().mean() < 0.8  # both cases occur, so the test tells cautious from plain decay

    def after(**options):
        weight = torch.nn.Parameter(start.clone())
        weight.grad = grads[0].clone()
        sc.Muon([weight], lr=lr, weight_decay=decay, **options).step()
        return weight.detach()

    torch.testing.assert_close(after(cautious_weight_decay=True),
                               start * (1 - lr * decay * agree.float()) + lr * update)
    torch.testing.assert_close(after(), start * (1 - lr * decay) + lr * update)


SWITCHED = dict(lr=0.1, weight_decay=0.5, normuon=True, cautious_weight_decay=True)
SHAPES = [(24, 8), (24, 8), (8, 24)]  # two shape groups, one split over two ranks, one left whole to rank 0


def switched_muon_steps(grads_by_rank: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Two steps of Muon with both switches on three matrices of two shapes, this rank's gradients (all ranks'
    averaged: what Muon's reduce-scatter does); the weights after them."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else None
    weights = [torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(i)))
               for i, shape in enumerate(SHAPES)]
    optimizer = sc.Muon(weights, **SWITCHED)
    for step in range(2):
        for i, weight in enumerate(weights):
            grads = [grads_by_rank[r][2 * i + step] for r in ([rank] if rank is not None else range(2))]
            weight.grad = torch.stack(grads).mean(0)
        optimizer.step()
    return [weight.detach() for weight in weights]


def test_switched_muon_on_two_ranks_equals_one_process(tmp_path):
    """Each rank keeps the second moments of its share of the matrices, like their momentum."""
    grads_by_rank = [[torch.randn(shape, generator=torch.Generator().manual_seed(100 * rank + 10 * i + step))
                      for i, shape in enumerate(SHAPES) for step in range(2)] for rank in range(2)]
    single = switched_muon_steps(grads_by_rank)
    for result in on_two_ranks(switched_muon_steps, tmp_path, grads_by_rank):
        for got, expected in zip(result, single):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_build_optimizers_passes_the_switches_to_muon():
    model = sc.GPT(sc.GPTConfig(vocab_size=64, depth=2, model_dim=64, head_dim=32, max_seq_len=64))
    for normuon, cautious in ((False, False), (True, True)):
        muon = sc.build_optimizers(model, weight_decay=0.1, normuon=normuon, cautious_weight_decay=cautious)[1]
        assert all(g["normuon"] is normuon and g["cautious_weight_decay"] is cautious for g in muon.param_groups)


def test_batch_size_schedule_grows_in_whole_micro_batches_to_the_full_batch():
    tokens = [batch_size_schedule(step, 64, 16, 4, 8) for step in range(7)]
    assert tokens == [16, 24, 40, 48, 64, 64, 64]  # 16 + 12 * step, rounded down to multiples of 8, then flat
    assert [batch_size_schedule(step, 64, 64, 0, 8) for step in range(3)] == [64, 64, 64]  # off
    assert batch_size_schedule(0, 64, 4, 4, 8) == 8  # never below one micro-batch on every rank


BATCH = ["--tokens_per_step=8192", "--micro_tokens=2048"]  # the same sizes whatever preset this machine picks


@pytest.mark.parametrize("args, message", [
    (["--cautious_weight_decay=true"], "set --weight_decay"),
    (["--batch_start_tokens=2048"], "needs batch_ramp_steps > 0"),
    (["--batch_start_tokens=1000", "--batch_ramp_steps=5"], "multiple of micro_tokens"),
    (["--batch_start_tokens=16384", "--batch_ramp_steps=5"], "at most tokens_per_step"),
])
def test_switches_that_would_do_nothing_or_cannot_fit_are_refused(args, message):
    with pytest.raises(sc.ConfigError, match=message):
        configure(PretrainConfig, [*BATCH, *args], {})


def test_switches_are_off_by_default_and_accepted_together():
    default = configure(PretrainConfig, [], {})
    assert not (default.normuon or default.cautious_weight_decay or default.batch_start_tokens)
    on = configure(PretrainConfig, [*BATCH, "--normuon=true", "--cautious_weight_decay=true", "--weight_decay=0.1",
                                    "--batch_start_tokens=2048", "--batch_ramp_steps=10"], {})
    assert on.normuon and on.cautious_weight_decay and on.batch_start_tokens == 2048


def test_pretrain_twin_trains_with_every_switch_and_counts_the_ramped_batches(stack_home):
    """The tiny preset takes 4096 tokens per step in micro-batches of 2048: from 2048 over 2 steps the batch is
    2048, 2048 (3072 rounded down), then 4096."""
    env = {**os.environ, "STACK_HOME": str(stack_home), "STACK_PRESET": "tiny", "PYTHONUNBUFFERED": "1"}
    for twin in ("01_tokenizer.py", "02_sharding.py"):
        subprocess.run([sys.executable, f"notebooks/{twin}"], cwd=ROOT, env=env, check=True, capture_output=True)
    result = subprocess.run([sys.executable, "notebooks/03_pretrain.py", "--steps=4", "--eval_every=4",
                             "--normuon=true", "--cautious_weight_decay=true", "--weight_decay=0.1",
                             "--batch_start_tokens=2048", "--batch_ramp_steps=2", "--run_name=switches"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = [json.loads(line) for line in (stack_home / "runs" / "switches" / "metrics.jsonl").open()]
    assert [r["tokens"] for r in records if "loss" in r] == [2048, 4096, 8192, 12288]
    summary = json.loads((stack_home / "runs" / "switches" / "summary.json").read_text())
    assert summary["tokens"] == 12288 and math.isfinite(summary["final_val_bpb"])
