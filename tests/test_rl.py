"""GSM8K and reinforcement learning: the dataset adapter (data/gsm8k.py: answers to calculator conversations, final
answer parsing, rewards, the Hub download, prompt shards) and notebooks/rl.py (advantages, the policy-gradient
loss over sampled tokens only, rollouts with the Engine, pass@k)."""
from __future__ import annotations

import itertools
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stackcore as sc  # noqa: E402
from data import gsm8k  # noqa: E402
from notebooks import rl  # noqa: E402
from test_hub import hub  # noqa: E402,F401  (the fixture: a local stand-in for the Hub)



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine (pytest -n 2 on two cores) OpenMP's spinning
    threads slow a decode step a hundredfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NATALIA = gsm8k.Problem(
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips "
    "did Natalia sell altogether in April and May?",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April "
    "and May.\n#### 72")


# --- data/gsm8k.py ----------------------------------------------------------------------------------------------

def test_an_answer_becomes_text_python_and_output_parts():
    user, assistant = NATALIA.conversation()
    assert user == {"role": "user", "content": NATALIA.question} and NATALIA.prompt() == [user]
    assert assistant["role"] == "assistant"
    assert assistant["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"}, {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]
    assert NATALIA.gold == "72"
    back_to_back = gsm8k.assistant_parts("<<2*3=6>><<6+1=7>>\n#### 7")
    assert [p["type"] for p in back_to_back] == ["python", "python_output", "python", "python_output", "text"]


@pytest.mark.parametrize("text, expected", [
    ("#### 72", "72"), ("#### 1,080", "1080"), ("#### $5", "5"), ("#### 10.0", "10"), ("#### 2.50", "2.5"),
    ("#### -3", "-3"), ("#### .5", "0.5"), ("####5", "5"), ("So she has 7 left.\n#### 7.", "7"),
    ("#### $1,000.00 dollars", "1000"), ("#### 12 <|assistant_end|>", "12"), ("#### 3\n#### 4", "3"),
    ("The answer is 7", None), ("#### seven", None), ("#### .", None), ("", None), ("### 5", None),
])
def test_parse_final_answer(text, expected):
    assert gsm8k.parse_final_answer(text) == expected


@pytest.mark.parametrize("completion, gold, expected", [
    ("so 48 + 24 = 72.\n#### 72", "72", 1.0), ("#### 72.00", "72", 1.0), ("#### 1,080", "1080", 1.0),
    ("#### 71", "72", 0.0), ("72", "72", 0.0), ("#### 720", "72", 0.0), ("", "72", 0.0), ("#### 5", "5.0", 1.0),
])
def test_reward_is_one_exactly_for_the_right_final_answer(completion, gold, expected):
    assert gsm8k.reward(completion, gold) == expected


def test_every_shared_problem_parses_and_the_calculator_agrees_with_the_annotations(real_data):
    """Every line of the shared GSM8K copy: a gold answer, parts that rebuild the answer exactly, and tool outputs
    that sc.calculate reproduces (so SFT teaches the outputs the engine will force at run time)."""
    calls = agreed = 0
    for split, count in (("train", 7473), ("test", 1319)):
        problems = gsm8k.load_problems(split, str(real_data / "gsm8k"))
        assert len(problems) == count
        for problem in problems:
            parts = gsm8k.assistant_parts(problem.answer)
            rebuilt = "".join({"text": "{}", "python": "<<{}=", "python_output": "{}>>"}[p["type"]].format(p["text"])
                              for p in parts)
            assert rebuilt == problem.answer
            assert parts[-1]["type"] == "text" and "####" in parts[-1]["text"]
            assert gsm8k.reward(problem.answer, problem.gold) == 1.0
            for expression, output in zip(parts, parts[1:]):
                if expression["type"] == "python":
                    calls += 1
                    agreed += gsm8k.normalise_number(sc.calculate(expression["text"])) == \
                        gsm8k.normalise_number(output["text"])
    assert calls > 25_000 and agreed / calls > 0.999


def test_synthetic_problems_are_deterministic_and_well_formed():
    problems = gsm8k.synthetic_problems(300, seed=5)
    assert problems == gsm8k.synthetic_problems(300, seed=5) != gsm8k.synthetic_problems(300, seed=6)
    for problem in problems:
        parts = gsm8k.assistant_parts(problem.answer)
        calls = [(e["text"], o["text"]) for e, o in zip(parts, parts[1:]) if e["type"] == "python"]
        assert calls and all(sc.calculate(expression) == output for expression, output in calls)
        assert problem.gold == calls[-1][1] and gsm8k.reward(problem.answer, problem.gold) == 1.0
    assert len(gsm8k.load_problems("test", "synthetic")) == gsm8k.SYNTHETIC_COUNTS["test"]


