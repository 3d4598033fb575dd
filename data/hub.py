"""Pre-tokenized shards on the Hugging Face Hub: push a STACK_HOME's tokenizer and shards to a dataset repo, and
pull them back, so a Colab user can skip tokenizing. A repo holds `tokenizer/` and `shards/<set>/` exactly as
they sit under STACK_HOME."""
from __future__ import annotations

from pathlib import Path

from data.tokenizing import SHARDS_STAMP

HUB_PATTERNS = ["tokenizer/*", "shards/**"]


def pull_shards(repo_id: str, stack_home: Path, endpoint: str | None = None, revision: str | None = None) -> Path:
    """Download a shard repo's `tokenizer/` and `shards/` into `stack_home`; return the folder."""
    from huggingface_hub import snapshot_download

    for stamp in (stack_home / "shards").glob(f"*/{SHARDS_STAMP}"):
        stamp.unlink()  # they name the tokenizer being replaced; a repo's own stamps (pushed with its shards) return
    snapshot_download(repo_id, repo_type="dataset", revision=revision, local_dir=stack_home,
                      allow_patterns=HUB_PATTERNS, endpoint=endpoint)
    for needed in ("tokenizer/tokenizer.tiktoken", "tokenizer/tokenizer.json"):
        if not (stack_home / needed).is_file():
            raise FileNotFoundError(f"{repo_id} has no {needed}: not a DecoderStack shard repo")
    return stack_home


def push_shards(repo_id: str, stack_home: Path, endpoint: str | None = None, token: str | None = None,
                private: bool = True) -> str:
    """Upload `stack_home`'s tokenizer and shards to a dataset repo (created if missing); return the commit url."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=stack_home,
                               allow_patterns=HUB_PATTERNS, commit_message="DecoderStack shards")
    return str(commit)
