"""GSM8K (Cobbe et al., 2021): grade-school maths word problems with worked solutions. 05_sft trains on them as
conversations and scores them as a chat eval; 06_rl samples answers to them and rewards the right final number.

A solution marks every calculation as `<<expression=result>>` and ends with the final answer after `####`:

    Natalia sold 48/2 = <<48/2=24>>24 clips in May. ... #### 72

Each annotation becomes a calculator call in the assistant message: a `python` part holding the expression (what
the model learns to write) and a `python_output` part holding the result (what the engine computes and forces at
run time), between the text parts around it; the last part is the text that ends in `#### N`.

Problems come from the Hub (`openai/gsm8k`, config `main`: one parquet file per split, fetched with
huggingface_hub), from a local folder of `train.jsonl` / `test.jsonl` with `question` and `answer` fields (the layout
of the original repository, openai/grade-school-math), or, for the offline `tiny` preset, from a generator of small
problems written in the same format.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from data.records import DataFileError, read_records
from data.synthetic import NAMES, THINGS
from notebooks.config import StackConfig, at_least
from stackcore import artifact_dir, read_shard, require_artifact, side_file, write_shard

HUB_REPO = "openai/gsm8k"
SPLITS = ("train", "test")
SYNTHETIC_COUNTS = {"train": 2000, "test": 200}  # problems per split of the generated set
CALCULATION = re.compile(r"<<([^<>]*)>>")
FINAL_ANSWER = re.compile(r"####\s*([-$.0-9][-$0-9,.]*)")
NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


@dataclass
class GsmPromptConfig(StackConfig):
    """Which GSM8K problems 02_sharding tokenizes into prompts for 06_rl (a base of its config)."""
    rl_gsm8k_source: str = "hub"  # hub | synthetic | a folder of train.jsonl / test.jsonl
    rl_train_prompts: int = 0  # train problems to tokenize, from the start of the split (0: all 7,473)
    rl_test_prompts: int = 0  # test problems (0: all 1,319)
    PRESETS = {"tiny": dict(rl_gsm8k_source="synthetic", rl_train_prompts=256, rl_test_prompts=64)}
    LIMITS = {"rl_train_prompts": at_least(0), "rl_test_prompts": at_least(0)}


class GsmDataError(DataFileError):
    """A problem file that is missing, malformed or lacks a final answer; the message names the file and line."""


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the worked solution with its <<expression=result>> annotations, ending in `#### N`

    @property
    def gold(self) -> str:
        """The final answer, normalised as parse_final_answer() normalises the model's."""
        gold = parse_final_answer(self.answer)
        if gold is None:
            raise GsmDataError(f"no '#### N' final answer in {self.answer[-80:]!r}")
        return gold

    def prompt(self) -> list[dict]:
        """The conversation up to the question: what the model is asked to complete."""
        return [{"role": "user", "content": self.question}]

    def conversation(self) -> list[dict]:
        """The question and the worked solution as an assistant message with calculator calls."""
        return [*self.prompt(), {"role": "assistant", "content": assistant_parts(self.answer)}]


# --- Answers and rewards ----------------------------------------------------------------------------------------

def assistant_parts(answer: str) -> list[dict]:
    """Split a solution into text / python (the expression) / python_output (the result) parts; empty text between
    two calculations is dropped."""
    parts = []
    pieces = CALCULATION.split(answer)  # text, annotation, text, annotation, ..., text
    for i, piece in enumerate(pieces):
        if i % 2:
            expression, _, result = piece.rpartition("=")
            parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def normalise_number(text: str) -> str | None:
    """'1,080' -> '1080', '$5' -> '5', '10.0' -> '10', '2.50' -> '2.5', '7.' -> '7', '.5' -> '0.5'; None if no number
    is left."""
    text = text.replace(",", "").replace("$", "").rstrip(".")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    text = re.sub(r"^(-?)\.", r"\g<1>0.", text)
    return text if NUMBER.fullmatch(text) else None


def parse_final_answer(text: str) -> str | None:
    """The number after the first `####` (GSM8K's final-answer mark, which the model learns to write), normalised;
    None when there is no such mark or no number after it."""
    match = FINAL_ANSWER.search(text)
    return normalise_number(match.group(1)) if match else None


def reward(completion_text: str, gold: str) -> float:
    """1.0 when the completion's final answer equals `gold` (both normalised), else 0.0: the reward of 06_rl and the
    correctness of the GSM8K chat eval."""
    answer = parse_final_answer(completion_text)
    return float(answer is not None and answer == normalise_number(gold))


# --- Reading problems -------------------------------------------------------------------------------------------

def hub_filename(split: str, config: str = "main") -> str:
    return f"{config}/{split}-00000-of-00001.parquet"


def download_split(split: str, dest: Path, endpoint: str | None = None, config: str = "main") -> Path:
    """Fetch one split's parquet file from the Hub into `dest` (kept there: a second call does not download again).
    `endpoint` points huggingface_hub at another server (tests use a local one)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(HUB_REPO, hub_filename(split, config), repo_type="dataset", local_dir=dest,
                                endpoint=endpoint))


def check_record(record: object, where: str) -> Problem:
    if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
            or not isinstance(record.get("answer"), str):
        raise GsmDataError(f"{where}: expected an object with string fields 'question' and 'answer'")
    problem = Problem(record["question"], record["answer"])
    if parse_final_answer(problem.answer) is None:
        raise GsmDataError(f"{where}: the answer has no '#### N' final answer")
    return problem


def read_problems(path: Path) -> list[Problem]:
    """Problems of one .jsonl or .parquet file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise GsmDataError(f"{path}: no such GSM8K file")
    columns = ["question", "answer"] if path.suffix == ".parquet" else None
    return [check_record(record, where) for where, record in read_records([path], GsmDataError, columns)]


