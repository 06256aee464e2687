"""The one data-dependent step, as a custom op: drop zero-expert (token, slot) pairs before the fused-MoE kernel.

``torch.ops.zeda_vllm.routed_experts`` is opaque to torch.compile, so vLLM's compiled graph never sees the
data-dependent number of real pairs; at run time the op looks its MoE block up by name in vLLM's forward context, the
registry vLLM's own attention and MoE ops use. Like vLLM's attention ops (``unified_attention_with_output``) it writes
into an ``output`` buffer its caller allocated instead of returning a new tensor: under piecewise CUDA graphs the op
runs eagerly between captured pieces (the plugin puts it into ``splitting_ops``), and the piece after it reads the
buffer at the address it was captured with.

The real pairs are compacted into a top-1 problem for the stock kernel and summed back per token, so zero slots cost
no expert FLOPs. When a batch has no zero slot (e.g. ``use_zce_mask``), the stock call runs unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import torch

OP_NAME = "zeda_vllm::routed_experts"


class ExpertKernel(Protocol):
    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor: ...


@dataclass
class RoutingStats:
    """Host-side counters per MoE layer (no device sync beyond the one the compaction needs)."""

    calls: int = 0
    tokens: int = 0
    slots: int = 0  # tokens x K routing slots
    zero_slots: int = 0  # slots that went to zero experts: never computed
    kernel_pairs: int = 0  # (token, expert) pairs handed to the fused-MoE kernel

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        self.calls = self.tokens = self.slots = self.zero_slots = self.kernel_pairs = 0


def skip_zero_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int,
    kernel: ExpertKernel,
    stats: RoutingStats,
) -> torch.Tensor:
    """Routed-expert output of ``x`` [T, H] for top-K ``weights``/``ids`` [T, K], zero slots (ids >= N) skipped."""
    flat = (ids < num_experts).reshape(-1).nonzero().squeeze(1)  # real (token, slot) pairs, row-major
    pairs = flat.numel()
    stats.calls += 1
    stats.tokens += ids.shape[0]
    stats.slots += ids.numel()
    stats.zero_slots += ids.numel() - pairs
    stats.kernel_pairs += pairs
    if pairs == 0:  # every slot on a zero expert (or no tokens at all): no kernel call
        return torch.zeros_like(x)
    if pairs == ids.numel():
        return kernel(x, weights, ids)
    token_idx = flat.div(ids.shape[1], rounding_mode="floor")
    pair_weights = weights.reshape(-1).index_select(0, flat).unsqueeze(1)
    pair_ids = ids.reshape(-1).index_select(0, flat).unsqueeze(1)
    pair_out = kernel(x.index_select(0, token_idx), pair_weights, pair_ids)
    # index_put_ with accumulate, not index_add_: on CPU the latter takes milliseconds for a handful of rows that
    # share a token (measured in vLLM's worker: ~40 ms vs 0.02 ms for 4 rows of 2048)
    return torch.zeros_like(x).index_put_((token_idx,), pair_out.to(x.dtype), accumulate=True)


@torch.library.custom_op(OP_NAME, mutates_args=("output",))
def routed_experts(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    output: torch.Tensor,
    layer_name: str,
) -> None:
    from vllm.forward_context import get_forward_context

    block = get_forward_context().no_compile_layers[layer_name]
    output.copy_(block.run_routed_experts(hidden_states, topk_weights, topk_ids))


@routed_experts.register_fake
def _(
    hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, output: torch.Tensor, layer_name: str
) -> None:
    return None
