"""Teacher-forced scoring with the Megatron model (``bolt score``)."""

from megatron_bolt.score.scorer import ScoreError, score_file, score_sequences

__all__ = ["ScoreError", "score_file", "score_sequences"]
