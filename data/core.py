"""The 22 CORE tasks of the DCLM paper, as nanochat scores them: where each lives in the eval bundle, how to read
it and how to render an example into prompt texts.

The task table is written out here (from the bundle's `core.yaml` / DCLM's `heavy.yaml` and `eval_meta_data.csv`),
so only the jsonl files are needed. A bundle is a folder holding `eval_data/<category>/<task>.jsonl`: the real one
(downloaded once, as nanochat does, or a local copy) or a tiny synthetic one generated in code for offline runs.
"""
from __future__ import annotations

import json
import random
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data.records import DataFileError, read_records
from stackcore import (CORE_MANIFEST, CORE_RECORD_FIELDS, Tokenizer, artifact_dir, common_prefix_length, side_file,
                       write_shard)

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_KINDS = ("multiple_choice", "schema", "language_modeling")
REQUIRED_FIELDS = {"multiple_choice": ("query", "choices", "gold"),
                   "schema": ("context_options", "continuation", "gold"),
                   "language_modeling": ("context", "continuation")}
FEWSHOT_SEED = 1234  # example i draws its few-shot examples with random.Random(FEWSHOT_SEED + i)
SUBSAMPLE_SEED = 1337  # which examples a capped run keeps


class CoreDataError(DataFileError):
    """A task file that is missing, malformed or of an unknown type; the message names the file and line."""


@dataclass(frozen=True)
class CoreTask:
    label: str
    file: str  # category/task.jsonl under eval_data/
    kind: str  # one of TASK_KINDS
    shots: int
    delimiter: str  # between the context and the continuation
    baseline: float  # accuracy of random guessing, in [0, 1]


@dataclass
class CoreExample:
    """One rendered example: choice i is the text contexts[i] + continuations[i]; only the continuation is scored."""
    kind: str  # multiple_choice | schema | language_modeling
    contexts: list[str]
    continuations: list[str]
    gold: int


def _task(label: str, file: str, kind: str, shots: int, baseline_percent: float, delimiter: str = " ") -> CoreTask:
    return CoreTask(label, file, kind, shots, delimiter, baseline_percent / 100)


MC, SCHEMA, LM = TASK_KINDS
ANSWER = "\nAnswer: "
CORE_TASKS: tuple[CoreTask, ...] = (
    _task("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", MC, 0, 25),
    _task("jeopardy", "world_knowledge/jeopardy_all.jsonl", LM, 10, 0, ANSWER),
    _task("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", LM, 10, 0),
    _task("arc_easy", "world_knowledge/arc_easy.jsonl", MC, 10, 25, ANSWER),
    _task("arc_challenge", "world_knowledge/arc_challenge.jsonl", MC, 10, 25, ANSWER),
    _task("copa", "commonsense_reasoning/copa.jsonl", MC, 0, 50),
    _task("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", MC, 10, 40.3),
    _task("piqa", "commonsense_reasoning/piqa.jsonl", MC, 10, 50, ANSWER),
    _task("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", MC, 0, 25),
    _task("lambada_openai", "language_understanding/lambada_openai.jsonl", LM, 0, 0),
    _task("hellaswag", "language_understanding/hellaswag.jsonl", MC, 10, 25),
    _task("winograd", "language_understanding/winograd_wsc.jsonl", SCHEMA, 0, 50),
    _task("winogrande", "language_understanding/winogrande.jsonl", SCHEMA, 0, 50),
    _task("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", LM, 10, 0),
    _task("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", MC, 3, 25),
    _task("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", LM, 10, 0),
    _task("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", LM, 10, 0),
    _task("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", LM, 10, 0),
    _task("squad", "reading_comprehension/squad.jsonl", LM, 10, 0),
    _task("coqa", "reading_comprehension/coqa.jsonl", LM, 0, 0),
    _task("boolq", "reading_comprehension/boolq.jsonl", MC, 10, 62, ANSWER),
    _task("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl",
          MC, 10, 25),
)
TASKS_BY_LABEL = {task.label: task for task in CORE_TASKS}


# --- Finding a bundle ------------------------------------------------------------------------------------------

def download_bundle(url: str = EVAL_BUNDLE_URL) -> Path:
    """Fetch and unzip nanochat's eval bundle into STACK_HOME/downloads/eval_bundle once; return that folder."""
    downloads = artifact_dir("downloads")
    bundle = downloads / "eval_bundle"
    if (bundle / "eval_data").is_dir():
        return bundle
    archive = downloads / "eval_bundle.zip"
    if not archive.is_file():
        print(f"downloading the CORE eval bundle from {url}")
        tmp = archive.with_name(archive.name + ".tmp")
        urllib.request.urlretrieve(url, tmp)
        tmp.replace(archive)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(downloads)  # the zip holds one top-level folder, eval_bundle/
    if not (bundle / "eval_data").is_dir():
        raise CoreDataError(f"{archive}: no eval_bundle/eval_data/ inside the downloaded zip")
    return bundle


