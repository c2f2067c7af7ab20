"""
The benchmark harness: a fast fake upstream, load drivers, and a runner that
measures direct, twisted-forward and openai-forward side by side in one run.

Run everything with ``python -m bench`` (``--help`` for the knobs,
``--quick`` for a few-second smoke run).
"""
