"""Supervised fine-tuning and chat evals: conversation shards with their masks, the packing SFT loader, letter
scoring, GSM8K answers on the real data, and the SFT / chat-eval adapters against a local Hub."""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hub import hub  # noqa: E402,F401  (the local Hub fixture)

import stackcore as sc  # noqa: E402
from data import chat_eval, gsm8k, sft  # noqa: E402
from data.sandbox import run_sandboxed  # noqa: E402
from notebooks.config import configure  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return sc.Tokenizer.load(tiny_tokenizer)


def conversations(count: int = 40) -> list[list[dict]]:
    return (sft.synthetic_conversations(count // 2, seed=1) + sft.identity_conversations(count // 4, seed=2)
            + sft.spelling_conversations(sft.load_words("builtin"), count - count // 2 - count // 4, seed=3))


def write_conversations(directory: Path, tokenizer, convs, split: str = "train", shard_tokens: int = 600):
    writer = sft.ConversationWriter(directory, split, shard_tokens, tokenizer.vocab_size, tokenizer.bos_id)
    rendered = [sc.render_conversation(tokenizer, c) for c in convs]
    for ids, mask in rendered:
        writer.add(ids, mask)
    writer.flush()
    return rendered, writer.written


# --- Conversation shards and the SFT loader ------------------------------------------------------------------

def test_conversation_shards_round_trip_with_their_masks(tmp_path, tokenizer):
    rendered, written = write_conversations(tmp_path, tokenizer, conversations())
    assert len(written) > 1  # several shards, each starting with BOS, none missing its mask
    assert sc.list_shards(tmp_path, "train") == [path for path, _, _ in written]
    ids = np.concatenate([sc.read_shard(p, tokenizer.vocab_size) for p, _, _ in written])
    masks = np.concatenate([sc.read_shard(sc.side_file(p, "mask")) for p, _, _ in written])
    assert ids.tolist() == [t for r, _ in rendered for t in r]
    assert masks.tolist() == [m for _, r in rendered for m in r] and masks.dtype == np.uint8
    assert all(sc.read_shard(p)[0] == tokenizer.bos_id for p, _, _ in written)
    writer = sft.ConversationWriter(tmp_path, "bad", 100, tokenizer.vocab_size, tokenizer.bos_id)
    with pytest.raises(ValueError, match="loss mask"):
        writer.add([tokenizer.bos_id, 5, 6], [0, 1])
    with pytest.raises(ValueError, match="bos"):
        writer.add([5, 6], [0, 1])


def test_parallel_rendering_keeps_order_and_masks(tiny_tokenizer, tokenizer):
    convs = conversations(12)
    serial = [sc.render_conversation(tokenizer, c, 64) for c in convs]
    for workers in (1, 2):
        got = [(ids.tolist(), mask.tolist())
               for ids, mask in sft.render_parallel(tiny_tokenizer, convs, 64, workers, batch_size=5)]
        assert got == [(list(ids), list(mask)) for ids, mask in serial]


def test_loader_packs_whole_conversations_once_per_epoch_without_padding(tmp_path, tokenizer):
    rendered, _ = write_conversations(tmp_path, tokenizer, conversations())
    loader = sc.SFTLoader(tmp_path, "train", tokens=256, bos_id=tokenizer.bos_id, vocab_size=tokenizer.vocab_size,
                          max_seq_len=256, seed=7)
    expected = sorted((tuple(ids[:-1]), tuple(t if m else -1 for t, m in zip(ids[1:], mask[1:])))
                      for ids, mask in rendered)
    seen = []
    while loader.position["epoch"] == 0:
        batch = loader.next_batch()
        bounds = batch.cu_seqlens.tolist()
        assert bounds[0] == 0 and bounds[-1] == len(batch.inputs) <= 256
        assert batch.max_seqlen == max(np.diff(bounds))
        for start, end in zip(bounds, bounds[1:]):
            assert batch.inputs[start] == tokenizer.bos_id  # whole conversations only
            seen.append((tuple(batch.inputs[start:end].tolist()), tuple(batch.targets[start:end].tolist())))
    assert sorted(seen) == expected  # every conversation exactly once, targets -1 where the mask is 0

    state = loader.state_dict()
    after = loader.next_batch()
    loader.load_state_dict(state)
    assert torch.equal(loader.next_batch().inputs, after.inputs)  # resumable
    first_epoch_order = loader.order(0).tolist()
    assert loader.order(1).tolist() != first_epoch_order  # reshuffled each epoch

    # two ranks taking one batch each see the rows one process takes in two calls, and share one position
    single = sc.SFTLoader(tmp_path, "train", 256, tokenizer.bos_id, tokenizer.vocab_size, 256, seed=7)
    ranks = [sc.SFTLoader(tmp_path, "train", 256, tokenizer.bos_id, tokenizer.vocab_size, 256, rank=r,
                          world_size=2, seed=7) for r in range(2)]
    for _ in range(3):
        for rank in ranks:
            assert torch.equal(rank.next_batch().inputs, single.next_batch().inputs)
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    with pytest.raises(ValueError, match="is less than the model.s context"):
        sc.SFTLoader(tmp_path, "train", 100, tokenizer.bos_id, tokenizer.vocab_size, 256)


def test_loader_cuts_long_conversations_and_checks_masks(tmp_path, tokenizer):
    long = [{"role": "user", "content": "spell " * 60}, {"role": "assistant", "content": "a-b-c " * 60}]
    write_conversations(tmp_path, tokenizer, [long])
    loader = sc.SFTLoader(tmp_path, "train", 64, tokenizer.bos_id, tokenizer.vocab_size, max_seq_len=64)
    assert len(loader.next_batch().inputs) == 64
    sc.write_shard(sc.side_file(tmp_path / "train_000000.bin", "mask"), np.zeros(3, np.uint8), "mask")
    with pytest.raises(sc.ShardError, match="mask values"):
        sc.SFTLoader(tmp_path, "train", 64, tokenizer.bos_id, tokenizer.vocab_size, 64)


def small_model(vocab_size: int) -> sc.GPT:
    torch.manual_seed(0)
    model = sc.GPT(sc.GPTConfig(vocab_size=vocab_size, depth=2, model_dim=64, head_dim=16, max_seq_len=256))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised projections would make every logit equal
    return model


def test_packed_losses_equal_one_conversation_at_a_time(tmp_path, tokenizer):
    rendered, _ = write_conversations(tmp_path, tokenizer, conversations(12))
    model = small_model(tokenizer.vocab_size)
    batch = sc.SFTLoader(tmp_path, "train", 512, tokenizer.bos_id, tokenizer.vocab_size, 256,
                         shuffle=False).next_batch()
    assert len(batch.cu_seqlens) > 3
    packed = model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets, loss_reduction="none")
    bounds = batch.cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        alone = model(batch.inputs[start:end], torch.tensor([0, end - start], dtype=torch.int32), end - start,
                      batch.targets[start:end], loss_reduction="none")
        torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-5)
    trained = batch.targets >= 0
    mean = model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets)
    torch.testing.assert_close(mean, packed[trained].mean())
    assert (packed[~trained] == 0).all()

    prompts = [ids[:n] for (ids, _), n in zip(rendered, (5, 9, 30, 2, 17, 11))]
    torch.testing.assert_close(chat_eval.last_token_logits(model, prompts, "sdpa", "cpu", pack_tokens=64),
                               chat_eval.last_token_logits(model, prompts, "sdpa", "cpu", pack_tokens=0),
                               rtol=1e-4, atol=1e-5)


