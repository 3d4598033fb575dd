"""07_chat's conversation (notebooks/chat_session.py): the session streams replies and keeps the history, the
terminal loop and the widget drive it, and the checkpoint it chats with is found. The engine is scripted here, so
these tests check the session and not the model; test_hostile_chat.py tries to break it."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator, Sequence

import pytest

import stackcore as sc
from notebooks.chat_session import ChatPanel, ChatSession, chat_loop, find_chat_checkpoint


class ScriptedEngine:
    """Stands in for stackcore.Engine: answers every prompt with the same tokens, one per step, and records the
    prompts. `failures` maps a call number (0, 1, ...) to (the step it fails at, the exception it raises)."""

    def __init__(self, tokenizer: sc.Tokenizer, reply: Sequence[int], context: int = 128,
                 failures: dict[int, tuple[int, BaseException]] | None = None):
        self.tokenizer, self.reply, self.failures = tokenizer, list(reply), failures or {}
        self.model = SimpleNamespace(config=SimpleNamespace(max_seq_len=context))
        self.prompts: list[list[int]] = []

    def stream(self, prompt: Sequence[int], max_tokens: int, temperature: float, top_k: int | None, seed: int
               ) -> Iterator[tuple[list[int], list[int]]]:
        assert len(prompt) + max_tokens <= self.model.config.max_seq_len, "the session let the context overflow"
        call = len(self.prompts)
        self.prompts.append(list(prompt))
        fail_at, error = self.failures.get(call, (None, None))
        for step, token in enumerate(self.reply[:max_tokens]):
            if step == fail_at:
                raise error
            yield [token], [1]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return sc.Tokenizer.load(tiny_tokenizer)


@pytest.fixture(scope="module")
def scripted_reply(tokenizer) -> list[int]:
    """A calculator call and a sentence with a character that spans tokens, as the engine would emit them."""
    special = tokenizer.special_id
    return [*tokenizer.encode("Sure "), special("<|python_start|>"), *tokenizer.encode("2+2"),
            special("<|python_end|>"), special("<|output_start|>"), *tokenizer.encode("4"),
            special("<|output_end|>"), *tokenizer.encode(" é!"), special("<|assistant_end|>")]


@pytest.fixture
def scripted_session(tokenizer, scripted_reply):
    return ChatSession(ScriptedEngine(tokenizer, scripted_reply), temperature=0.0, max_tokens=40)


def test_chat_session_streams_and_keeps_history(scripted_session):
    pieces = list(scripted_session.reply("What is 2+2?"))
    assert "".join(pieces) == "Sure [calculator: 2+2 = 4] é!" and len(pieces) > 3
    assert scripted_session.messages[-1] == {"role": "assistant", "content": [
        {"type": "text", "text": "Sure "}, {"type": "python", "text": "2+2"},
        {"type": "python_output", "text": "4"}, {"type": "text", "text": " é!"}]}
    assert sc.show_parts(scripted_session.messages[-1]["content"]) == "".join(pieces)
    "".join(scripted_session.reply("Again?"))
    assert [m["role"] for m in scripted_session.messages] == ["user", "assistant"] * 2
    assert scripted_session.engine.prompts[-1] == sc.render_for_completion(
        scripted_session.engine.tokenizer, [*scripted_session.messages[:-1]])
    scripted_session.clear()
    assert scripted_session.messages == []


def test_a_system_prompt_opens_the_history_and_survives_clear(tokenizer, scripted_reply):
    session = ChatSession(ScriptedEngine(tokenizer, scripted_reply), max_tokens=40, system="Answer briefly.")
    "".join(session.reply("hi"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    session.clear()
    assert session.messages == [{"role": "system", "content": "Answer briefly."}]


def test_chat_loop_reads_until_an_empty_line(scripted_session):
    inputs, written = iter(["hi", "clear", "hello", ""]), []
    chat_loop(scripted_session, read=lambda _: next(inputs), write=lambda *a, **k: written.append("".join(a)))
    assert "".join(written).count("[calculator: 2+2 = 4]") == 2
    assert len(scripted_session.messages) == 2  # "clear" dropped the first exchange


def test_chat_panel_callbacks(scripted_session):
    pytest.importorskip("ipywidgets")
    panel = ChatPanel(scripted_session)
    panel.text.value = "What is 2+2?"
    panel.temperature.value = 0.0
    panel.send()
    assert panel.text.value == "" and "[calculator: 2+2 = 4]" in panel.history.value
    assert "What is 2+2?" in panel.history.value
    panel.send()  # empty text box: nothing happens
    assert len(scripted_session.messages) == 2
    panel.clear()
    assert scripted_session.messages == [] and panel.history.value == ""


def test_find_chat_checkpoint_prefers_chat_runs(stack_home):
    with pytest.raises(sc.MissingArtifactError, match="03_pretrain"):
        find_chat_checkpoint()
    with pytest.raises(sc.MissingArtifactError, match="05_sft"):
        find_chat_checkpoint("sft")
    root = sc.artifact_dir("checkpoints")
    for run in ("pretrain", "sft"):
        (root / run).mkdir()
        (root / run / "step_000010.pt").write_bytes(b"")
        if run == "pretrain":
            assert find_chat_checkpoint() == root / "pretrain" / "step_000010.pt"
    assert find_chat_checkpoint() == root / "sft" / "step_000010.pt"
    assert find_chat_checkpoint("pretrain") == root / "pretrain" / "step_000010.pt"


def test_a_run_name_without_checkpoints_lists_the_runs_that_have_them(stack_home):
    """A misspelt --run_name: the runs there are, each with the notebook that trained it (as the checkpoint records
    it; before it did, the notebook whose default run name the folder has), instead of a bare 'run 03_pretrain
    first'."""
    import torch

    root = sc.artifact_dir("checkpoints")
    saved = {"pretrain": {}, "big_base": {"made_by": "03_pretrain"}, "sft": {"made_by": "05_sft"}, "rl": {},
             "mine": {}}
    for run, entries in saved.items():
        (root / run).mkdir()
        torch.save({"model": {}, "model_config": {}, "step": 1, **entries}, root / run / "step_000001.pt")
    (root / "broken").mkdir()
    (root / "broken" / "step_000001.pt").write_bytes(b"not a checkpoint")
    (root / "empty").mkdir()
    with pytest.raises(sc.MissingArtifactError) as error:
        find_chat_checkpoint("stf")
    message = str(error.value)
    assert message.startswith(f"no checkpoint in {root / 'stf'}; the runs with checkpoints are big_base (03_pretrain), "
                              f"broken (damaged), mine (unknown notebook), pretrain (03_pretrain), rl (06_rl), sft "
                              f"(05_sft): pass --run_name=<one of them>, or run notebooks/03_pretrain")
    assert "empty" not in message
