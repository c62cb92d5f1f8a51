"""Evaluation: few-shot prompts (prompts.py), answer checking (answers.py), local problem files (tasks.py),
the ``bolt eval`` runner (runner.py) and raw perplexity (perplexity.py)."""