# --- Letter scoring on a stub model ------------------------------------------------------------------------------

class PreferenceStub(nn.Module):
    """Logits that favour, for the i-th prompt it sees (counted over calls and packs), the token preferred[i], and
    always favour a token that is not an answer letter even more."""

    def __init__(self, vocab_size: int, preferred: list[int], distractor: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=512)
        self.preferred, self.distractor, self.seen = preferred, distractor, 0
        self.passes = 0

    def forward(self, input_ids, cu_seqlens, max_seqlen, target_ids=None, *, backend="sdpa", **_):
        self.passes += 1
        logits = torch.zeros(len(input_ids), self.config.vocab_size)
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            logits[start:end, self.preferred[self.seen]] = 5.0
            logits[start:end, self.distractor] = 9.0
            self.seen += 1
        return logits


def test_letter_scoring_takes_the_best_allowed_letter_of_each_packed_prompt(tokenizer):
    questions = sft.colour_questions(6, seed=0)
    letters = chat_eval.letter_ids(tokenizer, "ABCD")
    wanted = [0, 3, 1, 2, 2, 0]
    for pack_tokens in (0, 10_000):
        stub = PreferenceStub(tokenizer.vocab_size, [letters[w] for w in wanted], tokenizer.encode("Z")[0])
        assert chat_eval.choose_letters(stub, tokenizer, questions, "sdpa", "cpu", pack_tokens) == wanted
        assert stub.passes == (6 if pack_tokens == 0 else 1)

    golds = [q.gold for q in questions]
    answers = [golds[0], (golds[1] + 1) % 4, golds[2], golds[3], golds[4], golds[5]]  # one wrong in six
    stub = PreferenceStub(tokenizer.vocab_size, [letters[a] for a in answers], tokenizer.encode("Z")[0])
    task = chat_eval.ChatTask("colours", "choice", questions, baseline=0.25)
    result = chat_eval.evaluate_chat_task(stub, tokenizer, task, "sdpa", "cpu", pack_tokens=10_000)
    assert result["accuracy"] == pytest.approx(5 / 6) and result["examples"] == 6
    assert result["centered"] == pytest.approx((5 / 6 - 0.25) / 0.75)
    with pytest.raises(ValueError, match="one token"):
        chat_eval.letter_ids(tokenizer, ["AB"])


