"""Pre-tokenized shards on the Hugging Face Hub: push a STACK_HOME's tokenizer and shards to a dataset repo, and
pull them back, so a Colab user can skip tokenizing. A repo holds `tokenizer/` and `shards/<set>/` exactly as
they sit under STACK_HOME."""
from __future__ import annotations

from pathlib import Path

HUB_PATTERNS = ["tokenizer/*", "shards/**"]


def pull_shards(repo_id: str, stack_home: Path, endpoint: str | None = None, revision: str | None = None) -> Path:
    """Download a shard repo's `tokenizer/` and `shards/` into `stack_home`; return the folder. A shard set the repo
    brings replaces the local one whole (see drop_stale_files); a set it does not bring keeps its stamp, which names
    the tokenizer being replaced, so it is refused until 02_sharding writes it again."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    snapshot_download(repo_id, repo_type="dataset", local_dir=stack_home, allow_patterns=HUB_PATTERNS,
                      revision=revision, endpoint=endpoint)
    for needed in ("tokenizer/tokenizer.tiktoken", "tokenizer/tokenizer.json"):
        if not (stack_home / needed).is_file():
            raise FileNotFoundError(f"{repo_id} has no {needed}: not a DecoderStack shard repo")
    held = [file.rfilename for file in HfApi(endpoint=endpoint).dataset_info(repo_id, revision=revision).siblings]
    drop_stale_files(stack_home, set(filter_repo_objects(held, allow_patterns=HUB_PATTERNS)))  # what it pulled
    return stack_home


def drop_stale_files(stack_home: Path, pulled: set[str]) -> None:
    """In each shard folder the pull wrote into, remove the files the repo does not hold: shards of a longer local
    set, which the loaders would read with the new tokenizer, and a stamp naming the tokenizer being replaced (a
    set the repo brings without its own stamp, pushed before stamps existed, is then taken as it is)."""
    for folder in {(stack_home / name).parent for name in pulled if name.startswith("shards/")}:
        for path in folder.iterdir():
            if path.is_file() and path.relative_to(stack_home).as_posix() not in pulled:
                path.unlink()


def push_shards(repo_id: str, stack_home: Path, endpoint: str | None = None, token: str | None = None,
                private: bool = True) -> str:
    """Upload `stack_home`'s tokenizer and shards to a dataset repo (created if missing); return the commit url."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=stack_home,
                               allow_patterns=HUB_PATTERNS, commit_message="DecoderStack shards")
    return str(commit)
