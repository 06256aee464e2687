"""``zeda eval``: quality (held-out NLL, KL and agreement with the original), routing and expert FLOPs of a
model, or of a training-free baseline on the static one."""

from .run import run_eval

__all__ = ["run_eval"]