def test_chat_table_and_plot(tmp_path):
    before = {"tasks": {"arc_easy": {"accuracy": 0.25, "baseline": 0.25, "centered": 0.0},
                        "gsm8k": {"accuracy": 0.0, "baseline": 0.0, "centered": 0.0}}, "chatcore": 0.0}
    after = {"tasks": {"arc_easy": {"accuracy": 0.4, "baseline": 0.25, "centered": 0.2}}, "chatcore": 0.2}
    table = chat_eval.chat_table({"base": before, "sft": after})
    assert "arc_easy" in table and "0.400" in table and "ChatCORE" in table
    assert table.splitlines()[2].split() == ["gsm8k", "0.000", "-"]
    chat_eval.plot_chat_results({"base": before, "sft": after}).savefig(tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(real_data, sandbox_alone):
    problems = chat_eval.humaneval_problems(str(real_data / "humaneval" / "human_eval.jsonl"))
    assert len(problems) == 164
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: run_sandboxed(p.program(p.canonical_solution)), problems))
    assert [(p.task_id, r) for p, r in zip(problems, results) if not r.passed] == []
    by_id = {p.task_id: p for p in problems}
    for task_id in ("HumanEval/2", "HumanEval/10", "HumanEval/38"):  # 10 and 38 call helpers defined in the stub
        problem = by_id[task_id]
        function = problem.stub[problem.stub.index(f"def {problem.entry_point}("):] + problem.canonical_solution
        assert problem.check(f"Here you go:\n```python\n{function}```\nDone."), task_id  # whole function, fenced
    problem = by_id["HumanEval/2"]
    assert not problem.check("    return 0.123\n")
    assert not problems[3].check(problems[4].canonical_solution)


# --- GSM8K, spelling and the other conversation sources ----------------------------------------------------------

def test_gsm8k_final_answers_parse_on_every_line(real_data, tokenizer):
    count = 0
    for path in [real_data / "gsm8k" / f"{split}.jsonl" for split in gsm8k.SPLITS]:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            expected = record["answer"].rsplit("####", 1)[1].strip().replace(",", "")
            problem = gsm8k.check_record(record, str(path))
            assert problem.gold == gsm8k.normalise_number(expected)
            example = chat_eval.FinalAnswer(tuple(problem.prompt()), problem.gold)
            assert example.check(record["answer"]) and not example.check(record["answer"].rstrip() + "1")
            parts = problem.conversation()[-1]["content"]
            assert parts[-1]["type"] == "text" and "####" in parts[-1]["text"]
            count += 1
    assert count == 7473 + 1319
    ids, mask = sc.render_conversation(tokenizer, problem.conversation())
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)


def test_spelling_conversations_agree_with_the_calculator():
    words = sft.load_words("builtin")
    train, test = sft.word_split(words, "train"), sft.word_split(words, "test")
    assert train and test and not set(train) & set(test) and sorted(train + test) == words
    for question in sft.letter_counts(words, 50, seed=0):
        parts = question.conversation()[-1]["content"]
        python, output = parts[1], parts[2]
        assert python["type"] == "python" and sc.calculate(python["text"]) == output["text"] == question.gold
        assert chat_eval.FinalAnswer(tuple(question.prompt()), question.gold).check(parts[-1]["text"])
    spelled = sft.spelling_conversations(words, 10, seed=1)
    assert all(sc.chat_turns(c) for c in spelled)


def test_mixture_counts_repeats_and_subsets(tmp_path):
    for size, count in ((10, 25), (10, 4), (10, 0), (0, 5)):
        passes = sft.selection_passes(size, count, seed=0)
        assert sum(len(p) for p in passes) == (count if size else 0)
        assert all(list(p) == sorted(set(p)) for p in passes)
    assert list(sft.select(lambda: iter("abcdefghij"), 10, 13, seed=1))[:10] == list("abcdefghij")
    mix = configure(sft.SFTMixture, argv=[], environ={"STACK_PRESET": "tiny"})
    mix.sft_gsm8k, mix.sft_gsm8k_source = 5, "synthetic"
    counted: dict[str, int] = {}
    for source, conversation in sft.iter_mixture(mix):
        counted[source] = counted.get(source, 0) + 1
    assert counted == {k: v for k, v in mix.counts().items() if v}
    assert all(sc.chat_turns(c) for c in sft.identity_conversations(30, seed=0))


