"""The chat evaluations of 05_sft: which examples each task asks and from where (as ChatTasks), how they are scored,
and their results as a table and a chart.

| task | kind | examples | public home |
| --- | --- | --- | --- |
| arc_easy, arc_challenge | letter choice | ARC test splits (2,376 and 1,172) | `allenai/ai2_arc` |
| mmlu | letter choice | MMLU test (14,042, 57 subjects) | `cais/mmlu` (`all/test-*`) |
| gsm8k | generation + calculator, final `#### N` | GSM8K test (1,319) | `openai/gsm8k` (data/gsm8k.py) |
| humaneval | generation, then the tests run in the sandbox | 164 problems | `openai/openai_humaneval` |
| spelling | generation, letter counting, final `#### N` | words held out of the SFT spelling set | a word list |
| colours | letter choice | generated colour questions (the offline `tiny` preset) | generated here |

Every task asks its questions in the chat format. Choice tasks are scored by the allowed letter with the highest logit
after <|assistant_start|>, many prompts per varlen forward pass; generative tasks by greedy decoding with the Engine
(calculator included) and a check of the reply, generated code running in data/sandbox.py's sandbox. ChatCORE,
nanochat's one-number summary, is the mean accuracy above random guessing. Each task reads the Hub or a local copy,
like data/sft.py.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from data import gsm8k
from data.records import field
from data.sandbox import run_sandboxed
from data.sft import (HubTable, choice_questions, colour_questions, letter_counts, load_words, rows, selection_passes,
                      table_files, word_split)
from notebooks.config import StackConfig, above, at_least
from stackcore import (GPT, Engine, Tokenizer, assistant_parts, centered_accuracy, render_for_completion, show_parts,
                       token_budget_chunks, world_size_and_rank)


# --- Scoring: letter choice, greedy generation, ChatCORE -------------------------------------------------------------

@dataclass
class ChatTask:
    """A chat eval. kind "choice": examples have .prompt() (messages), .letters and .gold (the right index), and are
    scored by letter. kind "generate": examples have .prompt() and .check(reply) -> bool, and are scored by greedy
    generation of up to max_tokens tokens. `baseline` is the accuracy of random guessing."""
    name: str
    kind: str
    examples: Sequence[Any]
    baseline: float = 0.0
    max_tokens: int = 256


def evaluate_chat_task(model: GPT, tokenizer: Tokenizer, task: ChatTask, backend: str, device: str,
                       pack_tokens: int = 0) -> dict[str, Any]:
    """Accuracy of one task. Under torch.distributed each rank scores the examples with index % world == rank."""
    world_size, rank = world_size_and_rank()
    mine = list(task.examples)[rank::world_size]
    started = time.time()
    if task.kind == "choice":
        chosen = choose_letters(model, tokenizer, mine, backend, device, pack_tokens)
        correct = [c == q.gold for c, q in zip(chosen, mine)]
    elif task.kind == "generate":
        engine = Engine(model, tokenizer, backend)
        replies = generate_replies(engine, [ex.prompt() for ex in mine], task.max_tokens)
        correct = [bool(ex.check(reply)) for ex, reply in zip(mine, replies)]
    else:
        raise ValueError(f"unknown chat task kind {task.kind!r}: choice or generate")
    counts = torch.tensor([float(sum(correct)), float(len(correct))], device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    accuracy = float(counts[0] / counts[1]) if counts[1] else 0.0
    return {"accuracy": accuracy, "centered": centered_accuracy(accuracy, task.baseline), "baseline": task.baseline,
            "examples": int(counts[1]), "seconds": round(time.time() - started, 2)}


def evaluate_chat(model: GPT, tokenizer: Tokenizer, tasks: Sequence[ChatTask], backend: str, device: str,
                  pack_tokens: int = 0) -> dict[str, Any]:
    """{"tasks": {name: result}, "chatcore": mean centred accuracy}: ChatCORE, nanochat's one-number summary."""
    results = {task.name: evaluate_chat_task(model, tokenizer, task, backend, device, pack_tokens) for task in tasks}
    chatcore = float(np.mean([r["centered"] for r in results.values()])) if results else float("nan")
    return {"tasks": results, "chatcore": chatcore}