def load_problems(split: str, source: str = "hub", endpoint: str | None = None) -> list[Problem]:
    """The problems of `split` ("train" or "test") from `source`: "hub" (downloaded once into
    STACK_HOME/downloads/gsm8k), "synthetic" (generated, offline), or a folder holding `<split>.jsonl`."""
    if split not in SPLITS:
        raise ValueError(f"unknown GSM8K split {split!r}; valid: {', '.join(SPLITS)}")
    if source == "hub":
        return read_problems(download_split(split, artifact_dir("downloads") / "gsm8k", endpoint))
    if source == "synthetic":
        return synthetic_problems(SYNTHETIC_COUNTS[split], seed=SPLITS.index(split))
    if not source or not Path(source).expanduser().is_dir():  # "" would be the working folder
        raise GsmDataError(f"GSM8K source {source!r} is not hub, synthetic or a folder holding {split}.jsonl")
    return read_problems(Path(source).expanduser() / f"{split}.jsonl")


# --- Prompt shards for 06_rl (written by 02_sharding) ------------------------------------------------------
# <split>.bin holds each rendered prompt (ending in <|assistant_start|>) back to back; <split>.records.bin one
# int32 row per prompt with the columns of PROMPT_RECORD_FIELDS.

PROMPT_RECORD_FIELDS = ("prompt_start", "prompt_end", "problem", "gold")


@dataclass
class TaskPrompt:
    """One prompt of a prompt shard, as 06_rl samples it (notebooks/rl.py)."""
    ids: list[int]  # the rendered conversation, ending in <|assistant_start|>
    gold: str  # the reference answer a completion is rewarded against
    problem: int  # index of the problem in its split


def write_prompt_shard(directory: Path, split: str, prompts: Sequence[TaskPrompt], vocab_size: int) -> Path:
    """`split`.bin (the prompts back to back) and its records side file. Gold answers are stored as int32, which
    holds every GSM8K answer; anything else is an error naming the problem."""
    path = Path(directory) / f"{split}.bin"
    records, offset = [], 0
    for prompt in prompts:
        if not prompt.gold.lstrip("-").isdigit() or not -2**31 <= int(prompt.gold) < 2**31:
            raise ValueError(f"{path}: problem {prompt.problem}: gold answer {prompt.gold!r} is not an int32 integer")
        records.append((offset, offset + len(prompt.ids), prompt.problem, int(prompt.gold)))
        offset += len(prompt.ids)
    tokens = np.concatenate([np.asarray(p.ids, dtype=np.uint32) for p in prompts]) if prompts else np.zeros(0)
    write_shard(path, tokens, "tokens", vocab_size)
    table = np.asarray(records, dtype=np.int32).reshape(-1, len(PROMPT_RECORD_FIELDS))
    write_shard(side_file(path, "records"), table, "records")
    return path


def read_prompt_shard(directory: Path, split: str, vocab_size: int | None = None) -> list[TaskPrompt]:
    path = require_artifact(Path(directory) / f"{split}.bin", made_by="02_sharding")
    tokens, records = read_shard(path, vocab_size), read_shard(side_file(path, "records"), kind="records")
    return [TaskPrompt(np.asarray(tokens[start:end]).tolist(), str(gold), int(problem))
            for start, end, problem, gold in records.tolist()]


# --- Small generated problems for offline runs ------------------------------------------------------------------

def synthetic_problem(rng: random.Random) -> Problem:
    """One or two calculations in GSM8K's format, e.g. 'Ada has 12 maps and finds 7 more. ...'."""
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(1, 30)
    kind = rng.randrange(3)
    if kind == 0:
        question = f"{name} has {a} {things} and finds {c} more. How many {things} does {name} have now?"
        steps = [(f"{a}+{c}", a + c, f"{name} has {a} + {c} = ", " {things} now.")]
    elif kind == 1:
        question = f"{name} has {a + c} {things} and gives away {c}. How many {things} are left?"
        steps = [(f"{a + c}-{c}", a, f"{name} keeps {a + c} - {c} = ", " {things}.")]
    else:
        question = (f"{name} buys {b} boxes of {a} {things} and finds {c} more. "
                    f"How many {things} does {name} have?")
        steps = [(f"{b}*{a}", a * b, f"The boxes hold {b} * {a} = ", " {things}.\n"),
                 (f"{a * b}+{c}", a * b + c, f"With the {c} found, {name} has {a * b} + {c} = ", " {things}.")]
    lines = [f"{before}<<{expr}={value}>>{value}{after.format(things=things)}" for expr, value, before, after in steps]
    return Problem(question, "".join(lines) + f"\n#### {steps[-1][1]}")


def synthetic_problems(count: int, seed: int = 0) -> list[Problem]:
    """`count` generated problems, the same for the same seed."""
    rng = random.Random(seed)
    return [synthetic_problem(rng) for _ in range(count)]
