"""06_rl's method: on-policy policy gradient on tasks with a checkable answer (GSM8K). Only 06 trains with it (and
baselines/bench_rl.py times it), so it lives beside the notebook rather than in stackcore; it is a module rather
than cells so that tests and the benchmark call it.

02_sharding writes the rendered prompts once into shards/gsm8k/ (data/gsm8k.py: TaskPrompt, write_prompt_shard,
read_prompt_shard). Each step, 06_rl samples several completions per prompt with the Engine (one prefill per
prompt), rewards each, turns rewards into advantages within the prompt's group, and raises the log-probability of
the sampled tokens in proportion to their advantage. The rollouts are packed back to back for one varlen forward
pass, like pretraining documents.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from data.gsm8k import TaskPrompt
from stackcore import (ConfigError, Engine, LossScaler, host_to_device, rank_share, sum_over_ranks, token_budget_chunks,
                       world_size_and_rank)


def prompts_that_fit(prompts: Sequence[TaskPrompt], context: int, max_new_tokens: int, split: str
                     ) -> list[TaskPrompt]:
    """The prompts that leave room for max_new_tokens of answer in a model's context of `context` tokens; a
    ConfigError names the setting when none does (a --max_new_tokens near the context leaves out every question)."""
    fitting = [prompt for prompt in prompts if len(prompt.ids) + max_new_tokens <= context]
    if prompts and not fitting:
        shortest = min(len(prompt.ids) for prompt in prompts)
        raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no {split} question room in the model's context of "
                          f"{context} tokens (the shortest prompt has {shortest}): pass --max_new_tokens="
                          f"{context - shortest} or less")
    return fitting


class PromptSampler:
    """Prompts in a seeded random order, a new order each epoch. Its position is a small dict, saved in checkpoints
    (save_checkpoint calls it the loader), so a resumed run asks the same questions as an uninterrupted one. Under
    torchrun every rank draws the same prompts and keeps its share (rank_share), so the position is shared."""
    position_shared = True

    def __init__(self, prompts: Sequence[TaskPrompt], seed: int = 0):
        if not prompts:
            raise ValueError("no prompts to sample from")
        self.prompts, self.seed = list(prompts), seed
        self.position = {"epoch": 0, "offset": 0}

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.prompts))

    def next_prompts(self, count: int) -> list[TaskPrompt]:
        chosen = []
        while len(chosen) < count:
            if self.position["offset"] == len(self.prompts):
                self.position = {"epoch": self.position["epoch"] + 1, "offset": 0}
            index = self.order(self.position["epoch"])[self.position["offset"]]
            chosen.append(self.prompts[index])
            self.position["offset"] += 1
        return chosen

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = dict(state)


@dataclass
class RolloutGroup:
    """The completions sampled for one prompt. sequences[i] is the prompt followed by completion i; masks[i] is 1 on
    the tokens the model sampled and 0 on the prompt and on tool output the engine forced in."""
    prompt: TaskPrompt
    sequences: list[list[int]]
    masks: list[list[int]]
    completions: list[str]  # decoded completion texts
    rewards: list[float]


RewardFunction = typing.Callable[[str, str], float]  # (completion text, gold answer) -> reward


def generate_rollouts(engine: Engine, prompts: Sequence[TaskPrompt], reward_fn: RewardFunction, num_samples: int,
                      max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                      max_rows: int = 256) -> list[RolloutGroup]:
    """`num_samples` completions of each prompt, each rewarded: one group per prompt. The prompts decode together,
    up to `max_rows` rows (prompts x samples) at a time, each prompt prefilled once (the Engine runs the
    calculator). Prompt i samples with seeds seed + i * num_samples + (0 .. num_samples - 1)."""
    per_call = max(1, max_rows // num_samples)
    groups = []
    for first in range(0, len(prompts), per_call):
        chunk = prompts[first:first + per_call]
        completions, masks = engine.generate_batch([prompt.ids for prompt in chunk], num_samples, max_tokens,
                                                   temperature, top_k, seed=seed + first * num_samples)
        for i, prompt in enumerate(chunk):
            rows = range(i * num_samples, (i + 1) * num_samples)
            texts = [engine.tokenizer.decode(completions[r]) for r in rows]
            groups.append(RolloutGroup(prompt, [[*prompt.ids, *completions[r]] for r in rows],
                                       [[0] * len(prompt.ids) + masks[r] for r in rows], texts,
                                       [reward_fn(text, prompt.gold) for text in texts]))
    return groups


def group_advantages(rewards: Tensor) -> Tensor:
    """Advantages (prompts, samples) from rewards (prompts, samples): each reward minus its prompt's mean reward.

    The group mean is the baseline of GRPO: a sample is pushed up when it beat its siblings on the same question,
    down when it did worse, and a question every sample got right (or wrong) teaches nothing. Unlike GRPO we do not
    divide by the group's standard deviation: with 0/1 rewards that scales up the questions nearly always (or
    never) solved, whose std is smallest, a difficulty bias (Liu et al. 2025, "Dr. GRPO"); nanochat drops it too.
    """
    return rewards - rewards.mean(dim=1, keepdim=True)


@dataclass
class RLBatch:
    """Rollouts packed back to back: targets are -1 except at sampled tokens, where weights hold the advantage."""
    inputs: Tensor  # (T,)
    targets: Tensor  # (T,)
    weights: Tensor  # (T,) fp32
    cu_seqlens: Tensor  # (sequences + 1,) int32
    max_seqlen: int


def pack_rollouts(sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], advantages: Sequence[float],
                  device: str) -> RLBatch:
    """One varlen batch: position t of a sequence predicts token t + 1, which is trained only where mask[t + 1] = 1
    (a sampled token); prompt and forced tool-output tokens get target -1 and weight 0."""
    inputs, targets, weights = [], [], []
    for seq, mask, advantage in zip(sequences, masks, advantages):
        sampled = np.asarray(mask[1:], dtype=bool)
        inputs.append(np.asarray(seq[:-1], dtype=np.int64))
        targets.append(np.where(sampled, np.asarray(seq[1:], dtype=np.int64), -1))
        weights.append(sampled * np.float32(advantage))
    lengths = [len(seq) - 1 for seq in sequences]
    cu_seqlens = np.cumsum([0, *lengths]).astype(np.int32)
    return RLBatch(host_to_device(np.concatenate(inputs), device), host_to_device(np.concatenate(targets), device),
                   host_to_device(np.concatenate(weights).astype(np.float32), device),
                   host_to_device(cu_seqlens, device), max(lengths))


def policy_gradient_loss(model: nn.Module, batch: RLBatch, sampled_tokens: int, backend: str) -> Tensor:
    """-sum(advantage x log p(sampled token)) / sampled_tokens: REINFORCE with the group baseline, averaged per token
    (DAPO's token-level mean, so long and short answers weigh the same per token) over all `sampled_tokens` of the
    step, those in other passes included. Only sampled tokens carry weight: the gradient with respect to the
    prompt's and the tool output's log-probabilities is zero.

    There is no importance ratio and no clipping (PPO): the samples come from the very weights being updated and
    each batch of rollouts makes one optimizer step, so the ratio is exactly 1. There is no KL penalty to the SFT
    model either: it would need a second model's forward pass, and a short run at a small learning rate stays close
    to where it started anyway (nanochat, DAPO and Dr. GRPO drop it too); watch pass@k on the test prompts instead.
    Sampling at temperature 1 without top-k keeps the samples exactly from the policy being trained."""
    nll = model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets, backend=backend,
                loss_reduction="none")
    return (batch.weights * nll).sum() / max(sampled_tokens, 1)


def policy_gradient_backward(model: nn.Module, groups: Sequence[RolloutGroup], backend: str, pass_tokens: int,
                             device: str, loss_scaler: LossScaler | None = None) -> dict[str, float]:
    """Accumulate the policy-gradient loss of a step's rollouts into .grad, in packed passes of at most
    `pass_tokens` tokens (scaled by `loss_scaler` in fp16; step with loss_scaler.step then). Rollouts with zero
    advantage (every sibling got the same reward) have zero gradient and are skipped, which saves their forward and
    backward passes without changing the result. Under torchrun `groups` are this rank's share of the step: the loss
    is the mean over every rank's sampled tokens (as notebooks/sft.py's sft_backward) and the counts returned are
    over all ranks."""
    advantages = group_advantages(torch.tensor([g.rewards for g in groups], dtype=torch.float32))
    rollouts = [(seq, mask, adv) for group, row in zip(groups, advantages.tolist())
                for seq, mask, adv in zip(group.sequences, group.masks, row) if adv != 0.0]
    world_size, _ = world_size_and_rank()
    all_sampled, trained_sequences = sum_over_ranks([sum(sum(mask) for group in groups for mask in group.masks),
                                                     len(rollouts)])
    sampled_tokens = all_sampled / world_size  # gradients are averaged over ranks: see sft_backward
    loss = torch.zeros((), device=device)
    lengths = [len(seq) - 1 for seq, _, _ in rollouts]
    chunks = token_budget_chunks(lengths, pass_tokens)
    for chunk in chunks:
        batch = pack_rollouts(*zip(*(rollouts[i] for i in chunk)), device=device)
        pass_loss = policy_gradient_loss(model, batch, sampled_tokens, backend)
        (loss_scaler.scale(pass_loss) if loss_scaler else pass_loss).backward()
        loss += pass_loss.detach()
    if not rollouts and trained_sequences:  # other ranks train: every rank must bring a gradient to average
        (sum(p.sum() for p in model.parameters()) * 0.0).backward()
    loss_sum, trained_tokens = sum_over_ranks([float(loss), sum(lengths)])
    return {"loss": loss_sum / world_size, "sampled_tokens": int(all_sampled),
            "trained_sequences": int(trained_sequences), "trained_tokens": int(trained_tokens), "passes": len(chunks)}


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k from `samples` completions of which `correct` were right (Chen et al. 2021): the chance that
    k of them drawn without replacement include a right one, 1 - C(samples - correct, k) / C(samples, k)."""
    if k > samples:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {samples}")
    if samples - correct < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(samples - correct + 1, samples + 1)))


