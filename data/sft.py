"""The supervised fine-tuning (SFT) mixture: nanochat's sources, each turned into conversations for
`stackcore.render_conversation`.

| source | what it teaches | public home |
| --- | --- | --- |
| SmolTalk | general chat, multi-turn | `HuggingFaceTB/smol-smoltalk` (parquet, `data/train-*`) |
| MMLU auxiliary train | answering a multiple-choice question with its letter | `cais/mmlu` (`all/auxiliary_train-*`) |
| GSM8K train | worked maths with calculator calls | `openai/gsm8k` (through `data/gsm8k.py`) |
| ARC-Easy / ARC-Challenge train | science multiple choice | `allenai/ai2_arc` (`ARC-Easy/train-*`, ...) |
| spelling | spelling words, counting letters with a python call | a word list (`dwyl/english-words` on GitHub) |
| identity | who the assistant is: a DecoderStack model | written here |
| synthetic | small generated chats for the offline `tiny` preset | generated here |

Hub datasets are parquet files fetched with `huggingface_hub.hf_hub_download`, or read from a local mirror of the
repo (the folder `hf download <repo> --repo-type dataset --local-dir <folder>` leaves). `SFTMixture` says how many
conversations each source gives; a count above a source's size repeats it (epochs), below it takes a seeded random
subset. 02_sharding renders the mixture (`render_parallel`) into conversation shards (`ConversationWriter`), which
`stackcore.SFTLoader` reads.
"""
from __future__ import annotations

import random
import re
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from data import gsm8k
from data.core import COLORS, THING_COLORS
from data.records import DataFileError, converted, count_records, field, read_records
from data.synthetic import synthetic_documents
from data.tokenizing import batched, map_with_tokenizer
from notebooks.config import StackConfig, above, at_least
from stackcore import (ShardWriter, Tokenizer, artifact_dir, chat_turns, render_conversation, side_file,
                       write_shard)

Conversation = list[dict]
T = TypeVar("T")
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
LETTERS = "ABCDEFGHIJ"


class SFTDataError(DataFileError):
    """A dataset file that is missing or has rows of the wrong shape; the message names the file."""


# --- Hub tables -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubTable:
    """A dataset repo on the Hub and the parquet files of each split."""
    repo_id: str
    files: dict[str, tuple[str, ...]]


def _split_files(folder: str, splits: dict[str, int]) -> dict[str, tuple[str, ...]]:
    """{split: shard count} into the Hub's file names `folder/split-00000-of-0000N.parquet`."""
    return {split: tuple(f"{folder}/{split}-{i:05d}-of-{n:05d}.parquet" for i in range(n))
            for split, n in splits.items()}


SMOLTALK = HubTable("HuggingFaceTB/smol-smoltalk", _split_files("data", {"train": 4, "test": 1}))
MMLU = HubTable("cais/mmlu", _split_files("all", {"auxiliary_train": 1, "validation": 1, "test": 1}))
ARC = {subset: HubTable("allenai/ai2_arc", _split_files(subset, {"train": 1, "validation": 1, "test": 1}))
       for subset in ("ARC-Easy", "ARC-Challenge")}


def table_files(table: HubTable, split: str, local_dir: str = "", endpoint: str | None = None) -> list[Path]:
    """The files of one split: from `local_dir` (a mirror of the repo, or a folder holding `<split>.jsonl`) if given,
    else downloaded once into STACK_HOME/downloads/<repo>."""
    if split not in table.files:
        raise ValueError(f"{table.repo_id} has no split {split!r}; valid: {', '.join(table.files)}")
    if local_dir:
        root = Path(local_dir).expanduser()
        mirrored = [root / name for name in table.files[split]]
        if all(path.is_file() for path in mirrored):
            return mirrored
        if (root / f"{split}.jsonl").is_file():
            return [root / f"{split}.jsonl"]
        raise SFTDataError(f"{root}: neither a mirror of {table.repo_id} ({table.files[split][0]}, ...) nor "
                           f"a {split}.jsonl file")
    from huggingface_hub import hf_hub_download

    dest = artifact_dir("downloads") / table.repo_id.replace("/", "__")
    return [Path(hf_hub_download(table.repo_id, name, repo_type="dataset", local_dir=dest, endpoint=endpoint))
            for name in table.files[split]]


def rows(paths: Sequence[Path], convert: Callable[[dict], T]) -> Iterator[T]:
    """convert(row) for every row of the files, a bad row or file named with its place (data/records.py)."""
    return converted(read_records(paths, SFTDataError), convert, SFTDataError)


