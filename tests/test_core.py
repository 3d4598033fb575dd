"""CORE evaluation: the task table and adapters (data/core.py), the eval shards and the scoring (stackcore 12)."""
import csv
import json
import random
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import stackcore as sc
from data import core
from notebooks.core_eval import core_input_tokens, first_examples, first_pack

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # CPU scoring

REAL_COUNTS = {  # examples per task in the shared copy (hellaswag, squad and coqa are absent there)
    "jeopardy": 2117, "bigbench_qa_wikidata": 20321, "arc_easy": 2376, "arc_challenge": 1172, "copa": 100,
    "commonsense_qa": 1221, "piqa": 1838, "openbook_qa": 500, "lambada_openai": 5153, "winograd": 273,
    "winogrande": 1267, "bigbench_dyck_languages": 1000, "agi_eval_lsat_ar": 230, "bigbench_cs_algorithms": 1320,
    "bigbench_operators": 210, "bigbench_repeat_copy_logic": 32, "boolq": 3270,
    "bigbench_language_identification": 10000,
}


# --- scoring with a stub model whose predictions we choose ----------------------------------------------------

class BigramStub(nn.Module):
    """Logits depend only on the current token: next[t] is the one likely successor of t."""

    def __init__(self, successors: dict[int, int], vocab: int = 16):
        super().__init__()
        self.config = sc.GPTConfig(vocab_size=vocab, depth=2, model_dim=64, head_dim=32, max_seq_len=64)
        table = torch.zeros(vocab, vocab)
        for token, successor in successors.items():
            table[token, successor] = 10.0
        self.register_buffer("table", table)

    def forward(self, input_ids, cu_seqlens, max_seqlen, target_ids=None, *, backend="sdpa", logit_rows=None,
                **kwargs):
        return self.table[input_ids if logit_rows is None else input_ids[logit_rows]]

    def layer_windows(self):
        return [None] * self.config.depth


def shard_of(kind: str, examples: list[tuple[int, list[tuple[list[int], int]]]], baseline: float = 0.0):
    """A CoreShard from hand-made (gold, [(sequence, continuation start), ...]) examples."""
    tokens, records = [], []
    for index, (gold, choices) in enumerate(examples):
        for choice, (seq, start) in enumerate(choices):
            offset = len(tokens)
            records.append((offset, offset + start, offset + len(seq), index, choice, int(choice == gold)))
            tokens.extend(seq)
    return sc.CoreShard("hand", kind, baseline, np.asarray(tokens, dtype=np.uint16),
                        np.asarray(records, dtype=np.int32))


STUB = BigramStub({2: 4, 4: 3, 6: 7})  # after 2 comes 4, after 4 comes 3, after 6 comes 7


@pytest.mark.parametrize("pack_tokens", [0, 5, 1000])
def test_multiple_choice_picks_the_lowest_mean_loss(pack_tokens):
    shard = shard_of("multiple_choice", [
        (1, [([0, 1, 2, 3], 3), ([0, 1, 2, 4], 3)]),  # the model prefers 4: right
        (0, [([0, 1, 2, 3], 3), ([0, 1, 2, 4], 3)]),  # the same, but gold is 3: wrong
        (2, [([0, 1, 2, 5, 5], 3), ([0, 1, 2, 3], 3), ([0, 1, 2, 4, 3], 3)]),  # 4 then 3: lowest mean loss
    ], baseline=0.25)
    scores = sc.score_core_records(STUB, shard.tokens, shard.records, "sdpa", "cpu", pack_tokens)
    assert sc.core_correct("multiple_choice", shard.records, scores).tolist() == [True, False, True]
    result = sc.evaluate_core_task(STUB, shard, "sdpa", "cpu", pack_tokens)
    assert result["accuracy"] == pytest.approx(2 / 3) and result["examples"] == 3
    assert result["centered"] == pytest.approx((2 / 3 - 0.25) / 0.75)