def test_local_files_with_errors_name_the_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "a <<1+1=2>>2\n#### 2"})
    (tmp_path / "train.jsonl").write_text(f"{good}\n\n{good}\n")
    assert [p.gold for p in gsm8k.load_problems("train", str(tmp_path))] == ["2", "2"]
    for bad, message in (("{not json", "not valid JSON"), ('{"question": "q"}', "string fields"),
                         ('{"question": "q", "answer": "no final answer"}', "no '#### N'")):
        (tmp_path / "test.jsonl").write_text(f"{good}\n{bad}\n")
        with pytest.raises(gsm8k.GsmDataError, match=rf"test.jsonl:2: .*{message}"):
            gsm8k.load_problems("test", str(tmp_path))
    with pytest.raises(gsm8k.GsmDataError, match="is not hub, synthetic or a folder holding test.jsonl"):
        gsm8k.load_problems("test", str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="unknown GSM8K split"):
        gsm8k.load_problems("validation", "synthetic")


def test_hub_download_reads_the_parquet_files_once(hub, tmp_path, stack_home):
    served = tmp_path / "hub" / gsm8k.HUB_REPO
    rows = {"train": [NATALIA, gsm8k.Problem("1+1?", "<<1+1=2>>2\n#### 2")], "test": [NATALIA]}
    for split, problems in rows.items():
        path = served / gsm8k.hub_filename(split)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"question": [p.question for p in problems], "answer": [p.answer for p in problems]}),
                       path)
    assert gsm8k.load_problems("train", "hub", endpoint=hub.url) == rows["train"]
    assert gsm8k.load_problems("test", "hub", endpoint=hub.url) == rows["test"]
    assert (stack_home / "downloads" / "gsm8k" / "main" / "test-00000-of-00001.parquet").is_file()
    bodies = hub.count("GET", f"/datasets/{gsm8k.HUB_REPO}/resolve/")
    assert bodies == 2
    assert gsm8k.load_problems("train", "hub", endpoint=hub.url) == rows["train"]
    assert hub.count("GET", f"/datasets/{gsm8k.HUB_REPO}/resolve/") == bodies  # kept, not downloaded again
    assert hub.unexpected == []


# --- prompt shards ----------------------------------------------------------------------------------------------

def test_prompt_shards_round_trip(tmp_path):
    prompts = [gsm8k.TaskPrompt([1, 5, 7, 3], "72", 0), gsm8k.TaskPrompt([1, 9, 3], "-4", 5),
               gsm8k.TaskPrompt([1, 2, 2, 2, 3], "192000000", 9)]
    path = gsm8k.write_prompt_shard(tmp_path, "train", prompts, vocab_size=16)
    assert gsm8k.read_prompt_shard(tmp_path, "train", vocab_size=16) == prompts
    assert sc.read_shard(sc.side_file(path, "records")).shape == (3, len(gsm8k.PROMPT_RECORD_FIELDS))
    with pytest.raises(ValueError, match=r"test\.bin: problem 4: gold answer '2.5'"):
        gsm8k.write_prompt_shard(tmp_path, "test", [gsm8k.TaskPrompt([1, 2], "2.5", 4)], vocab_size=16)
    with pytest.raises(sc.MissingArtifactError, match="02_sharding"):
        gsm8k.read_prompt_shard(tmp_path, "test")


# --- advantages, packing and the loss ---------------------------------------------------------------------------

def test_advantages_are_rewards_minus_the_group_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 0.0, 0.5]])
    advantages = rl.group_advantages(rewards)
    assert torch.allclose(advantages, torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.0] * 4, [0.0] * 4,
                                                    [0.0, 0.5, -0.5, 0.0]]))
    assert torch.allclose(advantages.sum(1), torch.zeros(4))  # not divided by the std: the scale is the reward's


# Two rollouts: prompt (mask 0), sampled tokens (1), a forced tool output (0) and sampled tokens again.
SEQUENCES = [[1, 4, 5, 6, 7, 8, 9, 10], [1, 4, 5, 11, 12]]
MASKS = [[0, 0, 0, 1, 0, 0, 1, 1], [0, 0, 0, 1, 1]]


