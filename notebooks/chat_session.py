"""07_chat's conversation: a ChatSession keeps the history and streams replies; the notebook's widget (ChatPanel)
and the twin's terminal loop (chat_loop) are thin layers over it. Only 07 chats, so this lives beside it rather
than in stackcore (so does run_on_rank_zero_only: a chat is one process); it is a module rather than cells so that
tests drive it as plain function calls."""
from __future__ import annotations

import os
import sys
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

from notebooks.runs import run_checkpoint
from stackcore import (SPECIAL_TOKENS, Engine, MissingArtifactError, Tokenizer, artifact_dir, assistant_parts,
                       latest_checkpoint, render_for_completion, show_parts, stack_home)

Message = dict[str, Any]

CHAT_CHECKPOINT_RUNS = {"rl": "06_rl", "sft": "05_sft"}  # chat runs and the notebooks that train them


def run_on_rank_zero_only(notebook: str) -> None:
    """For a notebook that runs in one process (07_chat): under torchrun, rank 0 goes on alone, joining no process
    group, and every other rank says so and exits with status 0, so that the launch ends cleanly."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return
    if rank:
        print(f"{notebook} runs in one process: rank {rank} of {world_size} has nothing to do and exits")
        sys.exit(0)
    print(f"{notebook} runs in one process: rank 0 of {world_size} goes on alone, the other ranks exit")


def find_chat_checkpoint(run_name: str = "") -> Path:
    """The newest checkpoint of run `run_name`; by default that of the newest chat run (06_rl, 05_sft), else
    that of 03_pretrain's base model."""
    if run_name:
        return run_checkpoint(run_name, "run_name", CHAT_CHECKPOINT_RUNS.get(run_name, "03_pretrain"))
    root = artifact_dir("checkpoints")
    found = [path for path in (latest_checkpoint(root / run) for run in CHAT_CHECKPOINT_RUNS) if path is not None]
    if not found:
        found = [path for path in [latest_checkpoint(root / "pretrain")] if path is not None]
    if not found:
        raise MissingArtifactError(f"no checkpoint under {root / 'pretrain'} (nor of a chat run): run "
                                   f"notebooks/03_pretrain first (STACK_HOME is {stack_home()})")
    return max(found, key=lambda path: path.stat().st_mtime)