def test_schema_scores_the_shared_continuation_after_each_context():
    shard = shard_of("schema", [
        (1, [([0, 1, 5, 7], 3), ([0, 1, 6, 7], 3)]),  # only context 6 makes 7 likely
        (0, [([0, 1, 5, 7], 3), ([0, 1, 6, 7], 3)]),
    ])
    scores = sc.score_core_records(STUB, shard.tokens, shard.records, "sdpa", "cpu", 100)
    assert sc.core_correct("schema", shard.records, scores).tolist() == [True, False]


def test_language_modelling_needs_every_greedy_token():
    shard = shard_of("language_modeling", [
        (0, [([0, 1, 2, 4, 3], 3)]),  # greedy: 2 -> 4 -> 3, exact
        (0, [([0, 1, 2, 4, 5], 3)]),  # the last token differs
        (0, [([0, 6, 7], 2)]),
    ])
    scores = sc.score_core_records(STUB, shard.tokens, shard.records, "sdpa", "cpu", 100)
    assert sc.core_correct("language_modeling", shard.records, scores).tolist() == [True, False, True]


def test_core_is_the_mean_centred_accuracy():
    shards = [shard_of("language_modeling", [(0, [([0, 6, 7], 2)]), (0, [([0, 6, 5], 2)])]),
              shard_of("schema", [(1, [([0, 1, 5, 7], 3), ([0, 1, 6, 7], 3)])], baseline=0.5)]
    shards[1].label = "other"
    results = sc.evaluate_core(STUB, shards, "sdpa", "cpu", 64)
    assert results["tasks"]["hand"]["centered"] == pytest.approx(0.5)
    assert results["tasks"]["other"]["centered"] == pytest.approx(1.0)
    assert results["core"] == pytest.approx(0.75)


def test_long_sequences_are_cut_from_the_left():
    tokens = np.arange(100) % 16
    [[(seq, start)]] = sc.core_examples(tokens, np.array([[10, 90, 100, 0, 0, 1]]), max_seq_len=64)
    assert len(seq) == 64 and seq[-1] == tokens[99] and seq[start] == tokens[90]


def test_long_examples_lose_one_context_cut_for_every_choice():
    # two choices share the context 0..89; the longer is 6 tokens over, so both lose the same 6 context tokens
    # (nanochat would cut the shorter one by 2 only). A context cut away entirely still leaves one token before
    # the continuation.
    tokens = np.arange(200) % 16
    records = np.array([[0, 90, 100, 0, 0, 1], [100, 190, 196, 0, 1, 0], [0, 3, 100, 1, 0, 1]])
    [first, second], [(seq, start)] = sc.core_examples(tokens, records, max_seq_len=94)
    assert [len(s) for s, _ in (first, second)] == [94, 90] and first[1] == second[1] == 84
    assert first[0][0] == tokens[6] and second[0][0] == tokens[106]
    assert len(seq) == 94 and start == 1 and seq[0] == tokens[6]


# --- the real tiny GPT: packed scoring equals one prompt at a time -------------------------------------------

@pytest.fixture
def synthetic_shards(tiny_tokenizer, tmp_path):
    tokenizer = sc.Tokenizer.load(tiny_tokenizer)
    bundle = core.write_synthetic_bundle(tmp_path / "bundle", examples_per_task=12)
    manifest = []
    for task in core.CORE_TASKS:
        examples = core.load_examples(bundle, task)
        chosen = core.chosen_indices(len(examples), 6)
        core.write_core_shard(tmp_path / "core", task.label, [(i, core.render_example(task, examples, i))
                                                           for i in chosen], tokenizer)
        manifest.append({"label": task.label, "kind": task.kind, "baseline": task.baseline, "examples": 6})
    core.write_core_manifest(tmp_path / "core", manifest)
    return tokenizer, sc.read_core_shards(tmp_path / "core", tokenizer.vocab_size)