def test_pack_rollouts_trains_only_sampled_tokens():
    batch = rl.pack_rollouts(SEQUENCES, MASKS, [0.5, -1.0], "cpu")
    assert batch.inputs.tolist() == [1, 4, 5, 6, 7, 8, 9, 1, 4, 5, 11]
    assert batch.targets.tolist() == [-1, -1, 6, -1, -1, 9, 10, -1, -1, 11, 12]
    assert batch.weights.tolist() == [0, 0, 0.5, 0, 0, 0.5, 0.5, 0, 0, -1.0, -1.0]
    assert batch.cu_seqlens.tolist() == [0, 7, 11] and batch.max_seqlen == 7


class LogitTable(nn.Module):
    """A stand-in model whose logits at each packed position are free parameters, so d loss / d logits shows which
    positions the loss reaches."""

    def __init__(self, positions: int, vocab: int = 16):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(positions, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, cu_seqlens, max_seqlen, target_ids, *, backend="sdpa", loss_reduction="mean"):
        return F.cross_entropy(self.logits, target_ids, ignore_index=-1, reduction=loss_reduction)


def test_the_loss_reaches_only_sampled_tokens_and_raises_those_with_positive_advantage():
    batch = rl.pack_rollouts(SEQUENCES, MASKS, [0.5, -1.0], "cpu")
    model = LogitTable(len(batch.inputs))
    loss = rl.policy_gradient_loss(model, batch, sampled_tokens=5, backend="sdpa")
    loss.backward()
    touched = model.logits.grad.abs().sum(1) > 0
    assert touched.tolist() == (batch.weights != 0).tolist()  # nothing at prompt or tool-output positions
    log_probs = model.logits.detach().log_softmax(-1)
    expected = -(batch.weights * log_probs.gather(1, batch.targets.clamp(min=0)[:, None])[:, 0]).sum() / 5
    assert torch.allclose(loss, expected)
    # A gradient step raises the sampled token's probability where the advantage is positive, lowers it elsewhere.
    stepped = (model.logits.detach() - 0.1 * model.logits.grad).log_softmax(-1)
    for position in torch.nonzero(batch.weights).flatten().tolist():
        target = batch.targets[position]
        change = stepped[position, target] - log_probs[position, target]
        assert (change > 0) == (batch.weights[position] > 0)


def test_token_budget_chunks():
    assert sc.token_budget_chunks([3, 4, 2, 9, 1], 7) == [[0, 1], [2], [3], [4]]
    assert sc.token_budget_chunks([], 7) == []


def test_pass_at_k_matches_counting_every_subset():
    for samples, correct, k in itertools.product(range(1, 7), range(0, 7), range(1, 7)):
        if correct > samples or k > samples:
            continue
        subsets = list(itertools.combinations([i < correct for i in range(samples)], k))
        assert math.isclose(rl.pass_at_k(samples, correct, k), sum(map(any, subsets)) / len(subsets))
    with pytest.raises(ValueError, match="at least 8 samples"):
        rl.pass_at_k(4, 1, 8)


# --- rollouts and one RL step on a tiny model -------------------------------------------------------------------

def tiny_policy(tokenizer_dir: Path) -> tuple[sc.GPT, sc.Engine, list[gsm8k.TaskPrompt]]:
    tokenizer = sc.Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = sc.GPT(sc.GPTConfig(vocab_size=tokenizer.vocab_size, depth=2, model_dim=64, head_dim=32, max_seq_len=128))
    with torch.no_grad():  # a non-zero head, so that the samples differ and the head has gradients
        model.lm_head.weight.normal_(std=0.02)
    problems = gsm8k.synthetic_problems(2, seed=0)
    prompts = [gsm8k.TaskPrompt(sc.render_for_completion(tokenizer, problem.prompt()), problem.gold, i)
               for i, problem in enumerate(problems)]
    return model, sc.Engine(model, tokenizer), prompts


def odd_length_reward(text: str, gold: str) -> float:
    return float(len(text) % 2)