# --- Hub adapters against the local Hub --------------------------------------------------------------------------

def parquet_bytes(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def serve_sft_sources(root: Path) -> dict[str, list[dict]]:
    smol = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(9)]
    smol.append({"messages": [{"role": "assistant", "content": "out of order"}]})  # skipped by the mixture
    mmlu = [{"question": f"mmlu {i}?", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": i % 4}
            for i in range(6)]
    arc = [{"id": f"q{i}", "question": f"arc {i}?", "answerKey": "2" if i % 2 else "C",
            "choices": {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"] if i % 2 else list("ABCD")}}
           for i in range(4)]
    for i in range(4):
        parquet_bytes(root / sft.SMOLTALK.repo_id / sft.SMOLTALK.files["train"][i], smol[i * 3:(i + 1) * 3] or smol[:1])
    parquet_bytes(root / sft.MMLU.repo_id / sft.MMLU.files["auxiliary_train"][0], mmlu)
    parquet_bytes(root / sft.MMLU.repo_id / sft.MMLU.files["test"][0], mmlu[:4])
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for split in ("train", "test"):
            parquet_bytes(root / sft.ARC[subset].repo_id / sft.ARC[subset].files[split][0], arc)
    he = {"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
          "test": "def check(c):\n    assert c(2) == 2\n", "entry_point": "f"}
    parquet_bytes(root / chat_eval.HUMANEVAL.repo_id / chat_eval.HUMANEVAL.files["test"][0], [he])
    return {"smoltalk": smol, "mmlu": mmlu, "arc": arc}


def test_sft_and_chat_eval_adapters_download_from_the_hub(hub, tmp_path):
    served = serve_sft_sources(tmp_path / "hub")
    files = sft.table_files(sft.SMOLTALK, "train", endpoint=hub.url)
    assert [f.name for f in files] == [f"train-0000{i}-of-00004.parquet" for i in range(4)]
    assert hub.count("GET", f"/datasets/{sft.SMOLTALK.repo_id}/resolve/") == 4

    mix = sft.SFTMixture(sft_smoltalk=20, sft_mmlu=3, sft_gsm8k=2, sft_arc_easy=4, sft_arc_challenge=0,
                         sft_spelling=0, sft_identity=0, sft_gsm8k_source="synthetic")
    got: dict[str, list] = {}
    for source, conversation in sft.iter_mixture(mix, endpoint=hub.url):
        got.setdefault(source, []).append(conversation)
    assert len(got["smoltalk"]) == 20 - 2  # two passes over the 10 rows, without the malformed one
    assert got["smoltalk"][0] == served["smoltalk"][0]["messages"]
    assert len(got["mmlu"]) == 3 and len(got["gsm8k"]) == 2
    assert [c[-1]["content"] for c in got["arc_easy"]] == ["C", "B", "C", "B"]  # labels 1-4 become A-D
    assert "A. w" in got["arc_easy"][1][0]["content"]
    with pytest.raises(ValueError, match="no split"):
        sft.table_files(sft.SMOLTALK, "validation", endpoint=hub.url)

    cfg = chat_eval.ChatEvalConfig(chat_tasks="arc_challenge,mmlu,humaneval", chat_choice_examples=3)
    tasks = {t.name: t for t in chat_eval.load_chat_tasks(cfg, endpoint=hub.url)}
    assert tasks["mmlu"].kind == "choice" and len(tasks["mmlu"].examples) == 3
    assert tasks["mmlu"].baseline == pytest.approx(0.25)
    assert len(tasks["arc_challenge"].examples) == 3
    for question in tasks["arc_challenge"].examples:  # odd questions: labels 1-4, answer "2"; even: answer "C"
        assert question.gold == (1 if int(question.question.split()[1].rstrip("?")) % 2 else 2)
    (problem,) = tasks["humaneval"].examples
    assert problem.check(problem.canonical_solution)
    assert hub.unexpected == []


def test_local_mirrors_and_jsonl_folders(tmp_path):
    serve_sft_sources(tmp_path / "mirror")
    local = tmp_path / "mirror" / sft.MMLU.repo_id
    questions, size = sft.choice_questions("mmlu", "auxiliary_train", str(local))
    assert size == 6 and [q.gold for q in questions()] == [0, 1, 2, 3, 0, 1]
    jsonl = tmp_path / "own"
    jsonl.mkdir()
    (jsonl / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}) + "\n")
    paths = sft.table_files(sft.SMOLTALK, "train", str(jsonl))
    assert list(sft.rows(paths, sft.smoltalk_conversation))[0][1]["content"] == "hello"
    with pytest.raises(sft.SFTDataError, match="neither a mirror"):
        sft.table_files(sft.SMOLTALK, "test", str(jsonl))
