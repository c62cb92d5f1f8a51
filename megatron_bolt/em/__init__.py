"""The EM loop: warm start, then E-step / M-step iterations (quickstart is its tiny CPU instance)."""