def selection_passes(size: int, count: int, seed: int) -> list[np.ndarray]:
    """Which rows to take, as sorted index arrays, one per pass over the source: count // size full passes, then a
    seeded random subset of count % size rows."""
    if size <= 0:
        return []
    full, rest = divmod(count, size)
    partial = np.sort(np.random.default_rng(seed).choice(size, rest, replace=False))
    return [np.arange(size)] * full + ([partial] if rest else [])


def select(rows: Callable[[], Iterator], size: int, count: int, seed: int) -> Iterator:
    """`count` items of a source of `size` items that `rows()` streams in order (see selection_passes)."""
    for chosen in selection_passes(size, count, seed):
        wanted = iter(chosen.tolist())
        target = next(wanted, None)
        for index, row in enumerate(rows()):
            if index == target:
                yield row
                target = next(wanted, None)
            if target is None:
                break


# --- Multiple choice: MMLU, ARC and a synthetic colour quiz ------------------------------------------------------

@dataclass(frozen=True)
class ChoiceQuestion:
    """A multiple-choice question answered with one letter; also a chat eval example (letter scoring)."""
    question: str
    choices: tuple[str, ...]
    letters: tuple[str, ...]
    gold: int  # index of the right choice

    def prompt(self) -> Conversation:
        lines = [self.question, "", *(f"{letter}. {choice}" for letter, choice in zip(self.letters, self.choices)),
                 "", f"Answer with the letter of the right choice ({', '.join(self.letters)})."]
        return [{"role": "user", "content": "\n".join(lines)}]

    def conversation(self) -> Conversation:
        return [*self.prompt(), {"role": "assistant", "content": self.letters[self.gold]}]


def choice_question(question: str, choices: Sequence, gold: int) -> ChoiceQuestion:
    """A question whose choices are strings and whose answer is an index into them (IndexError otherwise)."""
    if not choices or not all(isinstance(choice, str) for choice in choices) or len(choices) > len(LETTERS):
        raise ValueError(f"choices must be 1 to {len(LETTERS)} strings, got {choices!r}")
    if not 0 <= gold < len(choices):
        raise IndexError(f"answer {gold} is not an index into the {len(choices)} choices")
    return ChoiceQuestion(question, tuple(choices), tuple(LETTERS[:len(choices)]), gold)


def mmlu_question(row: dict) -> ChoiceQuestion:
    """An MMLU row: question, subject, choices (4 strings), answer (index)."""
    return choice_question(field(row, "question"), field(row, "choices", list), field(row, "answer", int))


def arc_question(row: dict) -> ChoiceQuestion:
    """An ARC row: question, choices {text, label}, answerKey. A few questions label their choices 1-4; they are
    relabelled A-D so that every answer is a letter."""
    choices = field(row, "choices", dict)
    texts, labels = field(choices, "text", list), field(choices, "label", list)
    if field(row, "answerKey") not in labels:
        raise ValueError(f"ARC question {row.get('id')}: answer {row['answerKey']!r} not among {labels}")
    return choice_question(field(row, "question"), texts, labels.index(row["answerKey"]))


def colour_questions(count: int, seed: int) -> list[ChoiceQuestion]:
    """'What colour is the snow?' with four colours: the facts the synthetic corpus and CORE bundle use."""
    rng = random.Random(seed)
    questions = []
    for _ in range(count):
        thing = rng.choice(sorted(THING_COLORS))
        choices = [THING_COLORS[thing], *rng.sample([c for c in COLORS if c != THING_COLORS[thing]], 3)]
        rng.shuffle(choices)
        questions.append(ChoiceQuestion(f"What colour is the {thing}?", tuple(choices), tuple(LETTERS[:4]),
                                        choices.index(THING_COLORS[thing])))
    return questions


def choice_questions(name: str, split: str, local_dir: str = "", endpoint: str | None = None
                     ) -> tuple[Callable[[], Iterator[ChoiceQuestion]], int]:
    """A streaming reader of `name` ("mmlu", "arc_easy" or "arc_challenge") and its size."""
    table = MMLU if name == "mmlu" else ARC["ARC-Easy" if name == "arc_easy" else "ARC-Challenge"]
    convert = mmlu_question if name == "mmlu" else arc_question
    paths = table_files(table, split, local_dir, endpoint)
    return (lambda: rows(paths, convert)), count_records(paths, SFTDataError)


# --- SmolTalk ---------------------------------------------------------------------------------------------------

def smoltalk_conversation(row: dict) -> Conversation:
    """A SmolTalk row's `messages` (role, content), optional system message first."""
    return [{"role": field(m, "role"), "content": field(m, "content")} for m in field(row, "messages", list)]