def random_gpt(**config):
    torch.manual_seed(0)
    model = sc.GPT(sc.GPTConfig(**{"depth": 2, "model_dim": 64, "head_dim": 32, **config}))
    with torch.no_grad():  # the zero-initialised projections would make every prediction uniform
        for param in (model.lm_head.weight, *(b.attn.c_proj.weight for b in model.blocks)):
            param.normal_(std=0.3)
    return model.eval()


def test_packed_scoring_equals_one_prompt_at_a_time(synthetic_shards):
    tokenizer, shards = synthetic_shards
    model = random_gpt(vocab_size=tokenizer.vocab_size, max_seq_len=512)
    assert len(shards) == 22
    for shard in shards:
        reference = sc.score_core_records(model, shard.tokens, shard.records, "sdpa", "cpu", 0)
        packed = sc.score_core_records(model, shard.tokens, shard.records, "sdpa", "cpu", 700)
        assert reference[:, 0].std() > 0, "the model should not be uniform"
        np.testing.assert_allclose(packed, reference, rtol=1e-4, atol=1e-4, err_msg=shard.label)
        assert (sc.core_correct(shard.kind, shard.records, packed)
                == sc.core_correct(shard.kind, shard.records, reference)).all()


def hand_shards(rng):
    """Random tokens in the three layouts: a shared context with 4 continuations (two of them starting alike),
    option contexts after a shared few-shot part with one continuation, single sequences. The last example of each
    is longer than max_seq_len 64."""
    def tokens(n):
        return rng.integers(1, 64, n).tolist()

    mc, schema, lm = [], [], []
    for context_len in (20, 33, 90):
        context, first = tokens(context_len), tokens(1)
        continuations = [first + tokens(2), first + tokens(4), tokens(1), tokens(6)]
        mc.append((1, [(context + c, context_len) for c in continuations]))
        shots, continuation = tokens(context_len - 5), tokens(5)
        options = [shots + tokens(n) for n in (3, 6)]
        schema.append((0, [(o + continuation, len(o)) for o in options]))
        lm.append((0, [(context + continuation, context_len)]))
    return [shard_of("multiple_choice", mc), shard_of("schema", schema), shard_of("language_modeling", lm)]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])  # the mask_mod evaluated densely per example, or FlexAttention
@pytest.mark.parametrize("pack_tokens", [1, 150, 1000])  # 1: each example alone; 1000: one pass per task
def test_shared_prefix_scores_equal_one_sequence_at_a_time(pack_tokens, backend):
    model = random_gpt(vocab_size=64, depth=4, max_seq_len=64, short_window=16)
    assert model.layer_windows() == [16, 16, 16, None]  # sequences run past the sliding window
    for shard in hand_shards(np.random.default_rng(0)):
        reference = sc.score_core_records(model, shard.tokens, shard.records, "sdpa", "cpu", 0)
        shared = sc.score_core_records(model, shard.tokens, shard.records, backend, "cpu", pack_tokens)
        assert reference[:, 0].std() > 0, "the model should not be uniform"
        np.testing.assert_allclose(shared[:, 0], reference[:, 0], rtol=1e-4, atol=1e-4, err_msg=shard.kind)
        assert (shared[:, 1] == reference[:, 1]).all(), shard.kind