def find_bundle(folder: str = "", synthetic: bool = False) -> Path:
    """The bundle to read: `folder` if given (it must hold eval_data/), else the synthetic one if asked for, else
    the downloaded one."""
    if folder:
        root = Path(folder).expanduser()
        if not (root / "eval_data").is_dir():
            raise CoreDataError(f"{root}: not a CORE bundle (no eval_data/ folder inside)")
        return root
    return write_synthetic_bundle(artifact_dir("downloads") / "core_synthetic") if synthetic else download_bundle()


def available_tasks(root: Path, tasks: tuple[CoreTask, ...] = CORE_TASKS) -> list[CoreTask]:
    """The tasks whose file is in the bundle; prints a note for each one skipped."""
    found = []
    for task in tasks:
        if (Path(root) / "eval_data" / task.file).is_file():
            found.append(task)
        else:
            print(f"note: CORE task {task.label} skipped: {task.file} is not in {root}/eval_data")
    return found


# --- Reading and rendering -------------------------------------------------------------------------------------

FIELD_TYPES = {"query": str, "choices": list, "context_options": list, "continuation": str, "context": str,
               "gold": int}


def check_row(row: object, kind: str, where: str) -> dict:
    if not isinstance(row, dict):
        raise CoreDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [name for name in REQUIRED_FIELDS[kind] if name not in row]
    if missing:
        raise CoreDataError(f"{where}: {kind} example lacks field(s) {', '.join(missing)}")
    wrong = [f"{name} is {type(row[name]).__name__}" for name in REQUIRED_FIELDS[kind]
             if not isinstance(row[name], FIELD_TYPES[name]) or isinstance(row[name], bool)]
    if wrong:
        raise CoreDataError(f"{where}: {kind} example has {', '.join(wrong)}: expected "
                            f"{', '.join(f'{n} {FIELD_TYPES[n].__name__}' for n in REQUIRED_FIELDS[kind])}")
    options = row.get("choices", row.get("context_options"))
    if kind == SCHEMA and not (options and all(isinstance(option, str) for option in options)):
        raise CoreDataError(f"{where}: the context options must be strings, got {options!r}")
    if kind != LM and not 0 <= row["gold"] < len(options):
        raise CoreDataError(f"{where}: gold {row['gold']!r} is not an index into the {len(options)} options")
    return row


def load_examples(root: Path, task: CoreTask) -> list[dict]:
    """Every example of a task, checked for the fields its type needs, and for enough examples to draw its shots
    from the others."""
    path = Path(root) / "eval_data" / task.file
    if task.kind not in REQUIRED_FIELDS:
        raise CoreDataError(f"{path}: unknown task type {task.kind!r} for {task.label}; known: {', '.join(TASK_KINDS)}")
    rows = [check_row(row, task.kind, where) for where, row in read_records([path], CoreDataError)]
    if len(rows) <= task.shots:
        raise CoreDataError(f"{path}: {len(rows)} example(s), but {task.label} draws {task.shots} few-shot examples "
                            f"from the others: it needs at least {task.shots + 1}")
    return rows


def fewshot_indices(index: int, count: int, shots: int) -> list[int]:
    """The few-shot examples of example `index`: a fixed draw from all the others (nanochat's seeds)."""
    if shots == 0:
        return []
    others = [i for i in range(count) if i != index]
    return random.Random(FEWSHOT_SEED + index).sample(others, shots)


def render_example(task: CoreTask, examples: list[dict], index: int) -> CoreExample:
    """The prompt texts of one example, the few-shot examples first, each followed by a blank line:

    multiple choice: shots `query + delimiter + choices[gold]`; then `query + delimiter` with each choice as a
    continuation. schema: shots `context_options[gold] + delimiter + continuation`; then each context option +
    delimiter, all sharing the continuation. language modelling: contexts stripped of surrounding whitespace,
    shots `context + delimiter + continuation`; then `context + delimiter` and the continuation.
    """
    item, delim = examples[index], task.delimiter
    shots = [examples[i] for i in fewshot_indices(index, len(examples), task.shots)]
    if task.kind == MC:
        prefix = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
        return CoreExample(MC, [prefix + item["query"] + delim] * len(item["choices"]),
                           [str(choice) for choice in item["choices"]], item["gold"])
    if task.kind == SCHEMA:
        prefix = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
        contexts = [prefix + option + delim for option in item["context_options"]]
        return CoreExample(SCHEMA, contexts, [item["continuation"]] * len(contexts), item["gold"])
    prefix = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots)
    return CoreExample(LM, [prefix + item["context"].strip() + delim], [item["continuation"]], 0)


def chosen_indices(count: int, max_examples: int) -> list[int]:
    """All example indices, or a fixed random subset of `max_examples` of them (in file order)."""
    if not max_examples or max_examples >= count:
        return list(range(count))
    indices = list(range(count))
    random.Random(SUBSAMPLE_SEED).shuffle(indices)
    return sorted(indices[:max_examples])


# --- Tokenized into shards (02_sharding) -----------------------------------------------------------------
# The layout 04_core_eval reads (stackcore section 11): per task, one token sequence per (example, choice) in
# <label>.bin, one CORE_RECORD_FIELDS row per sequence in its records side file, and tasks.json listing them.