# --- Spelling ---------------------------------------------------------------------------------------------------

def load_words(source: str) -> list[str]:
    """Lower-case alphabetic words of 3 to 15 letters, deduplicated, sorted. `source`: a file with one word a line,
    "builtin" (the words of the synthetic corpus, offline), or "" (download the dwyl/english-words list once)."""
    if source == "builtin":
        text = " ".join(synthetic_documents(300, seed=5))
    else:
        path = Path(source).expanduser() if source else artifact_dir("downloads") / "words_alpha.txt"
        if not source and not path.is_file():
            urllib.request.urlretrieve(WORDS_URL, path.with_name(path.name + ".tmp"))
            path.with_name(path.name + ".tmp").replace(path)
        if not path.is_file():
            raise SFTDataError(f"{path}: word list not found")
        text = path.read_text(encoding="utf-8", errors="ignore")
    return sorted({w for w in re.findall(r"[A-Za-z]+", text) if w.islower() and 3 <= len(w) <= 15})


def word_split(words: Sequence[str], split: str) -> list[str]:
    """A fixed tenth of the words (by a hash of the word) is kept for evaluation ("test"); the rest is "train"."""
    return [w for w in words if (zlib.crc32(w.encode()) % 10 == 0) == (split == "test")]


@dataclass(frozen=True)
class LetterCount:
    """'How many r are in strawberry?': the model spells the word, counts with a python call, ends with `#### N`."""
    word: str
    letter: str

    @property
    def gold(self) -> str:
        return str(self.word.count(self.letter))

    def prompt(self) -> Conversation:
        return [{"role": "user", "content": f"How many times does the letter '{self.letter}' appear in "
                                            f"the word '{self.word}'?"}]

    def conversation(self) -> Conversation:
        n = self.word.count(self.letter)
        spelled = ",".join(self.word)
        answer = [{"type": "text", "text": f"Spelled out, '{self.word}' is {spelled}. Counting '{self.letter}': "},
                  {"type": "python", "text": f"'{self.word}'.count('{self.letter}')"},
                  {"type": "python_output", "text": str(n)},
                  {"type": "text", "text": f"\nThe letter '{self.letter}' appears {n} time{'s' * (n != 1)}.\n"
                                           f"#### {n}"}]
        return [*self.prompt(), {"role": "assistant", "content": answer}]


def letter_counts(words: Sequence[str], count: int, seed: int) -> list[LetterCount]:
    """`count` questions on random words; the letter is in the word two times out of three."""
    rng = random.Random(seed)
    questions = []
    for _ in range(count):
        word = rng.choice(words)
        letter = rng.choice(word) if rng.random() < 2 / 3 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        questions.append(LetterCount(word, letter))
    return questions


def spell_conversation(word: str, rng: random.Random) -> Conversation:
    asks = [f"Spell the word '{word}' letter by letter.", f"How do you spell {word}?",
            f"Can you spell '{word}' for me, one letter at a time?"]
    return [{"role": "user", "content": rng.choice(asks)},
            {"role": "assistant", "content": f"{word}: {'-'.join(word)}"}]


def spelling_conversations(words: Sequence[str], count: int, seed: int) -> list[Conversation]:
    """Half 'spell X', half letter counting with a python call (as nanochat's spelling tasks)."""
    rng = random.Random(seed)
    counts = iter(letter_counts(words, count, seed + 1))
    return [spell_conversation(rng.choice(words), rng) if i % 2 else next(counts).conversation()
            for i in range(count)]


# --- Identity and synthetic chats -------------------------------------------------------------------------------

