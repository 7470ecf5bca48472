"""Load generator and side-by-side comparison of server configurations.

Speaks HTTP only (OpenAI-compatible ``/v1/completions`` and Prometheus ``/metrics``),
so it measures engram-serve exactly as a client sees it, and other servers alike.
``python -m loadtest run`` drives a running server; ``python -m loadtest compare``
starts engram-serve per configuration and reports ratios over interleaved rounds.
"""
