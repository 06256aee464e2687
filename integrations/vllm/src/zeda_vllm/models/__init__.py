"""One module per family, imported lazily by vLLM's model registry (``zeda_vllm.models.<base_model_type>``)."""
