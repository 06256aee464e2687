"""Full-vocabulary logits without holding them: the model runs its own forward, but its output head computes the
stage's quantity chunk by chunk over the positions (each chunk recomputed in backward: activation checkpointing)
instead of returning [B, S, V] logits. What autograd keeps is the final hidden states (positions x hidden), not
positions x vocabulary, so peak memory grows with the chunk size, not with the sequence length.

:func:`head_computes` swaps the forward of the model's output embedding (``get_output_embeddings()``, the
``lm_head``) while active, so every backend's hooks around the head (FSDP2's unsharding, DeepSpeed ZeRO-3's
gathering) run once, as for any forward; what the swapped head returns (a loss, token log-probs, a distribution) is
what the model returns as ``logits``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden states -> logits (the original head)
HeadFn = Callable[[torch.Tensor, Head], torch.Tensor]  # (hidden states, head) -> what the model returns as logits


@contextmanager
def head_computes(model: nn.Module, fn: HeadFn) -> Iterator[None]:
    """While active, the model's head returns ``fn(hidden_states, original_head)``."""
    head = model.get_output_embeddings()
    original, own = head.forward, "forward" in vars(head)
    head.forward = lambda hidden, *args, **kwargs: fn(hidden, original)
    try:
        yield
    finally:
        if own:
            head.forward = original
        else:
            del head.forward  # the class's forward again


def _spans(length: int, chunk: int) -> Iterator[slice]:
    for start in range(0, length, chunk):
        yield slice(start, min(start + chunk, length))


def chunked_sum(
    head: Head,
    hidden: torch.Tensor,
    chunk: int,
    fn: Callable[..., torch.Tensor],
    *per_position: torch.Tensor | None,
) -> torch.Tensor:
    """Σ over position chunks of ``fn(head(hidden[:, c]).float(), *[t[:, c] for t in per_position])`` (a scalar per
    chunk), each chunk's logits recomputed in backward instead of kept."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for span in _spans(hidden.shape[1], chunk):
        parts = [None if t is None else t[:, span] for t in per_position]
        if torch.is_grad_enabled() and hidden.requires_grad:
            value = checkpoint(_apply, head, fn, hidden[:, span], *parts, use_reentrant=False)
        else:
            value = _apply(head, fn, hidden[:, span], *parts)
        total = total + value
    return total


def _apply(head: Head, fn: Callable[..., torch.Tensor], hidden: torch.Tensor, *parts: Any) -> torch.Tensor:
    return fn(head(hidden).float(), *parts)


def token_logprobs(
    head: Head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int, temperature: float = 1.0
) -> torch.Tensor:
    """[B, S] log p(targets) under head(hidden) / temperature, chunk by chunk (with gradient where ``hidden`` has
    one: each chunk recomputed in backward)."""
    out = []
    for span in _spans(hidden.shape[1], chunk):
        if torch.is_grad_enabled() and hidden.requires_grad:
            lp = checkpoint(_gather, head, hidden[:, span], targets[:, span], temperature, use_reentrant=False)
        else:
            lp = _gather(head, hidden[:, span], targets[:, span], temperature)
        out.append(lp)
    return torch.cat(out, dim=1) if out else hidden.new_zeros(hidden.shape[:2])


def _gather(head: Head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


@torch.no_grad()
def distributions(head: Head, hidden: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """The next-token log-distribution per chunk, in bf16 (a frozen teacher's, for the dense losses that need it:
    2 B per position and vocabulary entry, the one V-sized thing those losses keep)."""
    return [F.log_softmax(head(hidden[:, span]).float(), -1).bfloat16() for span in _spans(hidden.shape[1], chunk)]