def test_rollouts_mask_the_prompt_and_carry_rewards(tiny_tokenizer):
    model, engine, prompts = tiny_policy(tiny_tokenizer)
    group, = rl.generate_rollouts(engine, prompts[:1], odd_length_reward, num_samples=4, max_tokens=10, seed=3)
    prompt_length = len(prompts[0].ids)
    for sequence, mask, text, reward in zip(group.sequences, group.masks, group.completions, group.rewards):
        assert sequence[:prompt_length] == prompts[0].ids and len(mask) == len(sequence)
        assert set(mask[:prompt_length]) == {0} and prompt_length < len(sequence) <= prompt_length + 10
        assert text == engine.tokenizer.decode(sequence[prompt_length:]) and reward == len(text) % 2
    again, = rl.generate_rollouts(engine, prompts[:1], odd_length_reward, num_samples=4, max_tokens=10, seed=3)
    assert again.sequences == group.sequences  # seeded
    # decoded together with another prompt, and a row budget that splits the prompts over two engine calls
    for max_rows in (256, 4):
        pair = rl.generate_rollouts(engine, prompts[1::-1], odd_length_reward, num_samples=4, max_tokens=10, seed=-1,
                                    max_rows=max_rows)
        assert pair[1].sequences == group.sequences and pair[0].prompt == prompts[1]


def test_one_rl_step_changes_the_weights_and_passes_do_not_change_the_gradient(tiny_tokenizer):
    model, engine, prompts = tiny_policy(tiny_tokenizer)
    groups = rl.generate_rollouts(engine, prompts, odd_length_reward, num_samples=4, max_tokens=12, seed=0)
    assert any(len(set(group.rewards)) > 1 for group in groups), "pick seeds that give mixed rewards"

    gradients = []
    for pass_tokens in (10_000, 1):  # everything in one packed pass, then one rollout per pass
        model.zero_grad(set_to_none=True)
        stats = rl.policy_gradient_backward(model, groups, "sdpa", pass_tokens, "cpu")
        gradients.append([p.grad.clone() for p in model.parameters()])
    assert stats["passes"] == stats["trained_sequences"] > 0
    assert stats["trained_tokens"] == sum(len(seq) - 1 for group in groups for seq, reward in
                                          zip(group.sequences, group.rewards) if reward != np.mean(group.rewards))
    assert stats["sampled_tokens"] == sum(sum(mask) for group in groups for mask in group.masks)
    for one_pass, many_passes in zip(*gradients):
        assert torch.allclose(one_pass, many_passes, atol=1e-6)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sc.step_optimizers(sc.build_optimizers(model))
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    # From a fresh init the output projections are zero, so this first step reaches them, the head, the embeddings
    # and the scalars (the inner matrices follow from the second step on).
    assert {"lm_head.weight", "wte.weight", "blocks.0.attn.c_proj.weight", "blocks.1.mlp.c_proj.weight"} <= changed


def test_pass_at_k_evaluation(tiny_tokenizer):
    _, engine, prompts = tiny_policy(tiny_tokenizer)
    always = rl.evaluate_pass_at_k(engine, prompts, lambda text, gold: 1.0, num_samples=4, max_tokens=4)
    assert always == {"pass@1": 1.0, "pass@2": 1.0, "pass@4": 1.0, "mean_reward": 1.0}
    never = rl.evaluate_pass_at_k(engine, prompts, gsm8k.reward, num_samples=3, max_tokens=4)
    assert never == {"pass@1": 0.0, "pass@2": 0.0, "pass@3": 0.0, "mean_reward": 0.0}
    parity = rl.evaluate_pass_at_k(engine, prompts, odd_length_reward, num_samples=4, max_tokens=8, seed=1)
    assert 0 <= parity["pass@1"] <= parity["pass@2"] <= parity["pass@4"] <= 1


# --- the notebook and the benchmark -----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_rl_twin_without_a_model_names_the_notebook_to_run(stack_home):
    env = {**os.environ, "STACK_HOME": str(stack_home), "STACK_PRESET": "tiny", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "notebooks/06_rl.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and error.startswith("06_rl.py: error: ") and "run notebooks/05_sft first" in error
    assert str(stack_home / "checkpoints" / "sft") in error


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_bench_rl_smoke(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench_rl.json"
    monkeypatch.setattr(sys, "argv", ["bench_rl.py", "--depth=2", "--vocab_size=1024", "--prompts=2", "--samples=2",
                                      "--prompt_len=16", "--max_new_tokens=6", "--repeats=1", f"--out={out}"])
    runpy.run_path(str(ROOT / "baselines" / "bench_rl.py"), run_name="__main__")
    assert "RL step" in capsys.readouterr().out
    median = json.loads(out.read_text())["median"]
    assert median["answer_tokens"] == 2 * 2 * 6 and median["rollout_tokens_per_s"] > 0 and median["step_s"] > 0
