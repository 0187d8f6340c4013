"""Evaluation: method-agnostic editing metrics and the lifelong-editing benchmark."""
from .editors import BASELINES, Editor, FineTune, FineTuneConfig, MethodSpec, NoEdit, PackEditor, make_editor
from .generation import greedy, greedy_batch, reaches
from .lifelong import LifelongConfig, LifelongRun, checkpoint_counts
from .metrics import (PairScores, counterfact_metrics, efficacy, generation_success, perplexity, score_pairs,
                      score_records, score_texts)

__all__ = [
    "BASELINES", "Editor", "FineTune", "FineTuneConfig", "LifelongConfig", "LifelongRun", "MethodSpec", "NoEdit",
    "PackEditor", "PairScores", "checkpoint_counts", "counterfact_metrics", "efficacy", "generation_success", "greedy",
    "greedy_batch", "make_editor", "perplexity", "reaches", "score_pairs", "score_records", "score_texts",
]
