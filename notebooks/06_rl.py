# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Reinforcement learning on GSM8K with the calculator
#
# Fine-tuning showed the model worked solutions to copy. Reinforcement learning lets it practise instead: the model
# answers a maths question several times, a program checks each final answer, and the answers that did better than
# their siblings become more likely. No one writes the solutions; a reward of 1 for a right `#### N` and 0 otherwise
# is all the teaching signal. The model keeps its calculator: when it writes an expression between the python
# tokens, the engine computes it and forces the result in, and the training leaves those forced tokens alone.
#
# Steps:
# 1. set-up: the newest checkpoint of `05_sft` and the GSM8K prompt shards of `02_sharding`;
# 2. a first look: several sampled answers to one question, with their rewards and advantages;
# 3. the optimizer, at a small fraction of the pretraining learning rates;
# 4. the training loop, in view: rollouts, advantages, the policy-gradient step, pass@k on test questions every
#    `eval_every` steps, checkpoints that let you stop and resume;
# 5. curves, the same question answered again, and a summary.
#
# Headless: `python notebooks/06_rl.py --steps=200`; on several GPUs:
# `torchrun --nproc_per_node=8 notebooks/06_rl.py` (each rank samples its share of every step's questions, and the
# ranks make one update together).

# %% [markdown]
# ## Get the runtime ready
# This cell runs first in every notebook. It finds the project (the checkout you run in or, in a fresh Google Colab
# runtime, a clone in `/content/decoderstack`), puts it on `sys.path` and calls `setup_runtime()` from
# `notebooks/runtime.py`, then imports `stackcore`. In Colab, `setup_runtime` first installs what `requirements.txt`
# asks for and the runtime lacks (never torch); anywhere it prints the GPU, its memory, the preset and the compute
# dtype, and elsewhere it installs nothing. In Colab, tick **use_drive** to keep `STACK_HOME` (every artifact) on
# Google Drive: each Colab notebook runs on its own machine, so Drive is how the next notebook finds what this one
# makes, and how artifacts survive a restart. Google asks for access once.

# %%
import os
import subprocess
import sys

use_drive = False  # @param {type:"boolean"}
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..") if "__file__" in globals()  # a twin: anywhere
                       else ".." if os.path.basename(os.getcwd()) == "notebooks" else ".")
if not os.path.isfile(os.path.join(ROOT, "stackcore.py")):  # not in a checkout: a fresh Colab runtime
    ROOT = "/content/decoderstack"
    if not os.path.isdir(ROOT):
        subprocess.run(["git", "clone", "--depth=1", "https://github.com/decoderstack/decoderstack", ROOT], check=True)
sys.path.insert(0, ROOT)
from notebooks.runtime import setup_runtime

setup_runtime(use_drive)  # installs what a Colab runtime lacks, so stackcore is imported after it
import stackcore as sc

# %% [markdown]
# ## Set-up
# The starting point is the newest checkpoint of `05_sft` (or `checkpoint` if you name a file). Without one, the
# notebook falls back to the base model of `03_pretrain` with a warning: it runs, but a model that has never seen
# the chat format almost never writes `#### N`, so its rewards stay at zero and nothing is learned. The method
# itself (rollouts, advantages, the policy-gradient loss, pass@k) is in `notebooks/rl.py`, beside this notebook.

# %%
import json
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from data import gsm8k
from data.tokenizing import check_shards_tokenizer
from notebooks.config import ATTENTION_SETTING, StackConfig, above, at_least, configure, describe_config, folder_name
from notebooks.rl import (PromptSampler, evaluate_pass_at_k, generate_rollouts, group_advantages,
                          policy_gradient_backward, prompts_that_fit)


