"""Worker-side calls, mixed into every vLLM worker with ``worker_extension_cls="zeda_vllm.worker.ZedaWorkerExtension"``
(``LLM(..., worker_extension_cls=...)`` or ``vllm serve --worker-extension-cls ...``) and reached by name through
``collective_rpc``, so they work with any executor: in-process (``uni``) and one process per rank (``mp``, tensor
parallelism), where each rank loads its own shard of every tensor from the same files.

    llm.collective_rpc("zeda_load_weights", args=(["/dev/shm/sync.safetensors"],))  # -> [tensors] per rank
    llm.collective_rpc("zeda_routing_stats")                                         # -> [[per-layer dicts]] per rank
"""

from __future__ import annotations

from typing import Any


class ZedaWorkerExtension:
    """Methods added to vLLM's worker class (``self`` is the worker: ``self.model_runner``, ``self.vllm_config``)."""

    def _zeda_model(self) -> Any:
        return self.model_runner.get_model()  # type: ignore[attr-defined]

    def zeda_load_weights(self, paths: list[str]) -> int:
        """Load whole modules from safetensors files of checkpoint-named tensors in place; returns the tensor count."""
        from .reload import count_tensors, load_in_place, safetensors_weights

        load_in_place(self._zeda_model(), self.vllm_config, safetensors_weights(paths))  # type: ignore[attr-defined]
        return count_tensors(paths)

    def zeda_compilation_info(self) -> dict[str, Any]:
        """The CUDA graph settings this worker compiles with (after the model appended the plugin's splitting op)."""
        comp = self.vllm_config.compilation_config  # type: ignore[attr-defined]
        return {"mode": str(comp.mode), "cudagraph_mode": comp.cudagraph_mode.name,
                "splitting_ops": list(comp.splitting_ops or [])}  # fmt: skip

    def zeda_is_dynamic(self) -> bool:
        return bool(getattr(self._zeda_model(), "zeda_blocks", None))

    def zeda_routing_stats(self) -> list[dict[str, Any]]:
        from .model import routing_stats

        return routing_stats(self._zeda_model())

    def zeda_reset_routing_stats(self) -> int:
        from .model import reset_routing_stats

        return reset_routing_stats(self._zeda_model())

    def zeda_set_zero_expert_bias(self, bias: float) -> int:
        from .model import set_zero_expert_bias

        return set_zero_expert_bias(self._zeda_model(), bias)