def test_compiled_layers_score_like_eager_and_compile_once_per_layout():
    # every pass (one example each) brings new prefix-tree masks, BlockMasks over new tensors: the compiled blocks
    # must take them as inputs, not recompile per pass. aot_eager: dynamo's tracing and guards, no C++ compiler
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    torch._dynamo.reset()
    model = random_gpt(vocab_size=64, depth=4, max_seq_len=64, short_window=16)
    compiled = random_gpt(vocab_size=64, depth=4, max_seq_len=64, short_window=16).compile_layers("aot_eager", evaluation=True)
    entries = []
    for shard in hand_shards(np.random.default_rng(0)) * 2:
        reference = sc.score_core_records(model, shard.tokens, shard.records, "sdpa", "cpu", 0)
        scores = sc.score_core_records(compiled, shard.tokens, shard.records, "flex", "cpu", 40)
        np.testing.assert_allclose(scores[:, 0], reference[:, 0], rtol=1e-4, atol=1e-4, err_msg=shard.kind)
        assert (scores[:, 1] == reference[:, 1]).all(), shard.kind
        entries.append(len(_debug_get_cache_entry_list(sc.GPT.run_layers.__code__)))
    # one graph for passes with branches, one for plain documents (language modelling); nothing more after that
    assert entries == [1, 1, 2, 2, 2, 2], entries


def test_inductor_options_reach_the_evaluation_graph(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compiled.append((function, kwargs)) or function)
    sc._compiled_layer_stack.cache_clear()
    model = random_gpt(vocab_size=64, max_seq_len=64)
    model.compile_layers(evaluation=True, inductor_options={"max_autotune": True})
    with torch.no_grad():
        model(torch.randint(0, 64, (20,)), backend="flex")
    sc._compiled_layer_stack.cache_clear()
    assert [kwargs for function, kwargs in compiled if function is sc.GPT.run_layers] == [
        dict(dynamic=True, backend="inductor", options={"max_autotune": True})]
    with pytest.raises(ValueError, match="need the inductor compile backend, not 'aot_eager'"):
        model.compile_layers("aot_eager", inductor_options={"max_autotune": True})
    with pytest.raises(ValueError, match="must be hashable"):
        model.compile_layers(inductor_options={"max_autotune": [True]})


def test_only_passes_with_branches_are_padded(monkeypatch):
    # flex passes keep one shape (padded to whole pack_tokens); plain documents go to varlen/flash unpadded
    lengths = []
    real = sc._score_pack
    monkeypatch.setattr(sc, "_score_pack", lambda model, pack, *args: lengths.append(len(pack.inputs))
                        or real(model, pack, *args))
    model = random_gpt(vocab_size=64, depth=2, max_seq_len=64)
    for shard in hand_shards(np.random.default_rng(0)):
        lengths.clear()
        sc.score_core_records(model, shard.tokens, shard.records, "flex", "cpu", 40)
        fed = core_input_tokens(shard, 64, 40)
        if shard.kind == "language_modeling":
            assert sum(lengths) == fed, lengths
        else:
            assert all(n % 128 == 0 for n in lengths) and sum(lengths) > fed, lengths


def test_packs_share_each_context_once():
    mc, schema, lm = hand_shards(np.random.default_rng(0))
    fed = {shard.kind: (core_input_tokens(shard, 64, 0), core_input_tokens(shard, 64, 100))
           for shard in (mc, schema, lm)}
    assert fed["language_modeling"][0] == fed["language_modeling"][1]
    # multiple choice: the 4 choices of a context run it once (the third context is cut from 90 tokens to 58)
    one_by_one, packed = fed["multiple_choice"]
    assert one_by_one - packed == 3 * (20 + 33 + 58)
    examples = list(sc.core_examples(mc.tokens, mc.records, 64))
    pack = sc.pack_core_examples(examples[:2], pad_to=128)
    assert len(pack.inputs) == 128 and pack.choices == 8 and pack.documents.max() == 2  # 2 is the padding
    assert (pack.branches[:20] == 0).all() and (pack.positions[:21] == np.arange(21)).all()
    assert (pack.targets == np.concatenate([seq[start:] for choices in examples[:2] for seq, start in choices])).all()


def test_logit_rows_keep_rows_of_the_full_logits():
    model = random_gpt(vocab_size=64, max_seq_len=64)
    inputs = torch.randint(0, 64, (40,))
    cu_seqlens = torch.tensor([0, 25, 40], dtype=torch.int32)
    rows = torch.tensor([3, 0, 24, 25, 39])
    with torch.no_grad():
        full = model(inputs, cu_seqlens, 25)
        torch.testing.assert_close(model(inputs, cu_seqlens, 25, logit_rows=rows), full[rows])