@dataclass
class RLConfig(StackConfig):
    checkpoint: str = ""  # a checkpoint to start from (default: the newest of 05_sft, else of 03_pretrain)
    steps: int = 460  # optimizer steps (460 x 16 prompts: about one pass over the 7,473 training questions)
    prompts_per_step: int = 16  # questions per step
    samples_per_prompt: int = 16  # answers sampled per question: the group whose mean reward is the baseline
    max_new_tokens: int = 256  # longest answer, tool output included
    temperature: float = 1.0  # 1.0 and no top-k sample exactly from the policy being trained
    top_k: int = 0  # 0: no top-k cut
    lr_scale: float = 0.05  # learning rates as a fraction of the pretraining ones (nanochat's choice)
    pass_tokens: int = 65_536  # tokens per forward/backward pass over the packed rollouts
    eval_every: int = 60  # steps between pass@k evaluations (and at the start and the end)
    eval_prompts: int = 400  # test questions per evaluation
    eval_samples: int = 8  # answers per test question: pass@1 ... pass@eval_samples
    save_every: int = 60  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # the run's newest checkpoints kept on disk (0: all of them)
    attention: str = "auto"  # auto | flash | varlen | flex | sdpa
    run_name: str = "rl"  # name of the run folder and checkpoint folder (07_chat looks for "rl")
    resume: bool = True  # continue from the newest checkpoint of this run if there is one
    seed: int = 0
    PRESETS = {
        "tiny": dict(steps=4, prompts_per_step=2, samples_per_prompt=4, max_new_tokens=16, pass_tokens=2048,
                     eval_every=2, eval_prompts=4, eval_samples=4, save_every=2),
        "colab": dict(steps=200, prompts_per_step=8, samples_per_prompt=8, pass_tokens=16_384, eval_every=50,
                      eval_prompts=200, save_every=50),
    }
    LIMITS = {
        "steps": above(0), "prompts_per_step": above(0), "samples_per_prompt": above(0),
        "max_new_tokens": above(0), "temperature": at_least(0), "top_k": at_least(0), "lr_scale": above(0),
        "pass_tokens": above(0), "eval_every": above(0), "eval_prompts": above(0), "eval_samples": above(0),
        "save_every": above(0), "keep_checkpoints": at_least(0), "attention": ATTENTION_SETTING,
        "run_name": folder_name(), "seed": at_least(0),
    }

    def validate(self) -> None:
        """A group must hold answers that can differ, or every advantage is zero and no step learns anything."""
        super().validate()
        if self.samples_per_prompt < 2:
            raise sc.ConfigError(f"samples_per_prompt={self.samples_per_prompt}: an answer alone is its own group's "
                                 f"baseline, so its advantage is always zero; pass --samples_per_prompt=2 or more")
        if self.temperature == 0 or self.top_k == 1:
            raise sc.ConfigError(f"temperature={self.temperature:g} with top_k={self.top_k} samples the same answer "
                                 f"every time: every advantage would be zero; pass --temperature above 0 and "
                                 f"--top_k=0 or above 1")


cfg = configure(RLConfig)
top_k = cfg.top_k or None
dist_info = sc.init_distributed()
log = print if dist_info.master else (lambda *args, **kwargs: None)
log(describe_config(cfg))
if cfg.prompts_per_step % dist_info.world_size:
    raise sc.ConfigError(f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number of ranks "
                         f"({dist_info.world_size}): each rank samples the same number of questions per step")
device = dist_info.device
torch.manual_seed(cfg.seed)
run_dir = sc.artifact_dir("runs") / cfg.run_name
checkpoint_dir = sc.artifact_dir("checkpoints") / cfg.run_name


def starting_checkpoint() -> str:
    checkpoints = sc.artifact_dir("checkpoints")
    if cfg.checkpoint:
        return cfg.checkpoint
    sft = sc.latest_checkpoint(checkpoints / "sft")
    if sft is not None:
        return str(sft)
    base = sc.latest_checkpoint(checkpoints / "pretrain")
    if base is None:
        raise sc.MissingArtifactError(f"no checkpoint in {checkpoints / 'sft'} (nor a base model in "
                                      f"{checkpoints / 'pretrain'}): run notebooks/05_sft first "
                                      f"(STACK_HOME is {sc.stack_home()})")
    log(f"WARNING: no SFT checkpoint in {checkpoints / 'sft'}; starting from the base model {base}. It does not "
        f"know the chat format, so expect zero rewards: run notebooks/05_sft first.")
    return str(base)


start_path = starting_checkpoint()
tokenizer = sc.Tokenizer.load(sc.artifact_dir("tokenizer"))
model, start_checkpoint = sc.model_from_checkpoint(start_path, device, tokenizer)
compute_dtype = sc.pick_compute_dtype(device)
model.set_compute_dtype(compute_dtype)
backend = sc.pick_attention_backend(device, cfg.attention)
engine = sc.Engine(model, tokenizer, backend)
log(f"starting from {start_path} (step {start_checkpoint['step']}): {model.num_params()['total']:,} parameters, "
    f"attention {backend}, device {device} x {dist_info.world_size} rank(s)")

