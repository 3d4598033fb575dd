"""Hostile input to the dataset adapters (data/*.py): bad lines, missing keys, nulls, answers out of range, empty
files, truncated archives; and a damaged tokenizer folder (01_tokenizer's). Each case is refused with an error that
names the file, and the line where there is one; none ends in a bare JSONDecodeError, KeyError, IndexError,
ZeroDivisionError or EOFError."""
from __future__ import annotations

import gzip
import json
import lzma
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stackcore as sc
from data import chat_eval, core, gsm8k, pretrain, sft
from data.records import DataFileError, read_records

GOOD_TEXT = json.dumps({"text": "a document"})


def write_jsonl(path, lines, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def truncated(path, opener, lines=200):
    """A compressed jsonl file cut in the middle."""
    write_jsonl(path, [json.dumps({"text": f"document {i} " * 20}) for i in range(lines)], opener)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def refused(call, match, error=DataFileError):
    with pytest.raises(error, match=match) as caught:
        call()
    return caught.value


# --- The shared reader ------------------------------------------------------------------------------------------

READER = {
    "bad JSON": (lambda p: write_jsonl(p / "x.jsonl", [GOOD_TEXT, '{"text": "a']), r"x.jsonl:2: not valid JSON"),
    "trailing comma": (lambda p: write_jsonl(p / "x.jsonl", ['{"text": "a",}']), r"x.jsonl:1: not valid JSON"),
    "NaN word": (lambda p: write_jsonl(p / "x.jsonl", [GOOD_TEXT, GOOD_TEXT, "nope"]), r"x.jsonl:3: not valid JSON"),
    "empty file": (lambda p: write_jsonl(p / "x.jsonl", []), r"x.jsonl: empty file: no records"),
    "blank lines only": (lambda p: write_jsonl(p / "x.jsonl", ["", "  ", ""]), r"x.jsonl: empty file"),
    "empty .gz": (lambda p: write_jsonl(p / "x.jsonl.gz", [], gzip.open), r"x.jsonl.gz: empty file"),
    "truncated .gz": (lambda p: truncated(p / "x.jsonl.gz", gzip.open), r"x.jsonl.gz: unreadable after \d+ records"),
    "truncated .xz": (lambda p: truncated(p / "x.jsonl.xz", lzma.open), r"x.jsonl.xz: unreadable after \d+ records"),
    "not gzip": (lambda p: write_jsonl(p / "x.jsonl.gz", [GOOD_TEXT]), r"x.jsonl.gz: unreadable after 0 records"),
    "not xz": (lambda p: write_jsonl(p / "x.jsonl.xz", [GOOD_TEXT]), r"x.jsonl.xz: unreadable after 0 records"),
    "bad UTF-8": (lambda p: (p / "x.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n') and p / "x.jsonl",
                  r"x.jsonl: unreadable after 0 records"),
    "missing file": (lambda p: p / "nowhere.jsonl", r"nowhere.jsonl: no such file"),
    "folder": (lambda p: p, r"no such file"),
    "not parquet": (lambda p: write_jsonl(p / "x.parquet", [GOOD_TEXT]), r"x.parquet: not a readable parquet file"),
    "truncated parquet": (lambda p: (pq.write_table(pa.table({"text": ["a"] * 100}), p / "x.parquet"),
                                     (p / "x.parquet").write_bytes((p / "x.parquet").read_bytes()[:200]))
                          and p / "x.parquet", r"x.parquet: not a readable parquet file"),
}


@pytest.mark.parametrize("make,message", READER.values(), ids=READER.keys())
def test_reader_names_file_and_line(tmp_path, make, message):
    path = make(tmp_path)
    refused(lambda: list(read_records([path])), message)


def test_reader_gives_places_and_records(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl.xz", [GOOD_TEXT, "", json.dumps([1])], lzma.open)
    assert list(read_records([path])) == [(f"{path}:1", {"text": "a document"}), (f"{path}:3", [1])]
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "y.parquet")
    assert [where for where, _ in read_records([tmp_path / "y.parquet"])] == [f"{tmp_path}/y.parquet: row {i}"
                                                                              for i in (0, 1)]


# --- Pretraining documents ----------------------------------------------------------------------------------------

DOCUMENTS = [
    ("no text key", [GOOD_TEXT, json.dumps({"body": "x"})], r"x.jsonl:2: no field 'text' in this record"),
    ("null text", [GOOD_TEXT, json.dumps({"text": None})], r"x.jsonl:2: field 'text' is NoneType, expected str"),
    ("number text", [json.dumps({"text": 5})], r"x.jsonl:1: field 'text' is int, expected str"),
    ("list text", [json.dumps({"text": ["a"]})], r"x.jsonl:1: field 'text' is list, expected str"),
    ("a list line", [json.dumps(["text"])], r"x.jsonl:1: expected a JSON object, got list"),
    ("a string line", [json.dumps("text")], r"x.jsonl:1: expected a JSON object, got str"),
    ("null line", ["null"], r"x.jsonl:1: expected a JSON object, got NoneType"),
    ("bad line", [GOOD_TEXT, "{"], r"x.jsonl:2: not valid JSON"),
]


@pytest.mark.parametrize("name,lines,message", DOCUMENTS, ids=[case[0] for case in DOCUMENTS])
def test_pretraining_jsonl(tmp_path, name, lines, message):
    path = write_jsonl(tmp_path / "x.jsonl", lines)
    refused(lambda: list(pretrain.read_documents(path)), message)


@pytest.mark.parametrize("opener,suffix", [(gzip.open, ".jsonl.gz"), (lzma.open, ".jsonl.xz")])
def test_pretraining_archives(tmp_path, opener, suffix):
    good = write_jsonl(tmp_path / f"good{suffix}", [GOOD_TEXT] * 3, opener)
    assert list(pretrain.read_documents(good)) == ["a document"] * 3
    bad = truncated(tmp_path / f"bad{suffix}", opener)
    refused(lambda: list(pretrain.read_documents(bad)), rf"bad{re.escape(suffix)}: unreadable after \d+ records, "
                                                        r"truncated or damaged")


@pytest.mark.parametrize("table,message", [
    (pa.table({"text": ["a", None]}), r"x.parquet: row 1: field 'text' is NoneType"),
    (pa.table({"body": ["a"]}), r"x.parquet: no column\(s\) text \(it has body\)"),
    (pa.table({"text": [1, 2]}), r"x.parquet: row 0: field 'text' is int"),
], ids=["null text", "no text column", "numbers"])
def test_pretraining_parquet(tmp_path, table, message):
    pq.write_table(table, tmp_path / "x.parquet")
    refused(lambda: list(pretrain.read_documents(tmp_path / "x.parquet")), message)


def test_pretraining_text_files(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"caf\xe9")
    refused(lambda: list(pretrain.read_documents(tmp_path / "x.txt")), r"x.txt: not readable as UTF-8 text")
    (tmp_path / "x.csv").write_text("a,b")
    refused(lambda: list(pretrain.read_documents(tmp_path / "x.csv")), r"x.csv: unsupported file type", ValueError)


# --- HumanEval ------------------------------------------------------------------------------------------------------

PROBLEM = {"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
           "test": "def check(f):\n    assert f(1) == 1\n", "entry_point": "f"}


@pytest.mark.parametrize("change,message", [
    ({"test": None}, r"human_eval.jsonl:2: field 'test' is NoneType, expected str"),
    ({"prompt": 3}, r"human_eval.jsonl:2: field 'prompt' is int"),
    ({"entry_point": ["f"]}, r"human_eval.jsonl:2: field 'entry_point' is list"),
    ({"task_id": None}, r"human_eval.jsonl:2: field 'task_id' is NoneType"),
], ids=["null test", "number prompt", "list entry point", "null id"])
def test_humaneval_bad_fields(tmp_path, change, message):
    write_jsonl(tmp_path / "human_eval.jsonl", [json.dumps(PROBLEM), json.dumps({**PROBLEM, **change})])
    refused(lambda: chat_eval.humaneval_problems(str(tmp_path)), message)


@pytest.mark.parametrize("missing", ["task_id", "prompt", "test", "entry_point"])
def test_humaneval_missing_keys(tmp_path, missing):
    row = {key: value for key, value in PROBLEM.items() if key != missing}
    write_jsonl(tmp_path / "human_eval.jsonl", [json.dumps(row)])
    refused(lambda: chat_eval.humaneval_problems(str(tmp_path)), rf"human_eval.jsonl:1: no field '{missing}'")


@pytest.mark.parametrize("lines,message", [([], "empty file"), (["{"], ":1: not valid JSON"), (["[]"], ":1: expected")])
def test_humaneval_bad_files(tmp_path, lines, message):
    write_jsonl(tmp_path / "human_eval.jsonl", lines)
    refused(lambda: chat_eval.humaneval_problems(str(tmp_path)), message)


def test_humaneval_null_solution_is_an_empty_one(tmp_path):
    write_jsonl(tmp_path / "human_eval.jsonl", [json.dumps({**PROBLEM, "canonical_solution": None})])
    assert chat_eval.humaneval_problems(str(tmp_path))[0].canonical_solution == ""


# --- MMLU, ARC and SmolTalk -----------------------------------------------------------------------------------------

MMLU = {"question": "2 + 2?", "subject": "maths", "choices": ["3", "4", "5", "6"], "answer": 1}


def mmlu_questions(folder, row):
    write_jsonl(folder / "test.jsonl", [json.dumps(MMLU), json.dumps(row)])
    questions, _ = sft.choice_questions("mmlu", "test", str(folder))
    return list(questions())


@pytest.mark.parametrize("change,message", [
    ({"answer": 4}, r"test.jsonl:2: answer 4 is not an index into the 4 choices"),
    ({"answer": -1}, r"test.jsonl:2: answer -1 is not an index into the 4 choices"),
    ({"answer": 99}, r"answer 99 is not an index"),
    ({"answer": "1"}, r"test.jsonl:2: field 'answer' is str, expected int"),
    ({"answer": 1.0}, r"test.jsonl:2: field 'answer' is float"),
    ({"answer": True}, r"test.jsonl:2: field 'answer' is bool"),
    ({"answer": None}, r"test.jsonl:2: field 'answer' is NoneType"),
    ({"choices": None}, r"test.jsonl:2: field 'choices' is NoneType, expected list"),
    ({"choices": []}, r"test.jsonl:2: choices must be 1 to 10 strings"),
    ({"choices": [1, 2, 3, 4]}, r"test.jsonl:2: choices must be 1 to 10 strings"),
    ({"choices": ["x"] * 11, "answer": 0}, r"test.jsonl:2: choices must be 1 to 10 strings"),
    ({"question": None}, r"test.jsonl:2: field 'question' is NoneType"),
], ids=["answer 4", "answer -1", "answer 99", "answer text", "answer float", "answer bool", "answer null",
        "choices null", "no choices", "number choices", "eleven choices", "null question"])
def test_mmlu_bad_rows(tmp_path, change, message):
    refused(lambda: mmlu_questions(tmp_path, {**MMLU, **change}), message, sft.SFTDataError)


@pytest.mark.parametrize("missing", ["question", "choices", "answer"])
def test_mmlu_missing_keys(tmp_path, missing):
    row = {key: value for key, value in MMLU.items() if key != missing}
    refused(lambda: mmlu_questions(tmp_path, row), rf"test.jsonl:2: no field '{missing}'", sft.SFTDataError)


@pytest.mark.parametrize("lines,message", [([], "test.jsonl: empty file"), (["{"], "test.jsonl:1: not valid JSON")])
def test_mmlu_bad_files(tmp_path, lines, message):
    write_jsonl(tmp_path / "test.jsonl", lines)
    refused(lambda: sft.choice_questions("mmlu", "test", str(tmp_path)), message, sft.SFTDataError)


ARC = {"id": "q1", "question": "Sky?", "choices": {"text": ["blue", "green"], "label": ["A", "B"]}, "answerKey": "A"}


@pytest.mark.parametrize("change,message", [
    ({"answerKey": "E"}, r"test.jsonl:1: ARC question q1: answer 'E' not among \['A', 'B'\]"),
    ({"answerKey": None}, r"test.jsonl:1: field 'answerKey' is NoneType"),
    ({"choices": {"text": ["blue"]}}, r"test.jsonl:1: no field 'label'"),
    ({"choices": None}, r"test.jsonl:1: field 'choices' is NoneType, expected dict"),
    ({"choices": {"text": None, "label": ["A"]}}, r"test.jsonl:1: field 'text' is NoneType, expected list"),
], ids=["answer E", "answer null", "no labels", "choices null", "texts null"])
def test_arc_bad_rows(tmp_path, change, message):
    write_jsonl(tmp_path / "test.jsonl", [json.dumps({**ARC, **change})])
    questions, _ = sft.choice_questions("arc_easy", "test", str(tmp_path))
    refused(lambda: list(questions()), message, sft.SFTDataError)


@pytest.mark.parametrize("row,message", [
    ({}, r"train.jsonl:1: no field 'messages'"),
    ({"messages": None}, r"train.jsonl:1: field 'messages' is NoneType, expected list"),
    ({"messages": [{"role": "user"}]}, r"train.jsonl:1: no field 'content'"),
    ({"messages": [{"role": "user", "content": None}]}, r"train.jsonl:1: field 'content' is NoneType"),
    ({"messages": ["hello"]}, r"train.jsonl:1: expected a JSON object, got str"),
], ids=["no messages", "null messages", "no content", "null content", "string message"])
def test_smoltalk_bad_rows(tmp_path, row, message):
    write_jsonl(tmp_path / "train.jsonl", [json.dumps(row)])
    paths = sft.table_files(sft.SMOLTALK, "train", str(tmp_path))
    refused(lambda: list(sft.rows(paths, sft.smoltalk_conversation)), message, sft.SFTDataError)


def test_sft_mixture_counts_a_bad_file_with_its_name(tmp_path):
    (tmp_path / "smoltalk").mkdir()
    truncated(tmp_path / "smoltalk" / "train.jsonl", open)
    mix = sft.SFTMixture(sft_smoltalk=2, sft_local_dir=str(tmp_path))
    refused(lambda: list(sft.source_conversations(mix, "smoltalk")), r"train.jsonl:\d+: not valid JSON",
            sft.SFTDataError)


# --- GSM8K ----------------------------------------------------------------------------------------------------------

GSM = {"question": "1 + 1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}


@pytest.mark.parametrize("line,message", [
    (json.dumps({"question": None, "answer": GSM["answer"]}), r"test.jsonl:2: expected an object with string fields"),
    (json.dumps({"question": "q"}), r"test.jsonl:2: expected an object with string fields"),
    (json.dumps({**GSM, "answer": 2}), r"test.jsonl:2: expected an object with string fields"),
    (json.dumps({**GSM, "answer": "two"}), r"test.jsonl:2: the answer has no '#### N' final answer"),
    (json.dumps([GSM]), r"test.jsonl:2: expected an object"),
    ('{"question": ', r"test.jsonl:2: not valid JSON"),
], ids=["null question", "no answer", "number answer", "no final answer", "list line", "bad JSON"])
def test_gsm8k_bad_lines(tmp_path, line, message):
    write_jsonl(tmp_path / "test.jsonl", [json.dumps(GSM), line])
    refused(lambda: gsm8k.load_problems("test", str(tmp_path)), message, gsm8k.GsmDataError)


def test_gsm8k_empty_and_missing_files(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [])
    refused(lambda: gsm8k.load_problems("test", str(tmp_path)), r"test.jsonl: empty file", gsm8k.GsmDataError)
    refused(lambda: gsm8k.load_problems("train", str(tmp_path)), r"train.jsonl: no such GSM8K file",
            gsm8k.GsmDataError)


@pytest.mark.parametrize("source", ["synthetc", "Hub", "", "{tmp}/test.jsonl"])
def test_gsm8k_source_that_is_no_choice_and_no_folder_says_what_it_may_be(tmp_path, monkeypatch, source):
    """A misspelt source, or an empty one (which would read test.jsonl from the working folder)."""
    write_jsonl(tmp_path / "test.jsonl", [json.dumps(GSM)])
    monkeypatch.chdir(tmp_path)
    source = source.format(tmp=tmp_path)
    refused(lambda: gsm8k.load_problems("test", source), rf"GSM8K source {re.escape(repr(source))} is not hub, "
            r"synthetic or a folder holding test.jsonl", gsm8k.GsmDataError)


def test_gsm8k_parquet_with_nulls(tmp_path):
    pq.write_table(pa.table({"question": ["q", None], "answer": [GSM["answer"]] * 2}), tmp_path / "x.parquet")
    refused(lambda: gsm8k.read_problems(tmp_path / "x.parquet"), r"x.parquet: row 1: expected an object",
            gsm8k.GsmDataError)


# --- CORE -------------------------------------------------------------------------------------------------------------

def core_file(root, task, rows):
    path = root / "eval_data" / task.file
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, [row if isinstance(row, str) else json.dumps(row) for row in rows])
    return path


MC_ROW = {"query": "q", "choices": ["a", "b"], "gold": 0}


@pytest.mark.parametrize("count", [0, 1, 5, 10])
def test_core_task_with_fewer_examples_than_its_shots(tmp_path, count):
    task = core.TASKS_BY_LABEL["arc_easy"]  # 10 shots
    core_file(tmp_path, task, [MC_ROW] * count)
    message = "empty file" if count == 0 else rf"{count} example\(s\), but arc_easy draws 10 few-shot examples " \
                                              r"from the others: it needs at least 11"
    refused(lambda: core.load_examples(tmp_path, task), message, core.CoreDataError)


def test_core_task_with_just_enough_examples_renders(tmp_path):
    task = core.TASKS_BY_LABEL["arc_easy"]
    core_file(tmp_path, task, [MC_ROW] * 11)
    examples = core.load_examples(tmp_path, task)
    assert core.render_example(task, examples, 10).continuations == ["a", "b"]


@pytest.mark.parametrize("label,row,message", [
    ("copa", {**MC_ROW, "query": None}, r"query is NoneType"),
    ("copa", {**MC_ROW, "gold": True}, r"gold is bool"),
    ("copa", {**MC_ROW, "gold": "0"}, r"gold is str"),
    ("copa", {**MC_ROW, "gold": -1}, r"gold -1 is not an index into the 2 options"),
    ("copa", {**MC_ROW, "choices": None}, r"choices is NoneType"),
    ("copa", {**MC_ROW, "choices": []}, r"gold 0 is not an index into the 0 options"),
    ("winograd", {"context_options": ["a", None], "continuation": "c", "gold": 0}, r"context options must be strings"),
    ("winograd", {"context_options": ["a", "b"], "continuation": None, "gold": 0}, r"continuation is NoneType"),
    ("winograd", {"context_options": "ab", "continuation": "c", "gold": 0}, r"context_options is str"),
    ("lambada_openai", {"context": None, "continuation": "c"}, r"context is NoneType"),
    ("lambada_openai", {"context": "c"}, r"lacks field\(s\) continuation"),
    ("lambada_openai", "null", r"expected a JSON object, got NoneType"),
], ids=["null query", "bool gold", "text gold", "negative gold", "null choices", "no choices", "null option",
        "null continuation", "options text", "null context", "no continuation", "null line"])
def test_core_bad_rows_name_file_and_line(tmp_path, label, row, message):
    task = core.TASKS_BY_LABEL[label]
    good = {"copa": MC_ROW, "winograd": {"context_options": ["a", "b"], "continuation": "c", "gold": 1},
            "lambada_openai": {"context": "c", "continuation": "d"}}[label]
    path = core_file(tmp_path, task, [good, row])
    error = refused(lambda: core.load_examples(tmp_path, task), message, core.CoreDataError)
    assert str(error).startswith(f"{path}:2: ")


def keep_lines(path, count):
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:count]))