def test_records_point_at_the_continuation_tokens(synthetic_shards):
    tokenizer, shards = synthetic_shards
    by_label = {shard.label: shard for shard in shards}
    for label, expected in (("copa", "choices"), ("winograd", "continuation"), ("jeopardy", "continuation")):
        shard = by_label[label]
        for record in shard.records:
            seq_start, cont_start, seq_end = record[:3]
            assert shard.tokens[seq_start] == tokenizer.bos_id
            text = tokenizer.decode(shard.tokens[cont_start:seq_end])
            assert text.startswith(" ") and not text.startswith("  "), (label, text)
    copa = by_label["copa"].records
    for example in set(copa[:, 3]):
        rows = copa[copa[:, 3] == example]
        assert rows[:, 4].tolist() == [0, 1, 2, 3] and rows[:, 5].sum() == 1


# --- rendering ------------------------------------------------------------------------------------------------

def test_fewshot_rendering_matches_the_documented_form():
    task = core.CoreTask("demo", "x/demo.jsonl", "multiple_choice", 2, "\nAnswer: ", 0.5)
    examples = [{"query": f"Q{i}?", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(4)]
    shots = random.Random(1234 + 3).sample([0, 1, 2], 2)
    rendered = core.render_example(task, examples, 3)
    prefix = "".join(f"Q{s}?\nAnswer: {examples[s]['choices'][s % 2]}\n\n" for s in shots)
    assert rendered.contexts == [prefix + "Q3?\nAnswer: "] * 2
    assert rendered.continuations == ["a3", "b3"] and rendered.gold == 1
    assert core.fewshot_indices(3, 4, 2) == shots and 3 not in shots


def test_schema_and_language_modelling_rendering():
    schema = core.CoreTask("s", "x/s.jsonl", "schema", 1, " ", 0.5)
    rows = [{"context_options": ["A did", "B did"], "continuation": "it.", "gold": 1},
            {"context_options": ["C did", "D did"], "continuation": "that.", "gold": 0}]
    rendered = core.render_example(schema, rows, 0)
    assert rendered.contexts == ["C did that.\n\nA did ", "C did that.\n\nB did "]
    assert rendered.continuations == ["it.", "it."] and rendered.gold == 1
    lm = core.CoreTask("l", "x/l.jsonl", "language_modeling", 1, "\nAnswer: ", 0.0)
    rows = [{"context": " 2+2 = ", "continuation": "4"}, {"context": "3+3 =\n", "continuation": "6"}]
    rendered = core.render_example(lm, rows, 1)
    assert rendered.contexts == ["2+2 =\nAnswer: 4\n\n3+3 =\nAnswer: "] and rendered.continuations == ["6"]


def test_capped_selection_is_fixed_and_in_order():
    assert core.chosen_indices(5, 0) == [0, 1, 2, 3, 4]
    picked = core.chosen_indices(100, 10)
    assert picked == core.chosen_indices(100, 10) == sorted(picked) and len(set(picked)) == 10


# --- bad files --------------------------------------------------------------------------------------------------

def write_task_file(root, task, lines):
    path = root / "eval_data" / task.file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": ["a", "b"]}', "lacks field(s) gold"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "not an index"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 0', "not valid JSON"),
    ('["q"]', "expected a JSON object"),
])
def test_bad_task_files_name_the_file_and_line(tmp_path, line, message):
    task = core.TASKS_BY_LABEL["copa"]
    good = '{"query": "q", "choices": ["a", "b"], "gold": 0}'
    path = write_task_file(tmp_path, task, [good, line])
    with pytest.raises(core.CoreDataError, match=re.escape(message)) as error:
        core.load_examples(tmp_path, task)
    assert f"{path}:2" in str(error.value)