# %% [markdown]
# ## The questions
# `02_sharding` rendered every question as the prompt the engine continues, ending in `<|assistant_start|>`, with
# its gold answer beside it. A question whose prompt leaves no room for `max_new_tokens` of answer in the model's
# context is left out. Training questions come in a seeded random order, a new one each epoch. Under torchrun every
# rank draws the same questions and samples answers to its own contiguous share of them.

# %%
prompt_dir = sc.artifact_dir("shards") / "gsm8k"
check_shards_tokenizer(prompt_dir, tokenizer)
longest_prompt = model.config.max_seq_len - cfg.max_new_tokens
train_prompts, test_prompts = (prompts_that_fit(gsm8k.read_prompt_shard(prompt_dir, split, tokenizer.vocab_size),
                                                model.config.max_seq_len, cfg.max_new_tokens, split)
                               for split in ("train", "test"))
test_prompts = test_prompts[:cfg.eval_prompts]
sampler = PromptSampler(train_prompts, cfg.seed)
log(f"{len(train_prompts):,} training questions, {len(test_prompts):,} test questions for pass@k "
    f"(prompts of at most {longest_prompt} tokens)")

# %% [markdown]
# ## A first look: one question, several answers
# The engine prefills the question once and samples `samples_per_prompt` answers from it. Each answer is rewarded
# (1 if its `#### N` equals the gold answer), and its **advantage** is its reward minus the mean reward of its group.
# A right answer among wrong ones gets a large positive advantage; when every answer is right (or every one wrong)
# all advantages are zero and the question teaches nothing this step. We do not divide by the group's standard
# deviation as GRPO does (see `group_advantages`). In the mask, 0 marks the tokens the engine forced in (the
# calculator's output): they get no gradient.

# %%
example_prompt = test_prompts[0]
group, = generate_rollouts(engine, [example_prompt], gsm8k.reward, cfg.samples_per_prompt, cfg.max_new_tokens,
                           cfg.temperature, top_k, seed=cfg.seed)
advantages = group_advantages(torch.tensor([group.rewards]))[0]
log(tokenizer.decode(example_prompt.ids), f"\n(gold answer: {example_prompt.gold})\n")
for text, mask, reward, advantage in list(zip(group.completions, group.masks, group.rewards, advantages))[:4]:
    forced = len(mask) - len(example_prompt.ids) - sum(mask)
    log(f"reward {reward:.0f} | advantage {advantage:+.2f} | {forced} forced tokens | {text[:300]!r}")

# %% [markdown]
# ## Look inside: rewards and advantages of one group
# `group_advantages` is one line, printed below from `notebooks/rl.py`: each reward minus its group's mean. On the left,
# the group sampled above; when all its rewards are equal (a small model often gets every answer wrong), every
# advantage is zero and the group adds nothing to the gradient. On the right, the same function on a made-up group
# of eight answers, three of them right: the right ones are pushed up by 1 - 3/8, the wrong ones down by 3/8, and
# the pushes sum to zero.

# %%
import inspect

log(inspect.getsource(group_advantages))
made_up = torch.tensor([[1.0, 0, 0, 1, 0, 0, 1, 0]])
fig, axes = plt.subplots(1, 2, figsize=(11, 3), sharey=True)
for ax, rewards, title in ((axes[0], torch.tensor([group.rewards]), f"sampled group (gold {example_prompt.gold})"),
                           (axes[1], made_up, "made-up group: 3 of 8 right")):
    group_advantage = group_advantages(rewards)[0]
    samples = np.arange(rewards.shape[1])
    ax.bar(samples - 0.2, rewards[0].numpy(), 0.4, label="reward")
    ax.bar(samples + 0.2, group_advantage.numpy(), 0.4, label="advantage")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="answer", title=title)
    log(f"{title}: rewards {rewards[0].tolist()} -> advantages {[round(a, 3) for a in group_advantage.tolist()]}")
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The optimizer
# The same Muon + AdamW pair as pretraining, with every learning rate scaled by `lr_scale` and decayed linearly to
# zero over the run. Each step's rollouts are sampled from the current weights and used for exactly one update, so
# the method stays on-policy: no importance ratios, no clipping, and no KL penalty to the starting model (see
# `policy_gradient_loss` in `notebooks/rl.py` for why).