def show_tokens(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """show_parts(assistant_parts(tokenizer, ids)) token by token: text only grows as tokens arrive, so a
    streaming display can print the difference."""
    shown = {"<|python_start|>": "[calculator: ", "<|output_start|>": " = ", "<|output_end|>": "]"}
    special = {tokenizer.special_id(name): name for name in SPECIAL_TOKENS}
    pieces, run = [], []
    for token in ids:
        if token not in special:
            run.append(token)
            continue
        pieces.append(tokenizer.decode(run))
        run = []
        if special[token] in ("<|assistant_end|>", "<|bos|>"):
            break
        pieces.append(shown.get(special[token], ""))
    return "".join(pieces) + tokenizer.decode(run)


class ChatSession:
    """A conversation with a model: the message history and a streaming `reply`.

    The history stays within the model's context: before each reply the oldest user/assistant exchanges are dropped,
    as few as needed for the prompt plus a full reply (max_tokens) to fit; the system prompt is always kept. The
    history changes only when a reply completes, so a turn that fails (any exception) or is abandoned part way
    leaves it as it was, and the next turn works."""

    def __init__(self, engine: Engine, temperature: float = 0.6, top_k: int | None = 50, max_tokens: int = 256,
                 seed: int = 0, system: str | None = None):
        self.context = engine.model.config.max_seq_len
        if not 0 < max_tokens < self.context:
            raise ValueError(f"max_tokens must be between 1 and {self.context - 1} (the model reads "
                             f"{self.context} tokens at most, prompt included), got {max_tokens}")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"the system prompt must be a string, got {type(system).__name__}")
        self.engine, self.temperature, self.top_k, self.max_tokens = engine, temperature, top_k, max_tokens
        self.seed, self.system = seed, system
        self.messages: list[Message] = []
        self.dropped = 0  # exchanges dropped so far to fit the context
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.dropped = 0

    def fit_to_context(self, messages: list[Message]) -> tuple[list[Message], list[int]]:
        """`messages` (ending with the new user message) without their oldest exchanges, as few dropped as needed
        for the prompt and a full reply to fit the context; and that prompt. Dropping exchanges only shortens the
        prompt, so a binary search finds how many go, rendering log2(exchanges) times."""
        head = int(bool(messages) and messages[0].get("role") == "system")
        room = self.context - self.max_tokens

        def kept(dropped: int) -> list[Message]:
            return messages[:head] + messages[head + 2 * dropped:]

        low, high = 0, (len(messages) - head - 1) // 2
        while low < high:
            middle = (low + high) // 2
            if len(render_for_completion(self.engine.tokenizer, kept(middle))) <= room:
                high = middle
            else:
                low = middle + 1
        prompt = render_for_completion(self.engine.tokenizer, kept(low))
        if len(prompt) > room:
            raise ValueError(f"this message makes a prompt of {len(prompt)} tokens (system prompt included), but the "
                             f"model reads {self.context} tokens at most, {self.max_tokens} of them kept for the "
                             f"reply: shorten it")
        return kept(low), prompt

    def reply(self, text: str) -> Iterator[str]:
        """Yield the reply to the user's `text` as it is generated, piece by piece (tool calls shown as by
        show_parts). A bad message is refused here, before anything is generated; once the returned generator is
        exhausted, the message and its reply are part of the history."""
        if not isinstance(text, str):
            raise TypeError(f"a message must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("an empty message: there is nothing to answer")
        messages, prompt = self.fit_to_context([*self.messages, {"role": "user", "content": text}])
        return self._stream(messages, prompt)

    def _stream(self, messages: list[Message], prompt: list[int]) -> Iterator[str]:
        ids: list[int] = []
        shown = ""
        for tokens, _ in self.engine.stream(prompt, max_tokens=self.max_tokens, temperature=self.temperature,
                                            top_k=self.top_k, seed=self.seed + len(messages)):
            ids.append(tokens[0])
            now = show_tokens(self.engine.tokenizer, ids)
            if not now.endswith("\ufffd"):  # wait for the rest of a character split across tokens
                yield now[len(shown):]
                shown = now
        self.dropped += (len(self.messages) + 1 - len(messages)) // 2
        self.messages = [*messages, {"role": "assistant", "content": assistant_parts(self.engine.tokenizer, ids)}]


def chat_loop(session: ChatSession, read: typing.Callable[[str], str] = input,
              write: typing.Callable[..., Any] = print) -> None:
    """A terminal chat: 'clear' starts over; 'quit', an empty line, end of input or Ctrl-C at the prompt stops.
    Ctrl-C during a reply stops that reply; a turn that fails is reported in one line, and the chat goes on."""
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if text in ("", "quit", "exit"):
            break
        if text == "clear":
            session.clear()
            continue
        try:
            pieces = session.reply(text)
            write("assistant> ", end="", flush=True)
            for piece in pieces:
                write(piece, end="", flush=True)
            write()
        except KeyboardInterrupt:
            write("\n(reply stopped; it is not kept)")
        except Exception as error:  # the session is unchanged: say why, and go on
            write(f"\n(no reply: {error})")


class ChatPanel:
    """The notebook's chat widget: the history, a text box with a send button, a temperature slider and a clear
    button. `send` and `clear` are the button callbacks; a test calls them directly."""

    def __init__(self, session: ChatSession):
        import ipywidgets as widgets

        self.session = session
        self.history = widgets.HTML()
        self.text = widgets.Text(placeholder="Ask something, then press Send", layout={"width": "60%"})
        self.temperature = widgets.FloatSlider(value=session.temperature, min=0.0, max=1.5, step=0.05,
                                               description="temperature")
        send, clear = widgets.Button(description="Send"), widgets.Button(description="Clear")
        send.on_click(self.send)
        clear.on_click(self.clear)
        self.widget = widgets.VBox([self.history, widgets.HBox([self.text, send, clear]), self.temperature])
        self.render()

    def render(self, pending: Sequence[Message] = (), note: str = "") -> None:
        """Show the history, the messages of a turn still being generated, and a note below them."""
        import html

        dropped = self.session.dropped
        lines = [f"<p><i>({dropped} earlier exchanges no longer fit the context)</i></p>"] if dropped else []
        for message in [*self.session.messages, *pending]:
            content = message["content"]
            text = content if isinstance(content, str) else show_parts(content)
            lines.append(f"<p><b>{message['role']}:</b> {html.escape(text)}</p>")
        lines += [f"<p><i>({html.escape(note)})</i></p>"] if note else []
        self.history.value = "".join(lines)

    def send(self, _button: Any = None) -> None:
        text, self.text.value = self.text.value.strip(), ""
        if not text:
            return
        self.session.temperature = self.temperature.value
        question, reply = {"role": "user", "content": text}, ""
        try:
            for piece in self.session.reply(text):
                reply += piece
                self.render([question, {"role": "assistant", "content": reply}])
        except Exception as error:  # the session is unchanged: give the text back to edit, and say why
            self.text.value = text
            self.render(note=f"no reply: {error}")
            return
        self.render()

    def clear(self, _button: Any = None) -> None:
        self.session.clear()
        self.render()