def test_unknown_task_type_and_missing_files_are_clear(tmp_path):
    task = core.CoreTask("odd", "x/odd.jsonl", "generation", 0, " ", 0.0)
    write_task_file(tmp_path, task, ['{"context": "c", "continuation": "d"}'])
    with pytest.raises(core.CoreDataError, match="odd.jsonl: unknown task type 'generation'"):
        core.load_examples(tmp_path, task)
    with pytest.raises(core.CoreDataError, match="not a CORE bundle"):
        core.find_bundle(str(tmp_path / "nowhere"))
    with pytest.raises(core.CoreDataError, match="copa.jsonl: no such file"):
        core.load_examples(tmp_path / "nowhere", core.TASKS_BY_LABEL["copa"])


def test_missing_tasks_are_skipped_with_a_note(tmp_path, capsys):
    write_task_file(tmp_path, core.TASKS_BY_LABEL["copa"], ['{"query": "q", "choices": ["a"], "gold": 0}'])
    assert [t.label for t in core.available_tasks(tmp_path)] == ["copa"]
    assert "squad skipped" in capsys.readouterr().out


def test_tiny_preset_bundle_is_generated_offline(stack_home):
    bundle = core.find_bundle("", synthetic=True)
    assert bundle.is_relative_to(stack_home)
    assert [t.label for t in core.available_tasks(bundle)] == [t.label for t in core.CORE_TASKS]


# --- the real bundle layout -------------------------------------------------------------------------------------

def test_task_table_has_the_22_core_tasks():
    assert len(core.CORE_TASKS) == 22 and len(core.TASKS_BY_LABEL) == 22
    assert all(t.kind in core.TASK_KINDS and 0 <= t.baseline < 1 for t in core.CORE_TASKS)


def test_adapters_read_the_real_bundle(real_data):
    bundle = real_data / "core"
    tasks = core.available_tasks(core.find_bundle(str(bundle)))
    counts = {task.label: len(core.load_examples(bundle, task)) for task in tasks}
    assert counts == REAL_COUNTS and sum(counts.values()) == 52_400
    for task in tasks:  # every example renders
        examples = core.load_examples(bundle, task)
        assert core.render_example(task, examples, len(examples) - 1).contexts


def test_task_table_agrees_with_the_dclm_files(real_data):
    with open(real_data / "core" / "eval_meta_data.csv") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
    yaml = pytest.importorskip("yaml")
    config = {t["label"]: t for t in yaml.safe_load((real_data / "core" / "dclm_heavy.yaml").read_text())["icl_tasks"]}
    for task in core.CORE_TASKS:
        entry = config[task.label]
        assert task.baseline == pytest.approx(baselines[task.label]), task.label
        assert entry["dataset_uri"].endswith(task.file) and entry["icl_task_type"] == task.kind, task.label
        assert entry["num_fewshot"] == [task.shots], task.label
        assert entry.get("continuation_delimiter", " ") == task.delimiter, task.label


def test_real_examples_tokenize_into_shards(real_data, tiny_tokenizer, tmp_path):
    tokenizer = sc.Tokenizer.load(tiny_tokenizer)
    for label in ("arc_easy", "winogrande", "lambada_openai"):
        task = core.TASKS_BY_LABEL[label]
        examples = core.load_examples(real_data / "core", task)
        chosen = core.chosen_indices(len(examples), 5)
        path = core.write_core_shard(tmp_path, label, [(i, core.render_example(task, examples, i)) for i in chosen],
                                   tokenizer)
        records = sc.read_shard(sc.side_file(path, "records"))
        assert records.shape[1] == len(sc.CORE_RECORD_FIELDS) and sorted(set(records[:, 3])) == chosen
        assert (records[:, 1] > records[:, 0]).all() and (records[:, 2] > records[:, 1]).all()
        assert records[:, 5].sum() == len(chosen)


