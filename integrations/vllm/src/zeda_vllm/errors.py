"""One error type for every bad input: a single line saying what was received, what was expected and the fix."""

from __future__ import annotations


class ZedaVllmError(ValueError):
    """Raised for folders or serving setups the plugin cannot run correctly. ``str(err)`` is one line."""

    def __init__(self, received: str, *, expected: str, fix: str):
        self.received, self.expected, self.fix = received, expected, fix
        super().__init__(f"zeda-vllm: {received.rstrip('.')}; expected {expected.rstrip('.')}; fix: {fix.rstrip('.')}")