def replace_meta(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# (damage to a copy of a good tokenizer folder, the file that must be named, what the message says)
TOKENIZER_DAMAGE = [
    ("rank lines cut short", lambda d: keep_lines(d / sc.TOKENIZER_RANKS, 300), sc.TOKENIZER_RANKS,
     "a cut rank file"),
    ("ranks file empty", lambda d: (d / sc.TOKENIZER_RANKS).write_text(""), sc.TOKENIZER_RANKS, "0 read"),
    ("rank line cut mid-token", lambda d: (d / sc.TOKENIZER_RANKS).write_bytes(
        (d / sc.TOKENIZER_RANKS).read_bytes()[:-7]), sc.TOKENIZER_RANKS, "is not '<base64 token> <rank>'"),
    ("a rank missing", lambda d: (d / sc.TOKENIZER_RANKS).write_text(
        "".join(line for line in (d / sc.TOKENIZER_RANKS).read_text().splitlines(keepends=True)
                if not line.endswith(" 100\n"))), sc.TOKENIZER_RANKS, "one per distinct token"),
    ("a rank twice", lambda d: (d / sc.TOKENIZER_RANKS).write_text(
        (d / sc.TOKENIZER_RANKS).read_text() + "QUJDREVG 5\n"), sc.TOKENIZER_RANKS, "one per distinct token"),
    ("ranks file is a folder", lambda d: ((d / sc.TOKENIZER_RANKS).unlink(), (d / sc.TOKENIZER_RANKS).mkdir()),
     sc.TOKENIZER_RANKS, "IsADirectoryError"),
    ("meta not JSON", lambda d: (d / sc.TOKENIZER_META).write_text("{"), sc.TOKENIZER_META, "JSONDecodeError"),
    ("meta a list", lambda d: (d / sc.TOKENIZER_META).write_text("[]"), sc.TOKENIZER_META, "TypeError"),
    ("meta without pattern", lambda d: (d / sc.TOKENIZER_META).write_text(json.dumps({"name": "x"})),
     sc.TOKENIZER_META, "KeyError: 'pattern'"),
    ("pattern not a regex", lambda d: replace_meta(d / sc.TOKENIZER_META, pattern="(("), sc.TOKENIZER_META,
     "parenthesis"),
    ("pattern a number", lambda d: replace_meta(d / sc.TOKENIZER_META, pattern=5), sc.TOKENIZER_META, "TypeError"),
    ("meta without special tokens", lambda d: (d / sc.TOKENIZER_META).write_text(
        json.dumps({k: v for k, v in json.loads((d / sc.TOKENIZER_META).read_text()).items()
                    if k != "special_tokens"})), sc.TOKENIZER_META, "its special tokens are not"),
]


@pytest.mark.parametrize("name, damage, file, message", TOKENIZER_DAMAGE, ids=[case[0] for case in TOKENIZER_DAMAGE])
def test_damaged_tokenizer_names_the_file(tiny_tokenizer, tmp_path, name, damage, file, message):
    """tiktoken checks a rank table in Rust, where a failed check is a panic (a BaseException, so no `except
    Exception` catches it): Tokenizer.load checks first and names the file."""
    import shutil

    folder = shutil.copytree(tiny_tokenizer, tmp_path / "tokenizer")
    damage(folder)
    with pytest.raises(ValueError) as error:
        sc.Tokenizer.load(folder)
    assert str(folder / file) in str(error.value) and message in str(error.value), error.value