@torch.no_grad()
def last_token_logits(model: GPT, prompts: Sequence[Sequence[int]], backend: str, device: str, pack_tokens: int = 0
                      ) -> Tensor:
    """Logits (len(prompts), vocab) at the last position of each prompt. Prompts (cut from the left to
    max_seq_len) are packed back to back into passes of up to `pack_tokens` tokens; 0 runs one prompt per pass."""
    prompts = [list(p)[-model.config.max_seq_len:] for p in prompts]
    rows = []
    for chunk in token_budget_chunks([len(p) for p in prompts], pack_tokens):
        lengths = [len(prompts[i]) for i in chunk]
        inputs = torch.tensor([t for i in chunk for t in prompts[i]], device=device)
        cu_seqlens = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32, device=device)
        logits = model(inputs, cu_seqlens, max(lengths), backend=backend)
        rows.append(logits[cu_seqlens[1:].long() - 1])
    return torch.cat(rows) if rows else torch.zeros(0, model.config.vocab_size, device=device)


def letter_ids(tokenizer: Tokenizer, letters: Sequence[str]) -> list[int]:
    """The token of each answer letter, as the model writes it right after <|assistant_start|>."""
    ids = [tokenizer.encode(letter) for letter in letters]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"answer letters {list(letters)} must each be one token")
    return [i[0] for i in ids]


def choose_letters(model: GPT, tokenizer: Tokenizer, questions: Sequence[Any], backend: str, device: str,
                   pack_tokens: int = 0) -> list[int]:
    """For questions with .prompt() (messages) and .letters: the index of the allowed letter with the highest
    logit after <|assistant_start|> (ties go to the first)."""
    prompts = [render_for_completion(tokenizer, q.prompt()) for q in questions]
    model.eval()
    logits = last_token_logits(model, prompts, backend, device, pack_tokens)
    model.train()
    return [int(row[letter_ids(tokenizer, q.letters)].argmax()) for row, q in zip(logits, questions)]


def generate_replies(engine: Engine, conversations: Sequence[Sequence[dict[str, Any]]], max_tokens: int,
                     batch_size: int = 64) -> list[str]:
    """The greedy reply to each conversation, tool calls shown as by show_parts, `batch_size` conversations decoded
    together; an empty reply where the prompt leaves no room in the model's context."""
    prompts = [render_for_completion(engine.tokenizer, messages) for messages in conversations]
    fits = [i for i, prompt in enumerate(prompts) if len(prompt) < engine.model.config.max_seq_len]
    replies = [""] * len(prompts)
    for first in range(0, len(fits), batch_size):
        chunk = fits[first:first + batch_size]
        tokens, _ = engine.generate_batch([prompts[i] for i in chunk], max_tokens=max_tokens, temperature=0.0)
        for i, row in zip(chunk, tokens):
            replies[i] = show_parts(assistant_parts(engine.tokenizer, row))
    return replies


# --- The tasks and their examples ------------------------------------------------------------------------------------

HUMANEVAL = HubTable("openai/openai_humaneval", {"test": ("openai_humaneval/test-00000-of-00001.parquet",)})
CHAT_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spelling", "colours")
CHOICE_SPLITS = {"arc_easy": "test", "arc_challenge": "test", "mmlu": "test"}


@dataclass(frozen=True)
class FinalAnswer:
    """A question whose reply must end with `#### N` equal to `gold` (GSM8K, letter counting)."""
    messages: tuple
    gold: str

    def prompt(self) -> list[dict]:
        return list(self.messages)

    def check(self, reply: str) -> bool:
        return gsm8k.reward(reply, self.gold) == 1.0


FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", re.S)


def extract_code(reply: str) -> str:
    """The first fenced code block of a reply, or the whole reply when it has none."""
    match = FENCE.search(reply)
    return match.group(1) if match else reply