def continuation_starts(example: CoreExample, seqs: list[list[int]], context_lengths: list[int]) -> list[int]:
    """Where each choice's continuation begins, as nanochat finds it in token space: after the tokens all choices
    share (multiple choice), before the tokens all options share (schema), after the context alone (language
    modelling). Always at least one scored token, never the BOS."""
    if example.kind == MC:
        starts = [common_prefix_length(seqs)] * len(seqs)
    elif example.kind == SCHEMA:
        shared = common_prefix_length([s[::-1] for s in seqs])
        starts = [len(s) - shared for s in seqs]
    else:
        starts = context_lengths
    return [min(max(start, 1), len(s) - 1) for start, s in zip(starts, seqs)]


def tokenize_core_examples(tokenizer: Tokenizer, examples: Sequence[CoreExample]) -> list[list[tuple[list[int], int]]]:
    """Per example, per choice: (BOS + full text tokens, continuation start). Language-modelling texts are
    stripped of surrounding whitespace, so the context's trailing space joins the continuation's first token."""
    def full_texts(ex: CoreExample) -> list[str]:
        texts = [c + x for c, x in zip(ex.contexts, ex.continuations)]
        return [texts[0].strip()] if ex.kind == LM else texts

    fulls = tokenizer.encode_batch([t for ex in examples for t in full_texts(ex)], prepend_bos=True)
    lm_contexts = [ex.contexts[0].strip() for ex in examples if ex.kind == LM]
    context_lengths = iter(len(ids) for ids in tokenizer.encode_batch(lm_contexts, prepend_bos=True))
    result, position = [], 0
    for ex in examples:
        seqs = fulls[position:position + len(ex.contexts)]
        position += len(seqs)
        lengths = [next(context_lengths)] if ex.kind == LM else []
        result.append(list(zip(seqs, continuation_starts(ex, seqs, lengths))))
    return result


def write_core_shard(directory: Path, label: str, examples: Sequence[tuple[int, CoreExample]],
                     tokenizer: Tokenizer) -> Path:
    """Tokenize (example index, rendered example) pairs into `label`.bin and its records side file."""
    tokenized = tokenize_core_examples(tokenizer, [ex for _, ex in examples])
    sequences, records, offset = [], [], 0
    for (index, ex), choices in zip(examples, tokenized):
        for choice, (seq, start) in enumerate(choices):
            records.append((offset, offset + start, offset + len(seq), index, choice, int(choice == ex.gold)))
            sequences.append(np.asarray(seq, dtype=np.uint32))
            offset += len(seq)
    path = Path(directory) / f"{label}.bin"
    write_shard(path, np.concatenate(sequences), "tokens", tokenizer.vocab_size)
    table = np.asarray(records, dtype=np.int32).reshape(-1, len(CORE_RECORD_FIELDS))
    write_shard(side_file(path, "records"), table, "records")
    return path


def write_core_manifest(directory: Path, tasks: list[dict[str, Any]]) -> Path:
    """tasks.json: one {label, kind, baseline, examples} per task written, in CORE order."""
    path = Path(directory) / CORE_MANIFEST
    path.write_text(json.dumps(tasks, indent=1))
    return path


# --- A tiny synthetic bundle for offline runs ------------------------------------------------------------------

COLORS = ["red", "blue", "green", "black", "white", "yellow"]
THINGS = ["apple", "sky", "grass", "coal", "snow", "banana", "cherry", "sea", "leaf", "milk", "lemon", "night"]
THING_COLORS = dict(zip(THINGS, ["red", "blue", "green", "black", "white", "yellow",
                                 "red", "blue", "green", "white", "yellow", "black"]))


def synthetic_rows(kind: str, count: int, seed: int) -> list[dict]:
    """`count` small examples of one task type: colours of things, posed as a choice, a schema or a completion."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        thing = THINGS[i % len(THINGS)]
        color = THING_COLORS[thing]
        wrong = rng.sample([c for c in COLORS if c != color], 3)
        if kind == MC:
            gold = rng.randrange(4)
            rows.append({"query": f"Question: What colour is the {thing}?", "gold": gold,
                         "choices": wrong[:gold] + [color] + wrong[gold:]})
        elif kind == SCHEMA:
            gold = rng.randrange(2)
            options = [f"The {thing} is {wrong[0]}", f"The {thing} is {color}"]
            options = options if gold == 1 else options[::-1]
            rows.append({"context_options": options, "continuation": f"so it looks {color}.", "gold": gold})
        else:
            rows.append({"context": f"The colour of the {thing} is", "continuation": color})
    return rows


def write_synthetic_bundle(root: Path, examples_per_task: int = 16) -> Path:
    """Write every CORE task file, with `examples_per_task` generated examples each, under root/eval_data."""
    for number, task in enumerate(CORE_TASKS):
        path = Path(root) / "eval_data" / task.file
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = synthetic_rows(task.kind, examples_per_task, seed=number)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return Path(root)