# --- distributed: each rank a slice, counts summed ---------------------------------------------------------------

def _rank_worker(rank, world_size, init_file, shard, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    queue.put(sc.evaluate_core_task(STUB, shard, "sdpa", "cpu", 50))
    torch.distributed.destroy_process_group()


def test_distributed_counts_match_one_process(tmp_path):
    shard = shard_of("language_modeling", [(0, [([0, 6, 7 if i % 3 else 5], 2)]) for i in range(7)])
    single = sc.evaluate_core_task(STUB, shard, "sdpa", "cpu", 50)
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    torch.multiprocessing.start_processes(_rank_worker, args=(2, tmp_path / "init", shard, queue), nprocs=2,
                                          start_method="spawn")
    results = [queue.get(timeout=60) for _ in range(2)]
    assert results[0] == results[1] == single and single["examples"] == 7
    assert json.dumps(single)


def test_first_examples_keeps_whole_examples():
    records = np.array([[0, 1, 2, e, c, int(c == 0)] for e in (4, 4, 7, 7, 7, 9) for c in range(1)], dtype=np.int32)
    records[:, 4] = [0, 1, 0, 1, 2, 0]
    shard = sc.CoreShard("t", "multiple_choice", 0.25, np.zeros(3, dtype=np.int64), records)
    assert first_examples(shard, 2).records.tolist() == records[:5].tolist()
    assert len(first_examples(shard, 10).records) == 6 and len(first_examples(shard, 0).records) == 0


def test_core_correct_ties_go_to_the_first_choice_and_examples_keep_their_order():
    # examples 7, 3, 5 (in this order), two or three choices each; gold marks the right one
    records = np.array([[0, 0, 0, e, c, g] for e, c, g in
                        [(7, 0, 0), (7, 1, 1), (3, 0, 1), (3, 1, 0), (3, 2, 0), (5, 0, 0), (5, 1, 1)]], dtype=np.int32)
    losses = [2.0, 2.0,  # tie: the first choice is picked, which is wrong
              1.5, 0.5, 0.5,  # the second choice wins the tie with the third, wrong
              3.0, 1.0]  # right
    scores = np.stack([losses, np.zeros(7)], 1)
    assert sc.core_correct("multiple_choice", records, scores).tolist() == [False, False, True]
    records[3, 5], records[2, 5] = 1, 0
    assert sc.core_correct("schema", records, scores).tolist() == [False, True, True]


def test_budget_chunks_are_lazy():
    produced = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i
    chunks = sc.budget_chunks(items(), lambda item: 3, 7)
    assert next(chunks) == [0, 1] and produced == [0, 1, 2]  # ready once the item that overflows is seen
    assert list(chunks) == [[2, 3], [4, 5]]


def test_first_pack_is_the_first_packed_pass():
    # multiple choice: cost = shared prefix (3 inputs) + 1 own input per choice = 5 per example
    shard = shard_of("multiple_choice", [(0, [([0, 1, 2, 3, 5], 3), ([0, 1, 2, 4, 5], 3)]) for _ in range(9)])
    examples = sc.core_examples(shard.tokens, shard.records, 64)
    assert [sc.shared_prefix_cost(choices) for choices in examples] == [5] * 9
    first = first_pack(shard, 12, 64)
    assert first.records.tolist() == shard.records[:4].tolist()  # two examples of 5 fit 12 tokens, a third not
    assert len(first_pack(shard, 3, 64).records) == 2  # an example over the budget goes alone
    assert len(first_pack(shard, 1000, 64).records) == 18


@pytest.mark.parametrize("option, message", [("max_autotun=True", "no inductor setting 'max_autotun'"),
                                             ("max_autotune=yes please", "must be a Python literal")])
def test_profile_core_rejects_bad_inductor_options(option, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_core.py", f"--inductor={option}"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "baselines" / "profile_core.py"), run_name="__main__")
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
