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
# # 07 · Chat with the model: the inference engine
#
# Training ran the model over whole packed sequences at once. Chatting is different: the model writes one token at
# a time, and each new token needs the keys and values of every token before it. Recomputing them at every step
# costs a full forward pass per token; the engine keeps them in a **KV cache** instead, so a step runs the model on
# one new token and reads the rest from memory.
#
# Steps:
# 1. set-up: load the newest chat checkpoint (`06_rl`, `05_sft`), else the base model of `03_pretrain`;
# 2. the KV cache: prefill a prompt in one pass, decode token by token, and check the logits against a full
#    forward pass;
# 3. sampling: temperature, top-k, several samples from one prefilled prompt;
# 4. the chat format and the calculator tool;
# 5. chat: a widget in the notebook, a terminal loop in the twin (`python notebooks/07_chat.py`), or one answer
#    with `--prompt="..."`.
#
# The machinery lives in section 12 of `stackcore.py` (`render_conversation`, `calculate`, `Engine`); the chat
# itself (`ChatSession`, its widget and terminal loop) in `notebooks/chat_session.py`. This notebook shows it working.

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
# `run_name` picks the run whose newest checkpoint is loaded; left empty, that is the newest of the chat runs
# (`rl`, `sft`) and, if neither exists yet, the pretraining run, whose base model continues text rather than
# answering questions. `checkpoint` names a file instead. Generation needs no fp32 master copy of the weights, so
# they are kept in the compute dtype (bf16 on a recent GPU): each decode step reads every weight once, and memory
# traffic is what bounds its speed. A chat is one process: started under `torchrun`, rank 0 goes on alone and the
# other ranks exit at once with a message (`run_on_rank_zero_only`), so the launch still ends cleanly.

# %%
import time
from dataclasses import dataclass

import torch

from notebooks.chat_session import ChatPanel, ChatSession, chat_loop, find_chat_checkpoint, run_on_rank_zero_only
from notebooks.config import (ATTENTION_SETTING, StackConfig, above, at_least, configure, describe_config, folder_name,
                              in_notebook_kernel)


@dataclass
class ChatConfig(StackConfig):
    run_name: str = ""  # checkpoint run: empty = newest of rl / sft, else pretrain
    checkpoint: str = ""  # a checkpoint file to load instead
    temperature: float = 0.6  # 0 = greedy
    top_k: int = 50  # sample among the k likeliest tokens (0 = all)
    max_tokens: int = 256  # longest reply
    seed: int = 0
    prompt: str = ""  # twin only: answer this one prompt and exit
    chat: bool = True  # twin only: chat in the terminal when stdin is a terminal
    attention: str = "auto"  # auto | flash | varlen | flex | sdpa
    PRESETS = {"tiny": dict(max_tokens=24)}
    LIMITS = {"run_name": folder_name(optional=True), "temperature": at_least(0), "top_k": at_least(0),
              "max_tokens": above(0), "seed": at_least(0), "attention": ATTENTION_SETTING}


run_on_rank_zero_only("07_chat")
cfg = configure(ChatConfig)
print(describe_config(cfg))
device = sc.pick_device()
checkpoint_path = cfg.checkpoint or find_chat_checkpoint(cfg.run_name)
tokenizer = sc.Tokenizer.load(sc.artifact_dir("tokenizer"))
model, checkpoint = sc.model_from_checkpoint(checkpoint_path, device, tokenizer)
if cfg.max_tokens >= model.config.max_seq_len:  # a reply must leave room for a prompt in the context
    raise sc.ConfigError(f"max_tokens={cfg.max_tokens}: the model of {checkpoint_path} reads "
                         f"{model.config.max_seq_len} tokens at most, prompt included: pass a smaller --max_tokens")
model.set_compute_dtype(sc.pick_compute_dtype(device))
model.to(model.compute_dtype).eval()  # no fp32 master weights at inference: a decode step reads every weight once
engine = sc.Engine(model, tokenizer, backend=sc.pick_attention_backend(device, cfg.attention))
print(f"{checkpoint_path} (step {checkpoint['step']}): {model.num_params()['total']:,} parameters, "
      f"attention {engine.backend}, KV cache {model.kv_bytes_per_token(model.compute_dtype):,} bytes per token")