@dataclass(frozen=True)
class CodeProblem:
    """A HumanEval problem: the model completes `stub` (signature and docstring); its code must pass `test`."""
    task_id: str
    stub: str
    test: str
    entry_point: str
    canonical_solution: str = ""

    def prompt(self) -> list[dict]:
        return [{"role": "user", "content": f"Complete this Python function. Reply with the code only.\n\n"
                                            f"```python\n{self.stub}```"}]

    def program(self, reply: str) -> str:
        """The stub (its imports and helper functions included), then the reply's code: a whole function that
        replaces the stub's, or the body that completes it; then the tests and the call that runs them."""
        code = extract_code(reply)
        whole = re.search(rf"def\s+{re.escape(self.entry_point)}\s*\(", code) is not None
        separator = "\n\n" if whole else ""
        return f"{self.stub}{separator}{code}\n\n{self.test}\n\ncheck({self.entry_point})\n"

    def check(self, reply: str) -> bool:
        return run_sandboxed(self.program(reply), timeout_s=10.0).passed


def code_problem(row: dict) -> CodeProblem:
    return CodeProblem(*(field(row, name) for name in ("task_id", "prompt", "test", "entry_point")),
                       row.get("canonical_solution") or "")


def humaneval_problems(source: str = "hub", endpoint: str | None = None) -> list[CodeProblem]:
    """The 164 problems from the Hub, or from a local human_eval.jsonl file (or a folder holding one)."""
    if source == "hub":
        paths = table_files(HUMANEVAL, "test", endpoint=endpoint)
    else:
        path = Path(source).expanduser()
        paths = [path / "human_eval.jsonl" if path.is_dir() else path]
    return list(rows(paths, code_problem))


def subset(items: list, count: int, seed: int) -> list:
    """All items (count 0 or more than there are), else a seeded random `count` of them, in their order."""
    if not count or count >= len(items):
        return items
    return [items[i] for i in selection_passes(len(items), count, seed)[0]]


@dataclass
class ChatEvalConfig(StackConfig):
    """Which chat evals to run and on how many examples."""
    chat_tasks: str = "arc_easy,arc_challenge,mmlu,gsm8k,humaneval,spelling"  # comma-separated, from CHAT_TASKS
    chat_choice_examples: int = 0  # examples per letter-choice task (0: all)
    chat_generate_examples: int = 250  # examples per generative task (0: all; generation is the slow part)
    chat_max_tokens: int = 512  # longest generated reply
    chat_local_dir: str = ""  # a folder of local copies: <dir>/<task>/ (a repo mirror or test.jsonl), else the Hub
    chat_gsm8k_source: str = "hub"  # data/gsm8k.py's source: hub | synthetic | a folder of test.jsonl
    chat_humaneval_source: str = "hub"  # hub, or a human_eval.jsonl file (or its folder)
    chat_words: str = ""  # word list for spelling (as data/sft.py's sft_words)
    chat_seed: int = 0
    PRESETS = {
        "tiny": dict(chat_tasks="colours,spelling,gsm8k", chat_choice_examples=48, chat_generate_examples=3,
                     chat_max_tokens=40, chat_gsm8k_source="synthetic", chat_words="builtin"),
        "colab": dict(chat_choice_examples=1000, chat_generate_examples=100),
    }
    LIMITS = {"chat_choice_examples": at_least(0), "chat_generate_examples": at_least(0),
              "chat_max_tokens": above(0), "chat_seed": at_least(0)}

    def task_names(self) -> list[str]:
        names = [name.strip() for name in self.chat_tasks.split(",") if name.strip()]
        unknown = sorted(set(names) - set(CHAT_TASKS))
        if unknown:
            raise ValueError(f"unknown chat task(s) {unknown}; valid: {', '.join(CHAT_TASKS)}")
        return names


