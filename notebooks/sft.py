"""05_sft's step and validation loss: the mean cross-entropy per trained token (the assistant's, target != -1) over
every rank's batches. Only 05 trains and scores with them, so they live beside the notebook rather than in stackcore
(as 06's method lives in notebooks/rl.py); a module rather than cells so that the data-parallel tests call them."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from stackcore import GPT, Batch, LossScaler, SFTLoader, sum_over_ranks, world_size_and_rank


@torch.no_grad()
def evaluate_sft_loss(model: GPT, loader: SFTLoader, steps: int, backend: str) -> float:
    """Mean cross-entropy per trained (mask 1) token over `steps` batches of `loader`, summed over ranks; at most one
    pass over its split (the ranks reach its end together): more would score the same conversations again, and a
    huge `steps` would never end."""
    model.eval()
    totals = torch.zeros(2, device=loader.device, dtype=torch.float64)
    epoch = loader.position["epoch"]
    for _ in range(steps):
        batch = loader.next_batch()
        loss = model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets, backend=backend,
                     loss_reduction="sum")
        totals += torch.stack([loss.double(), (batch.targets >= 0).sum().double()])
        if loader.position["epoch"] != epoch:
            break
    model.train()
    loss, trained = sum_over_ranks(totals.tolist())
    return loss / max(trained, 1.0)


def sft_backward(model: nn.Module, batches: Sequence[Batch], backend: str, loss_scaler: LossScaler | None = None
                 ) -> dict[str, float]:
    """Accumulate into .grad the mean cross-entropy per trained token (target != -1) of one SFT step, whose global
    batch is `batches` on every rank together; return that loss and the step's token counts over all ranks. Each
    batch's summed loss is divided by the step's trained tokens over all ranks, times the number of ranks (whose
    gradients step_optimizers averages): the update of one process taking every rank's batches."""
    local = [int(sum((batch.targets >= 0).sum() for batch in batches)), sum(len(batch.inputs) for batch in batches)]
    trained, tokens = sum_over_ranks(local)
    world_size, _ = world_size_and_rank()
    divisor = max(trained, 1.0) / world_size
    step_loss = torch.zeros((), device=batches[0].inputs.device)
    for batch in batches:
        loss = model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets, backend=backend,
                     loss_reduction="sum") / divisor
        (loss_scaler.scale(loss) if loss_scaler else loss).backward()
        step_loss += loss.detach()
    loss_sum, = sum_over_ranks([float(step_loss)])  # the step's second sync, after the token counts'
    return {"loss": loss_sum / world_size, "trained_tokens": int(trained), "tokens": int(tokens)}
