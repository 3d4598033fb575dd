"""04_core_eval's samples and counts: a task cut to its first examples or its first packed pass, and the tokens a
scoring feeds the model. Only 04 and its benchmark (baselines/profile_core.py) time CORE on samples, so they live
beside the notebook rather than in stackcore, which scores (as 05's step lives in notebooks/sft.py)."""
from __future__ import annotations

import dataclasses

import numpy as np

from stackcore import CORE_RECORD_FIELDS, CoreShard, budget_chunks, core_examples, shared_prefix_cost


def first_examples(shard: CoreShard, count: int) -> CoreShard:
    """The shard cut to its first `count` examples (all their choices), e.g. to time a slow path on a sample."""
    examples = shard.records[:, CORE_RECORD_FIELDS.index("example")]
    return dataclasses.replace(shard, records=shard.records[np.isin(examples, np.unique(examples)[:count])])


def first_pack(shard: CoreShard, pack_tokens: int, max_seq_len: int) -> CoreShard:
    """The shard cut to its first packed pass: a warm-up at full sizes, as kernels are built for the shapes they see."""
    examples = core_examples(shard.tokens, shard.records, max_seq_len)
    return first_examples(shard, len(next(budget_chunks(examples, shared_prefix_cost, pack_tokens), [])))


def core_input_tokens(shard: CoreShard, max_seq_len: int, pack_tokens: int) -> int:
    """Tokens that scoring `shard` feeds the model, padding aside: every choice's sequence alone (pack_tokens=0) or,
    packed, each example's shared prefix (mostly the few-shot context) once plus its choices' own tokens."""
    examples = core_examples(shard.tokens, shard.records, max_seq_len)
    if pack_tokens == 0:
        return sum(len(seq) - 1 for choices in examples for seq, _ in choices)
    return sum(shared_prefix_cost(choices) for choices in examples)