def load_task(cfg: ChatEvalConfig, name: str, endpoint: str | None = None) -> ChatTask:
    """One task, its examples subsampled as the config says."""
    choice_count, generate_count, seed = cfg.chat_choice_examples, cfg.chat_generate_examples, cfg.chat_seed
    local = str(Path(cfg.chat_local_dir).expanduser() / name) if cfg.chat_local_dir else ""
    if name in CHOICE_SPLITS:
        questions, _ = choice_questions(name, CHOICE_SPLITS[name], local, endpoint)
        examples = subset(list(questions()), choice_count, seed)
        return ChatTask(name, "choice", examples, baseline=sum(1 / len(q.letters) for q in examples) / len(examples))
    if name == "colours":
        return ChatTask(name, "choice", colour_questions(choice_count or 200, seed + 1), baseline=0.25)
    if name == "gsm8k":
        problems = subset(gsm8k.load_problems("test", cfg.chat_gsm8k_source, endpoint), generate_count, seed)
        return ChatTask(name, "generate", [FinalAnswer(tuple(p.prompt()), p.gold) for p in problems],
                        max_tokens=cfg.chat_max_tokens)
    if name == "humaneval":
        problems = subset(humaneval_problems(cfg.chat_humaneval_source, endpoint), generate_count, seed)
        return ChatTask(name, "generate", problems, max_tokens=cfg.chat_max_tokens)
    if name == "spelling":
        words = word_split(load_words(cfg.chat_words), "test")
        questions = letter_counts(words, generate_count or 500, seed + 2)
        return ChatTask(name, "generate", [FinalAnswer(tuple(q.prompt()), q.gold) for q in questions],
                        max_tokens=cfg.chat_max_tokens)
    raise ValueError(f"unknown chat task {name!r}; valid: {', '.join(CHAT_TASKS)}")


def load_chat_tasks(cfg: ChatEvalConfig, endpoint: str | None = None) -> list[ChatTask]:
    return [load_task(cfg, name, endpoint) for name in cfg.task_names()]


def describe_tasks(tasks: list[ChatTask]) -> str:
    return "\n".join(f"{t.name:<14} {t.kind:<9} {len(t.examples):>6} examples, random guessing {t.baseline:.2f}"
                     for t in tasks)


# --- Results as a table and a chart (05_sft) ---------------------------------------------------------------------

def chat_table(stages: dict[str, dict[str, Any]]) -> str:
    """A text table of accuracy per task (rows) for each stage (columns), e.g. {"base": ..., "sft": ...}."""
    names = list(dict.fromkeys(name for stage in stages.values() for name in stage["tasks"]))
    lines = [f"{'task':<16}" + "".join(f"{stage:>12}" for stage in stages)]
    for name in names:
        cells = [stage["tasks"].get(name, {}).get("accuracy") for stage in stages.values()]
        lines.append(f"{name:<16}" + "".join(f"{'-' if c is None else f'{c:.3f}':>12}" for c in cells))
    lines.append(f"{'ChatCORE':<16}" + "".join(f"{stage['chatcore']:>12.3f}" for stage in stages.values()))
    return "\n".join(lines)


def plot_chat_results(stages: dict[str, dict[str, Any]], title: str = "chat evals") -> Any:
    """A bar chart of accuracy per task, one bar per stage (before / after SFT, after RL), random guessing dashed.
    Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(name for stage in stages.values() for name in stage["tasks"]))
    width = 0.8 / max(len(stages), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(names)), 3.8))
    for i, (stage, results) in enumerate(stages.items()):
        values = [results["tasks"].get(name, {}).get("accuracy", 0.0) for name in names]
        ax.bar(np.arange(len(names)) + (i - (len(stages) - 1) / 2) * width, values, width, label=stage)
    for j, name in enumerate(names):
        baseline = next(s["tasks"][name]["baseline"] for s in stages.values() if name in s["tasks"])
        ax.hlines(baseline, j - 0.45, j + 0.45, colors="black", linestyles="dashed", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="accuracy", ylim=(0, 1), title=title)
    ax.legend()
    fig.tight_layout()
    return fig