# %% [markdown]
# ## The KV cache: prefill, then decode
# The prompt goes through the model in one pass (the *prefill*), which fills the cache with its keys and values.
# Each decode step then feeds one token at the row's next position (`cache.lengths`): its query attends to the
# cached keys (only the last `window` of them in the sliding-window layers), and its own key and value are
# appended. Both are the training forward pass, `model(ids, kv_cache=cache)`: the same attention, value
# embeddings, U-net skips, x0 mix and soft cap, so the logits must match a full forward pass over the same tokens
# up to float rounding.

# %%
prompt = tokenizer.encode("The capital of France is", prepend_bos=True)
ids = torch.tensor(prompt + tokenizer.encode(" Paris, and the capital of Italy is Rome."), device=device)
with torch.no_grad():
    full = model(ids, backend=engine.backend)  # one document
    cache = sc.KVCache(model.config, 1, len(ids), device, model.compute_dtype)
    steps = [model(ids[None, :len(prompt)], kv_cache=cache, backend=engine.backend)[0]]  # prefill
    for t in range(len(prompt), len(ids)):  # decode, one token a step
        steps.append(model(ids[None, t:t + 1], kv_cache=cache, backend=engine.backend)[0])
print(f"{len(prompt)} prompt tokens prefilled, {len(ids) - len(prompt)} decoded: largest logit difference against "
      f"the full forward pass {(torch.cat(steps) - full).abs().max().item():.2e}")

# %% [markdown]
# What the cache saves: without it, writing token n means a forward pass over all n tokens so far. Below, the same
# greedy continuation both ways.

