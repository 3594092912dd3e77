"""Running a trained model: KV-cache decoding (``decode``, the C++ CPU kernel in ``kernels``), sampling
(``generate``), and evaluation (``evaluation``, ``adherence``)."""
