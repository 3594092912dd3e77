"""A run's settings: every device-dependent choice resolved in one place (``device``) and every path and
number checked before any work (``checks``)."""