IDENTITY = [
    ("Who are you?", "I am a small chat model trained with DecoderStack, an open course that builds a chat LLM from "
                     "scratch on a single GPU: tokenizer, pretraining, fine-tuning and reinforcement learning."),
    ("What is your name?", "I don't have a name of my own. I'm a DecoderStack model: whoever ran the DecoderStack "
                           "notebooks trained me, so you could say I'm their model."),
    ("Who made you?", "The person who ran the DecoderStack notebooks trained me. DecoderStack itself joins ideas from "
                      "modded-nanogpt (fast pretraining) and nanochat (the full chat pipeline)."),
    ("Are you ChatGPT?", "No. I'm a much smaller model, trained with DecoderStack on one GPU in a few hours. I can "
                         "chat, do some arithmetic with a calculator tool and answer simple questions, but I make "
                         "mistakes often, so please double-check what I say."),
    ("How were you trained?", "In four stages: a byte-level BPE tokenizer was trained first, then I was pretrained "
                              "on web text to predict the next token, then fine-tuned on conversations like this one, "
                              "and finally trained with reinforcement learning on grade-school maths problems."),
    ("How big are you?", "Small: tens to a few hundred million parameters, depending on the depth chosen when I was "
                         "trained. That is thousands of times smaller than the largest chat models."),
    ("Can you use tools?", "Yes, one: a calculator. I write an expression between python tokens, the engine evaluates "
                           "it safely and gives me the result, and I continue from there."),
    ("What languages do you speak?", "Mostly English: almost all of my training text was English. I may understand a "
                                     "little of other languages, but I'm not reliable in them."),
    ("What is DecoderStack?", "DecoderStack is a course of notebooks that trains a chat LLM end to end on a single "
                              "GPU, from the tokenizer to pretraining, supervised fine-tuning, reinforcement learning "
                              "and a chat interface, with one shared Python module behind them."),
    ("Do you have feelings?", "No. I'm a language model: I predict text one token at a time. I can talk about "
                              "feelings, but I don't have any."),
    ("Can you browse the internet?", "No. I only know what was in my training data, and I have no access to the "
                                     "internet or to anything that happened after I was trained."),
    ("hi", "Hello! I'm a small DecoderStack chat model. How can I help you?"),
]


