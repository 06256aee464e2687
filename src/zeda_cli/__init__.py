"""zeda: turn post-trained static MoE LLMs into dynamic ones with zero experts (ZEDA, arXiv 2605.18643).

``zeda_cli.load_model(folder)`` loads any supported static or dynamic checkpoint; heavy imports stay lazy so the
command line starts fast.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model", "load_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in ("load_model", "load_tokenizer"):
        from .runtime import loading

        return getattr(loading, name)
    raise AttributeError(name)