# %%
optimizers = sc.build_optimizers(model, lr_scale=cfg.lr_scale)
loss_scaler = sc.LossScaler(compute_dtype, device)  # fp16 only (a T4); a plain optimizer step otherwise

# %% [markdown]
# ## Resume
# If this run already has a checkpoint, continue from it: weights, optimizer state and the position in the question
# order (a damaged newest checkpoint is reported and the one before it taken). Otherwise start a fresh log. A run
# that has already reached `steps` trains nothing and keeps its summary. The learning rates decay over `steps`, and
# the checkpoint records the model the run started from (file, step, a fingerprint of its weights): a resume with
# another `--steps`, or after `05_sft` has trained its model further, is refused with what to do instead. The
# timings and token counts of the summary add up every session.

# %%
from notebooks.training import RunLog, check_finite_loss, save_checkpoint, start_training, weights_origin

start_origin = weights_origin(start_path, start_checkpoint)
start_step, complete, earlier_totals = start_training(checkpoint_dir, run_dir, model, optimizers, sampler, dist_info,
                                                      "06_rl", cfg.run_name, cfg.steps, cfg.resume, log,
                                                      start_origin, tokenizer.fingerprint)
run_log = RunLog(run_dir, enabled=dist_info.master)

# %% [markdown]
# ## The training loop
# Each step: take `prompts_per_step` questions, sample `samples_per_prompt` answers to each (the rollouts), reward
# them, and accumulate the gradient of the policy-gradient loss: the advantage times the log-probability of each
# sampled token, averaged over all sampled tokens of the step. Rollouts whose advantage is zero are skipped (their
# gradient is zero); the others are packed back to back into passes of `pass_tokens` tokens, like pretraining
# documents. Every `eval_every` steps, pass@k on the test questions: the chance that at least one of k sampled
# answers is right (pass@1 is the plain accuracy of one sample).
#
# Under torchrun each rank samples its contiguous share of the step's questions with the seeds one process would
# give them, and the loss is averaged over the sampled tokens of all ranks (`policy_gradient_backward`), so the
# ranks make the one update a single process makes from the same rollouts. pass@k is split the same way.

# %%
def evaluate(step: int) -> None:
    results = evaluate_pass_at_k(engine, test_prompts, gsm8k.reward, cfg.eval_samples, cfg.max_new_tokens,
                                 cfg.temperature, top_k, seed=2**40)  # the same samples' seeds every time
    log(f"step {step:4d}/{cfg.steps} | " + " | ".join(f"{k} {v:.3f}" for k, v in results.items()))
    run_log.log(step=step, **results)


totals = {"rollout_seconds": 0.0, "update_seconds": 0.0, "answer_tokens": 0, **earlier_totals}  # all sessions
for step in range(start_step, start_step if complete else cfg.steps + 1):
    last = step == cfg.steps
    if (step % cfg.eval_every == 0 or last) and (step > start_step or start_step == 0):  # resumed: done already
        evaluate(step)
    if step > start_step and (step % cfg.save_every == 0 or last):
        saved = save_checkpoint(checkpoint_dir, step, model, optimizers, sampler, cfg, dist_info,
                                {"origin": start_origin, "total_steps": cfg.steps, "totals": dict(totals),
                                 "made_by": "06_rl", "tokenizer_fingerprint": tokenizer.fingerprint},
                                keep=cfg.keep_checkpoints)
        log(f"saved {saved}")
    if last:
        break
    t0 = time.time()
    first_seed = cfg.seed + step * cfg.prompts_per_step * cfg.samples_per_prompt  # every answer its own seed
    share = sc.rank_share(cfg.prompts_per_step)  # this rank's questions of the step
    groups = generate_rollouts(engine, sampler.next_prompts(cfg.prompts_per_step)[share.start:share.stop],
                               gsm8k.reward, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature, top_k,
                               seed=first_seed + share.start * cfg.samples_per_prompt)
    t1 = time.time()
    sc.apply_schedule(optimizers, 1.0 - step / cfg.steps)
    stats = policy_gradient_backward(model, groups, backend, cfg.pass_tokens, device, loss_scaler)
    check_finite_loss(stats["loss"], step + 1)
    loss_scaler.step(optimizers)
    t2 = time.time()
    rollouts = cfg.prompts_per_step * cfg.samples_per_prompt  # over all ranks
    answer_tokens, reward_sum = sc.sum_over_ranks([sum(len(seq) - len(g.prompt.ids)
                                                       for g in groups for seq in g.sequences),
                                                   sum(sum(g.rewards) for g in groups)])
    reward = reward_sum / rollouts
    for key, value in (("rollout_seconds", t1 - t0), ("update_seconds", t2 - t1), ("answer_tokens", answer_tokens)):
        totals[key] += value
    log(f"step {step + 1:4d}/{cfg.steps} | reward {reward:.3f} | {answer_tokens / (t1 - t0):,.0f} answer tok/s "
        f"| {stats['trained_sequences']} rollouts trained | loss {stats['loss']:+.4f} | rollouts {t1 - t0:.1f} s "
        f"| update {t2 - t1:.1f} s")
    run_log.log(step=step + 1, reward=reward, answer_tokens=answer_tokens / rollouts,
                rollout_seconds=t1 - t0, update_seconds=t2 - t1, **stats)

