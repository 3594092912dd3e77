"""Public path of ``generate`` (docs/CONTRACT.md); the code is in :mod:`llamalit.inference.generate`."""

from llamalit.inference.generate import generate, generate_stream

__all__ = ["generate", "generate_stream"]
