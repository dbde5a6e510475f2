"""Running Kronfluence 1.0.1 itself on a copy of a model, in float64 with the empirical Fisher."""

from __future__ import annotations

import copy
import logging

import torch


def kronfluence_task(task):
    """A fninfluence task as a Kronfluence 1.0.1 ``Task`` (every method delegated)."""
    from kronfluence.task import Task as KronfluenceTask

    class Adapter(KronfluenceTask):
        def compute_train_loss(self, batch, model, sample=False):
            return task.compute_train_loss(batch, model, sample=sample)

        def compute_measurement(self, batch, model):
            return task.compute_measurement(batch, model)

        def get_influence_tracked_modules(self):
            return task.get_influence_tracked_modules()

        def get_attention_mask(self, batch):
            return task.get_attention_mask(batch)

    return Adapter()


def kronfluence_scores(model, task, train, queries, strategy, damping, tmp_path, batch_size=4,
                       use_measurement=False):
    """``(pairwise [Q, N], self [N])`` as Kronfluence 1.0.1 computes them."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    wide = torch.float64
    kron_task = kronfluence_task(task)
    model = prepare_model(copy.deepcopy(model), kron_task)
    analyzer = Analyzer("parity", model=model, task=kron_task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path),
                        log_level=logging.WARNING)
    factor_args = FactorArguments(
        strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=wide,
        gradient_covariance_dtype=wide, eigendecomposition_dtype=wide, per_sample_gradient_dtype=wide,
        lambda_dtype=wide,
    )
    analyzer.fit_all_factors("f", train, per_device_batch_size=batch_size, factor_args=factor_args,
                             overwrite_output_dir=True)
    score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=wide, precondition_dtype=wide,
                                score_dtype=wide, use_measurement_for_self_influence=use_measurement)
    analyzer.compute_pairwise_scores("p", "f", queries, train, per_device_query_batch_size=batch_size,
                                     per_device_train_batch_size=batch_size, score_args=score_args,
                                     overwrite_output_dir=True)
    analyzer.compute_self_scores("s", "f", train, per_device_train_batch_size=batch_size, score_args=score_args,
                                 overwrite_output_dir=True)
    pairwise = analyzer.load_pairwise_scores("p")["all_modules"]
    self_scores = analyzer.load_self_scores("s")["all_modules"]
    return pairwise, self_scores