# %% [markdown]
# ## Curves
# Left: the mean reward of each step's rollouts, which is the training accuracy at temperature `temperature`
# (noisy: few questions per step). Right: pass@k on the same test questions at every evaluation. RL mostly sharpens
# the model: pass@1 rises towards pass@k, since it learns to give more often the answers it could already find.
#
# In the `tiny` preset both panels stay flat near zero, and that is expected: RL can only reinforce answers the
# model sometimes gets right, and a CPU-sized model after a few steps of SFT gets few or none right, so most groups
# have all-zero rewards, hence zero advantages, and the policy gradient has almost nothing to push. The `colab` and
# `speedrun` presets are where the curves rise.

# %%
if dist_info.master:
    records = run_log.read()
    train_log = [r for r in records if "reward" in r]
    eval_log = [r for r in records if "pass@1" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    left.plot([r["step"] for r in train_log], [r["reward"] for r in train_log], lw=1, label="each step's rollouts")
    if len(train_log) >= 10:
        window = np.ones(10) / 10
        left.plot([r["step"] for r in train_log][9:], np.convolve([r["reward"] for r in train_log], window, "valid"),
                  label="mean of 10 steps")
    left.set(xlabel="step", ylabel="mean reward (1: correct answer)", title="training reward on GSM8K rollouts")
    left.legend()
    for key in (k for k in eval_log[0] if k.startswith("pass@")):
        right.plot([r["step"] for r in eval_log], [r[key] for r in eval_log], marker="o", label=key)
    right.set(xlabel="step", ylabel="fraction of test questions solved", title="GSM8K test pass@k")
    right.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=120)
    plt.show()

# %% [markdown]
# ## The same question again
# The first question, answered by the trained model with the same seed as before.

# %%
before = np.mean(group.rewards)
group, = generate_rollouts(engine, [example_prompt], gsm8k.reward, cfg.samples_per_prompt, cfg.max_new_tokens,
                           cfg.temperature, top_k, seed=cfg.seed)
log(f"gold answer {example_prompt.gold}; mean reward {np.mean(group.rewards):.2f} (before training: {before:.2f})")
for text, reward in list(zip(group.completions, group.rewards))[:4]:
    log(f"reward {reward:.0f} | {text[:300]!r}")

# %% [markdown]
# ## Summary
# The final checkpoint in `STACK_HOME/checkpoints/rl` is what `07_chat` loads first.

# %%
if dist_info.master and not complete:
    first_eval, final_eval = eval_log[0], eval_log[-1]
    summary = {
        "run": cfg.run_name, "preset": cfg.preset, "start_checkpoint": start_path, "steps": cfg.steps,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "attention": backend,
        "ranks": dist_info.world_size, "prompts_per_step": cfg.prompts_per_step,
        "samples_per_prompt": cfg.samples_per_prompt,
        "pass_at_k_start": {k: v for k, v in first_eval.items() if k != "step"},
        "pass_at_k_final": {k: v for k, v in final_eval.items() if k != "step"},
        "final_train_reward": train_log[-1]["reward"] if train_log else None,
        "rollout_seconds": round(totals["rollout_seconds"], 1), "update_seconds": round(totals["update_seconds"], 1),
        "rollout_tokens_per_second": (round(totals["answer_tokens"] / totals["rollout_seconds"])
                                      if totals["rollout_seconds"] else None),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
