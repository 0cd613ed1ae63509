"""Measuring an LM: end-task fine-tuning and scoring (`evaluator`), held-out perplexity (`perplexity`) and the
one table of run metrics that result files, the report and the gate read (`metrics`)."""