# %%
def greedy_without_cache(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            bounds = torch.tensor([0, len(tokens)], device=device, dtype=torch.int32)
            logits = model(torch.tensor(tokens, device=device), bounds, len(tokens), backend=engine.backend)
            tokens.append(int(logits[-1].argmax()))
    return tokens[len(prompt):]


n = cfg.max_tokens
started = time.time()
recomputed = greedy_without_cache(prompt, n)
recompute_seconds = time.time() - started
started = time.time()
cached, _ = engine.generate(prompt, max_tokens=n, temperature=0.0)
cached_seconds = time.time() - started
# The engine stops early at <|assistant_end|> or <|bos|>; compare the tokens both produced.
print(f"{n} tokens: recomputing {recompute_seconds:.2f} s, with the cache {cached_seconds:.2f} s; "
      f"same tokens: {recomputed[:len(cached[0])] == cached[0]}")
print(repr(tokenizer.decode(cached[0])))

# %% [markdown]
# ## Look inside: the cache filling, step by step
# A fresh `sc.KVCache` is two zero tensors of shape (layers, rows, heads, capacity, head_dim), allocated once for the
# longest sequence the generation may reach. The prefill writes the prompt's keys and values at positions
# 0 .. prompt-1 in one pass; each decode step writes one more position and moves the row's `cache.lengths` entry on. Drawn below,
# the first layer's cache after each step: the size of the value stored at each position (mean over heads), blank
# where nothing is stored yet. Nothing already written changes: a step only reads it, which is why a decode step
# costs one token of compute, and reading the cache (its bytes grow with the length) is what bounds its speed.

# %%
import matplotlib.pyplot as plt

decode_steps = 6
cache = sc.KVCache(model.config, 1, len(prompt) + decode_steps, device, model.compute_dtype)
snapshots, stages, token = [], [], torch.tensor([prompt], device=device)
with torch.no_grad():
    for stage in ["prefill", *(f"decode {i + 1}" for i in range(decode_steps))]:
        logits = model(token, kv_cache=cache, backend=engine.backend)
        snapshots.append(cache.v[0, 0].float().norm(dim=-1).mean(0).cpu())  # layer 0, row 0: (capacity,)
        stages.append(f"{stage}: {tokenizer.decode(token[0].tolist())!r}")
        filled_positions = int(cache.lengths[0])
        print(f"after {stage:>9}: {filled_positions:>3} positions filled, "
              f"{filled_positions * model.kv_bytes_per_token(model.compute_dtype):,} bytes of keys and values in use")
        token = logits[:, -1:].argmax(-1)  # greedy: the next input is the likeliest token
filled = torch.stack(snapshots)
fig, ax = plt.subplots(figsize=(10, 3))
ax.imshow(filled.masked_fill(filled == 0, float("nan")).numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
ax.set_yticks(range(len(stages)), stages, fontsize=7)
ax.set(xlabel="cache position", title=f"layer 0's values in the cache (capacity {cache.capacity})")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Sampling
# Temperature divides the logits before the softmax (0 means always the likeliest token); top-k keeps only the k
# likeliest tokens. `num_samples` rows share one prefill: the engine copies the prompt's cache into every row, and
# row i draws from its own random generator seeded with `seed + i`, so a row gives the same text whether it was
# sampled alone or in a batch.

# %%
for text in ("Once upon a time", "The number of days in a week is"):
    samples, _ = engine.generate(tokenizer.encode(text, prepend_bos=True), num_samples=3, max_tokens=cfg.max_tokens,
                                 temperature=1.0, top_k=cfg.top_k or None, seed=cfg.seed)
    print(text)
    for row in samples:
        print("   ->", repr(tokenizer.decode(row)))

# %% [markdown]
# ## Look inside: temperature, top-k and top-p on one distribution
# The model's logits for the token after "The capital of France is", limited to its 30 likeliest tokens to keep the
# plot readable, go through `sc.sample_tokens` (the engine's own sampler) with 4,000 evenly spaced uniforms: the
# share of draws each token gets is the distribution that setting samples from. Temperature below 1 sharpens it
# towards the likeliest token (0 is greedy), above 1 flattens it; top-k keeps the k likeliest tokens; top-p keeps
# the fewest likeliest tokens whose probabilities add up to p. Both cuts renormalise what they keep.

# %%
with torch.no_grad():
    bounds = torch.tensor([0, len(prompt)], device=device, dtype=torch.int32)
    next_logits = model(torch.tensor(prompt, device=device), bounds, len(prompt), backend=engine.backend)[-1]
candidates = next_logits.float().cpu().topk(30)
draws = 4000
uniforms = (torch.arange(draws) + 0.5) / draws
settings = {"temperature 0.5": dict(temperature=0.5), "temperature 1": dict(temperature=1.0),
            "temperature 1.5": dict(temperature=1.5), "top-k 5": dict(temperature=1.0, top_k=5),
            "top-p 0.5": dict(temperature=1.0, top_p=0.5)}
fig, ax = plt.subplots(figsize=(11, 3.5))
for name, options in settings.items():
    picks = sc.sample_tokens(candidates.values.expand(draws, -1), uniforms, **options)
    shares = torch.bincount(picks, minlength=len(candidates.values)) / draws
    ax.plot(shares.numpy(), marker="o", ms=3, label=name)
    print(f"{name:>16}: {int((shares > 0).sum()):>2} tokens drawn; likeliest {shares[0]:.2f}")
ax.set_xticks(range(len(candidates.indices)), [repr(tokenizer.decode([i])) for i in candidates.indices.tolist()],
              rotation=75, fontsize=7)
ax.set(ylabel="share of draws", title="next token after 'The capital of France is'")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The chat format and the calculator
# A conversation becomes one token sequence with special tokens around each turn. The mask marks the tokens the
# model is trained to write in `05_sft` (1): the assistant's words, its calculator calls and `<|assistant_end|>`.
# The rest (the user's turns, and the calculator's output, which the engine writes in) is context (0).

# %%
conversation = [
    {"role": "user", "content": "What is 12 times 7?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me compute it: "},
                                      {"type": "python", "text": "12 * 7"},
                                      {"type": "python_output", "text": "84"},
                                      {"type": "text", "text": ". The answer is 84."}]},
]
ids, mask = sc.render_conversation(tokenizer, conversation)
print("".join(tokenizer.decode([t]) if m == 0 else f"[{tokenizer.decode([t])}]" for t, m in zip(ids, mask)))
print("(trained tokens in brackets)")

