"""Evaluation: evaluations producing per-image fields, the evaluation LightningModule and
the records it writes."""

from safespot.evaluation.evaluations import (
    AttackEvaluation,
    CertifyEvaluation,
    Clean,
    Evaluation,
    PreemptiveEvaluation,
    predict_logits,
)
from safespot.evaluation.module import EvaluationModule
from safespot.evaluation.records import merge_shards, summarize
from safespot.evaluation.transfer import TransferEvaluation
from safespot.evaluation.votes import VoteSweep
from safespot.utils.rng import image_seeds

__all__ = [
    "AttackEvaluation",
    "CertifyEvaluation",
    "Clean",
    "Evaluation",
    "EvaluationModule",
    "PreemptiveEvaluation",
    "TransferEvaluation",
    "VoteSweep",
    "image_seeds",
    "merge_shards",
    "predict_logits",
    "summarize",
]
