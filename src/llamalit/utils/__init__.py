"""Helpers every layer uses: atomic file writes (``fileio``), Hub ids (``hub``), benchmark plumbing
(``benchutil``)."""