# %% [markdown]
# When a generated row writes `<|python_start|>`, the engine collects the tokens up to `<|python_end|>`, evaluates
# them with `calculate` and forces `<|output_start|>` result `<|output_end|>` into the row; those forced tokens get
# 0 in `generate`'s mask, so RL never trains on them. The calculator walks the expression's syntax tree with a
# whitelist (numbers, arithmetic, string literals and a few string methods), with limits on size and time; it
# never runs `eval` on model text, and anything else comes back as an error string the model can read.

# %%
for expression in ("12 * 7", "10 / 4", "2 ** 100", "'strawberry'.count('r')", "10 ** 10 ** 10",
                   "().__class__", "__import__('os')", "1 / 0"):
    print(f"{expression:<26} -> {sc.calculate(expression)}")

# %% [markdown]
# ## Chat
# A `ChatSession` keeps the history and streams each reply; tool calls appear as `[calculator: expression =
# result]`. A base model from `03_pretrain` has never seen a conversation, so expect text that merely continues;
# after `05_sft` it answers. The question below is `--prompt` when given.
#
# The history stays within the model's context: when the prompt plus a full reply (`max_tokens`) no longer fits,
# the oldest exchanges are dropped (a system prompt stays). A turn that fails changes nothing, so the conversation
# goes on.

# %%
session = ChatSession(engine, temperature=cfg.temperature, top_k=cfg.top_k or None, max_tokens=cfg.max_tokens,
                      seed=cfg.seed)
question = cfg.prompt or "Hello! What is 12 times 7?"
print(f"you> {question}")
try:
    pieces = session.reply(question)
except ValueError as refused:  # blank, or too long for the context: a bad --prompt, said in one line
    raise sc.ConfigError(f"--prompt: {refused}") from None
if in_notebook_kernel():  # one output that grows with the reply, saved once in the notebook
    from IPython.display import Pretty, display

    reply, shown = "assistant> ", display(Pretty("assistant> "), display_id=True)
    for piece in pieces:
        reply += piece
        shown.update(Pretty(reply))
else:
    print("assistant> ", end="")
    for piece in pieces:
        print(piece, end="", flush=True)
    print()

# %% [markdown]
# In a notebook kernel the panel below goes on with the conversation (the slider sets the temperature, Clear
# starts over). The twin chats in the terminal instead, when run interactively without `--prompt`
# (`--chat=false` skips it); type `clear` to start over and an empty line to stop.

# %%
if in_notebook_kernel():
    from IPython.display import display

    panel = ChatPanel(session)
    display(panel.widget)
elif cfg.chat and not cfg.prompt and sys.stdin.isatty():
    chat_loop(session)
elif cfg.chat and not cfg.prompt:
    print("no terminal on standard input, so no chat: run this in a terminal, or pass --prompt=... for one reply")

# %% [markdown]
# ## The report card
# Every notebook leaves a `summary.json` and its figures in `STACK_HOME/runs/<run>`. `write_report`
# (`notebooks/report.py`) gathers them into one Markdown file, `STACK_HOME/report.md`: the tokenizer's compression,
# the shards, the pretraining run and its bits-per-byte curve, the CORE table, the chat evals before and after
# fine-tuning, GSM8K before and after RL, the timings, the hardware each notebook ran on and the commit. A notebook
# you have not run shows as "not run". Keep the file (with the `runs/` folder beside it, where its figures are) to
# share what your run achieved; the pipeline (`python3 stackcore.py pipeline`) writes it too, at its end.

# %%
from notebooks.report import write_report

report_path = write_report(sc.stack_home())
print(f"written {report_path}")
report_text = report_path.read_text(encoding="utf-8")
if in_notebook_kernel():  # the figures' links are relative to STACK_HOME: show them as images here
    from IPython.display import Image, Markdown, display

    display(Markdown("\n".join(line for line in report_text.splitlines() if not line.startswith("!["))))
    for figure in sorted(sc.stack_home().glob("runs/*/*.png")):
        display(Image(filename=str(figure), width=640))
elif not cfg.prompt:  # with --prompt the reply is what was asked for: the card stays in its file
    print(report_text)