def identity_conversations(count: int, seed: int) -> list[Conversation]:
    """`count` conversations drawn from IDENTITY; one in three has a greeting turn before the question."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        question, answer = rng.choice(IDENTITY)
        turns = [("Hello!", "Hi! What would you like to know?")] if rng.random() < 1 / 3 else []
        conversations.append([m for q, a in [*turns, (question, answer)]
                              for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})])
    return conversations


def synthetic_conversations(count: int, seed: int) -> list[Conversation]:
    """Offline chats for the tiny preset: sums with a calculator call, colour questions, repeating a sentence."""
    rng = random.Random(seed)
    colours = iter(colour_questions(count, seed))
    sentences = iter(" ".join(doc.split(". ")[:1]) for doc in synthetic_documents(count, seed=seed + 100))
    conversations = []
    for i in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if i % 3 == 0:
            answer = [{"type": "text", "text": f"{a} plus {b} is "}, {"type": "python", "text": f"{a}+{b}"},
                      {"type": "python_output", "text": str(a + b)}, {"type": "text", "text": f"{a + b}.\n#### {a + b}"}]
            conversations.append([{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": answer}])
        elif i % 3 == 1:
            conversations.append(next(colours).conversation())
        else:
            sentence = next(sentences)
            conversations.append([{"role": "user", "content": f"Repeat after me: {sentence}"},
                                  {"role": "assistant", "content": sentence}])
    return conversations


# --- The mixture ------------------------------------------------------------------------------------------------

SFT_SOURCES = ("smoltalk", "mmlu", "gsm8k", "arc_easy", "arc_challenge", "spelling", "identity", "synthetic")


@dataclass
class SFTMixture(StackConfig):
    """Conversations per source (a count above the source's size repeats it). The defaults follow nanochat: all of
    SmolTalk (about 460K conversations), MMLU auxiliary_train (99,842 questions) three times, GSM8K train (7,473
    problems) four times, plus ARC train (2,251 easy, 1,119 challenge) once, 80K spelling and 1K identity chats."""
    sft_smoltalk: int = 460_000
    sft_mmlu: int = 300_000
    sft_gsm8k: int = 30_000
    sft_arc_easy: int = 2_251
    sft_arc_challenge: int = 1_119
    sft_spelling: int = 80_000
    sft_identity: int = 1_000
    sft_synthetic: int = 0  # generated chats (offline), the tiny preset's main source
    sft_val: int = 2_000  # conversations held out of the mixture for the validation loss
    sft_local_dir: str = ""  # a folder of local copies: <dir>/<source>/ (a repo mirror or <split>.jsonl), else the Hub
    sft_gsm8k_source: str = "hub"  # data/gsm8k.py's source: hub | synthetic | a folder of train.jsonl / test.jsonl
    sft_words: str = ""  # word list for spelling: a file, "builtin" (offline), or "" (download words_alpha.txt)
    sft_max_tokens: int = 2048  # conversations are cut to this many tokens
    sft_seed: int = 0
    PRESETS = {
        "tiny": dict(sft_smoltalk=0, sft_mmlu=0, sft_gsm8k=96, sft_arc_easy=0, sft_arc_challenge=0, sft_spelling=300,
                     sft_identity=60, sft_synthetic=900, sft_val=64, sft_words="builtin", sft_max_tokens=256,
                     sft_gsm8k_source="synthetic"),
        "colab": dict(sft_smoltalk=100_000, sft_mmlu=100_000, sft_gsm8k=15_000, sft_spelling=20_000,
                      sft_identity=500, sft_max_tokens=1024),
    }
    LIMITS = {**{name: at_least(0) for name in ("sft_smoltalk", "sft_mmlu", "sft_gsm8k", "sft_arc_easy",
                                                "sft_arc_challenge", "sft_spelling", "sft_identity", "sft_synthetic",
                                                "sft_seed")},
              "sft_val": above(0), "sft_max_tokens": above(0)}

    def counts(self) -> dict[str, int]:
        return {source: getattr(self, f"sft_{source}") for source in SFT_SOURCES}

    def local(self, source: str) -> str:
        return str(Path(self.sft_local_dir).expanduser() / source) if self.sft_local_dir else ""


def source_conversations(mix: SFTMixture, source: str, endpoint: str | None = None) -> Iterator[Conversation]:
    """The `mix.counts()[source]` training conversations of one source, streamed."""
    count, seed = mix.counts()[source], mix.sft_seed + SFT_SOURCES.index(source)
    if count == 0:
        return iter(())
    if source == "smoltalk":
        paths = table_files(SMOLTALK, "train", mix.local(source), endpoint)
        return select(lambda: rows(paths, smoltalk_conversation), count_records(paths, SFTDataError), count, seed)
    if source in ("mmlu", "arc_easy", "arc_challenge"):
        questions, size = choice_questions(source, "auxiliary_train" if source == "mmlu" else "train",
                                           mix.local(source), endpoint)
        return (q.conversation() for q in select(questions, size, count, seed))
    if source == "gsm8k":
        problems = gsm8k.load_problems("train", mix.sft_gsm8k_source, endpoint)
        return (p.conversation() for p in select(lambda: iter(problems), len(problems), count, seed))
    if source == "spelling":
        return iter(spelling_conversations(word_split(load_words(mix.sft_words), "train"), count, seed))
    if source == "identity":
        return iter(identity_conversations(count, seed))
    return iter(synthetic_conversations(count, seed))


def iter_mixture(mix: SFTMixture, endpoint: str | None = None) -> Iterator[tuple[str, Conversation]]:
    """(source, conversation) for every source in SFT_SOURCES order. Conversations the chat format cannot express
    (roles out of order, say) are skipped; 05_sft's loader shuffles, so the order here does not matter."""
    for source in SFT_SOURCES:
        for conversation in source_conversations(mix, source, endpoint):
            try:
                chat_turns(conversation)
            except ValueError:
                continue
            yield source, conversation


def _render_batch(tokenizer: Tokenizer, job: tuple[list[Conversation], int | None]
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    conversations, max_tokens = job
    return [tuple(np.asarray(x, dtype=np.uint32) for x in render_conversation(tokenizer, c, max_tokens))
            for c in conversations]


def render_parallel(tokenizer_dir: Path, conversations: Iterable[Conversation], max_tokens: int | None,
                    workers: int, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of every conversation, in input order, rendered by `workers` processes: how 02_sharding turns
    the mixture into conversation shards."""
    batches = ((batch, max_tokens) for batch in batched(conversations, batch_size))
    return map_with_tokenizer(tokenizer_dir, _render_batch, batches, workers)


# --- Conversation shards (read by stackcore.SFTLoader) --------------------------------------------------------------

class ConversationWriter(ShardWriter):
    """A ShardWriter for rendered conversations: add(ids, mask); each shard's mask goes to its side file, written
    before the token shard so that a listed shard always has its mask."""

    def __init__(self, directory: Path, prefix: str, shard_tokens: int, vocab_size: int, bos_id: int):
        super().__init__(directory, prefix, shard_tokens, vocab_size)
        self.bos_id = bos_id
        self.pending_masks: list[np.ndarray] = []

    def add(self, doc: Sequence[int], mask: Sequence[int] | None = None) -> None:
        if mask is None or len(mask) != len(doc) or not len(doc) or doc[0] != self.bos_id:
            raise ValueError("a conversation needs a loss mask of its length and must start with <|bos|>")
        super().add(doc)  # may flush the shard before this conversation
        self.pending_masks.append(np.asarray(mask, dtype=np.uint8))

    def flush(self) -> None:
        if self.pending:
            write_shard(side_file(self.next_path(), "mask"), np.concatenate(self.pending_masks), "mask")
            self.pending_masks = []
        super().flush()