def evaluate_pass_at_k(engine: Engine, prompts: Sequence[TaskPrompt], reward_fn: RewardFunction, num_samples: int,
                       max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0
                       ) -> dict[str, float]:
    """Mean pass@k over `prompts` for k = 1, 2, 4, ... up to num_samples (and num_samples itself), from
    `num_samples` completions per prompt; a completion counts as right when it earns the full reward of 1. Also
    the mean reward. Seeded as generate_rollouts, so an evaluation is repeatable; under torchrun each rank samples
    its share of the prompts (rank_share) with the seeds one process would give them, and the means are over all."""
    share = rank_share(len(prompts))
    groups = generate_rollouts(engine, prompts[share.start:share.stop], reward_fn, num_samples, max_tokens,
                               temperature, top_k, seed + share.start * num_samples)
    correct = [sum(reward >= 1.0 for reward in group.rewards) for group in groups]
    ks = sorted({num_samples, *(2**i for i in range(num_samples.bit_length()) if 2**i <= num_samples)})
    sums = sum_over_ranks([len(groups), *(sum(pass_at_k(num_samples, c, k) for c in correct) for k in ks),
                           sum(np.mean(group.rewards) for group in groups)])
    count = max(sums[0], 1.0)
    results = {f"pass@{k}": total / count for k, total in zip(ks, sums[1:])}
    results["mean_reward"] = sums[-1] / count
    return results
