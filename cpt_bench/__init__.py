"""cpt-bench: a benchmark harness for continual pre-training (domain-adaptive MLM) of language models."""

__version__ = "0.1.0"
