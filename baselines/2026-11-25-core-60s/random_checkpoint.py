"""A randomly initialised checkpoint in 03_pretrain's layout, for timing notebook 04: the cost of a CORE pass does not
depend on the weights, and this takes seconds where a one-step training run spends minutes of device time compiling.

    STACK_HOME=/tmp/stack python3 baselines/2026-11-25-core-60s/random_checkpoint.py --depth=20 --run_name=ours_d20
"""
import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import stackcore as sc  # noqa: E402
from notebooks.training import atomic_save  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--run_name", required=True)
    args = parser.parse_args()
    vocab_size = sc.Tokenizer.load(sc.artifact_dir("tokenizer")).vocab_size
    with torch.device(sc.pick_device()):
        model = sc.GPT(sc.GPTConfig(vocab_size=vocab_size, depth=args.depth))
    path = sc.artifact_dir("checkpoints") / args.run_name / "step_000000.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    # 04 reads the training config only for validation: tokens per pass and per measurement (03's defaults)
    atomic_save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                 "config": {"micro_tokens": 65_536, "eval_tokens": 2_097_152}, "step": 0}, path)
    print(f"{path}: depth {args.depth}, {model.num_params()['total']:,} parameters")


if __name__ == "__main__":
    main()
