"""Evaluation: evaluations producing per-image fields, the evaluation LightningModule and
the records it writes."""

from safespot.evaluation.evaluations import AttackEvaluation, Clean, Evaluation, PreemptiveEvaluation, image_seeds
from safespot.evaluation.module import EvaluationModule
from safespot.evaluation.records import merge_shards, summarize

__all__ = [
    "AttackEvaluation",
    "Clean",
    "Evaluation",
    "EvaluationModule",
    "PreemptiveEvaluation",
    "image_seeds",
    "merge_shards",
    "summarize",
]
