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
# All the machinery lives in section 13 of `stackcore.py` (`render_conversation`, `calculate`, `Engine`,
# `ChatSession`); this notebook shows it working.

# %% [markdown]
# ## Get the runtime ready
# This cell runs first in every notebook. It finds the project (the checkout you run in or, in a fresh Google Colab
# runtime, a clone in `/content/decoderstack`), puts it on `sys.path` and calls `sc.setup_runtime()`. In Colab that
# installs what `requirements.txt` asks for and the runtime lacks (never torch); anywhere it prints the GPU, its
# memory, the preset and the compute dtype, and elsewhere it installs nothing. In Colab, tick **use_drive** to keep
# `STACK_HOME` (every artifact) on Google Drive: each Colab notebook runs on its own machine, so Drive is how the
# next notebook finds what this one makes, and how artifacts survive a restart. Google asks for access once.

# %%
import os
import subprocess
import sys

use_drive = False  # @param {type:"boolean"}
ROOT = os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else ".")
if not os.path.isfile(os.path.join(ROOT, "stackcore.py")):  # not in a checkout: a fresh Colab runtime
    ROOT = "/content/decoderstack"
    if not os.path.isdir(ROOT):
        subprocess.run(["git", "clone", "--depth=1", "https://github.com/decoderstack/decoderstack", ROOT], check=True)
sys.path.insert(0, ROOT)
import stackcore as sc

sc.setup_runtime(use_drive)

# %% [markdown]
# ## Set-up
# `run_name` picks the run whose newest checkpoint is loaded; left empty, that is the newest of the chat runs
# (`rl`, `sft`) and, if neither exists yet, the pretraining run, whose base model continues text rather than
# answering questions. `checkpoint` names a file instead. Generation needs no fp32 master copy of the weights, so
# they are kept in the compute dtype (bf16 on a recent GPU): each decode step reads every weight once, and memory
# traffic is what bounds its speed.

# %%
import time
from dataclasses import dataclass

import torch


@dataclass
class ChatConfig(sc.StackConfig):
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


cfg = sc.configure(ChatConfig)
print(sc.describe_config(cfg))
device = sc.pick_device()
checkpoint_path = cfg.checkpoint or sc.find_chat_checkpoint(cfg.run_name)
model, checkpoint = sc.model_from_checkpoint(checkpoint_path, device)
model.set_compute_dtype(sc.pick_compute_dtype(device))
model.to(model.compute_dtype).eval()  # no fp32 master weights at inference: a decode step reads every weight once
tokenizer = sc.Tokenizer.load(sc.artifact_dir("tokenizer"))
engine = sc.Engine(model, tokenizer, backend=sc.pick_attention_backend(device, cfg.attention))
print(f"{checkpoint_path} (step {checkpoint['step']}): {model.num_params()['total']:,} parameters, "
      f"attention {engine.backend}, KV cache {model.kv_bytes_per_token(model.compute_dtype):,} bytes per token")

# %% [markdown]
# ## The KV cache: prefill, then decode
# The prompt goes through the model in one pass (the *prefill*), which fills the cache with its keys and values.
# Each decode step then feeds one token at position `cache.length`: its query attends to the cached keys (only the
# last `window` of them in the sliding-window layers), and its own key and value are appended. Everything else,
# value embeddings, U-net skips, the x0 mix and the soft cap, is the training forward pass unchanged, so the
# logits must match a full forward pass over the same tokens up to float rounding.

# %%
prompt = tokenizer.encode("The capital of France is", prepend_bos=True)
ids = torch.tensor(prompt + tokenizer.encode(" Paris, and the capital of Italy is Rome."), device=device)
with torch.no_grad():
    bounds = torch.tensor([0, len(ids)], device=device, dtype=torch.int32)  # one document
    full = model(ids, bounds, len(ids), backend=engine.backend)
    cache = sc.KVCache(model.config, 1, len(ids), device, model.compute_dtype)
    steps = [sc.forward_cached(model, ids[None, :len(prompt)], cache, engine.backend)[0]]  # prefill
    for t in range(len(prompt), len(ids)):  # decode, one token a step
        steps.append(sc.forward_cached(model, ids[None, t:t + 1], cache, engine.backend)[0])
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
# ## Sampling
# Temperature divides the logits before the softmax (0 means always the likeliest token); top-k keeps only the k
# likeliest tokens. `num_samples` rows share one prefill: the engine copies the prompt's cache into every row, and
# row i draws from its own random generator seeded with `seed + i`, so a row gives the same text whether it was
# sampled alone or in a batch.

# %%
for text in ("Once upon a time", "The number of days in a week is"):
    samples, _ = engine.generate(tokenizer.encode(text, prepend_bos=True), num_samples=3, max_tokens=cfg.max_tokens,
                                 temperature=1.0, top_k=cfg.top_k, seed=cfg.seed)
    print(text)
    for row in samples:
        print("   ->", repr(tokenizer.decode(row)))

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

# %%
session = sc.ChatSession(engine, temperature=cfg.temperature, top_k=cfg.top_k or None, max_tokens=cfg.max_tokens,
                         seed=cfg.seed)
question = cfg.prompt or "Hello! What is 12 times 7?"
print(f"you> {question}")
if sc.in_notebook_kernel():  # one output that grows with the reply, saved once in the notebook
    from IPython.display import Pretty, display

    reply, shown = "assistant> ", display(Pretty("assistant> "), display_id=True)
    for piece in session.reply(question):
        reply += piece
        shown.update(Pretty(reply))
else:
    print("assistant> ", end="")
    for piece in session.reply(question):
        print(piece, end="", flush=True)
    print()

# %% [markdown]
# In a notebook kernel the panel below goes on with the conversation (the slider sets the temperature, Clear
# starts over). The twin chats in the terminal instead, when run interactively without `--prompt`
# (`--chat=false` skips it); type `clear` to start over and an empty line to stop.

# %%
if sc.in_notebook_kernel():
    from IPython.display import display

    panel = sc.ChatPanel(session)
    display(panel.widget)
elif cfg.chat and not cfg.prompt and sys.stdin.isatty():
    sc.chat_loop(session)
