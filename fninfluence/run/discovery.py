"""The tap of one call: discovered once (on the first batch), restricted to each module partition's layers,
checked against the factors it will use."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .. import postprocess, sampling
from ..capture import ModelTap, batch_examples
from ..capture.stream import finite
from ..core.statistics import LayerStatistic, evaluate
from .data import Data
from ..errors import InfluenceError
from ..factors import Factors
from ..store import fingerprint
from .slices import first_batch


def discover(model, task, data: Data, batch_size: Optional[int], objective: str, amp_dtype, argument: str = "data",
             per_example: bool = False) -> ModelTap:
    """A :class:`ModelTap` whose layers and probes were found on the first batch of ``data`` for ``objective``."""
    tap = ModelTap(model, task, amp_dtype=amp_dtype, per_example=per_example)
    first = first_batch(data, batch_size, tap.device, argument)
    if objective == "train_sampled":  # a SeededTask's batches carry their examples' indices
        first = sampling.with_example_ids(first, 0, batch_examples(first), tap.device)
    tap.discover(objective, first)
    return tap


def gradient_stats(tap: ModelTap, objective: str, params, buffers, batch, probes):
    """:meth:`ModelTap.layer_stats` with the task's ``post_process_per_sample_gradient`` applied to the
    per-example gradients (:mod:`fninfluence.postprocess`); passes that read raw statistics call
    ``layer_stats`` itself."""
    loss, stats = tap.layer_stats(objective, params, buffers, batch, probes)
    post_process = postprocess.post_process_of(tap.task)
    if post_process is not None and tap.per_example:
        raise InfluenceError(
            "per_example_vmap=True runs each example alone, so post_process_per_sample_gradient would see "
            "per-example instead of per-row gradients. Drop per_example_vmap=True (or set the task's "
            "enable_post_process_per_sample_gradient = False)."
        )
    if post_process is not None:
        stats = postprocess.post_processed_stats(post_process, tap.specs, stats, batch)
    return loss, stats


def statistic_values(tap: ModelTap, objective: str, params, buffers, batch, probes,
                     statistics: Dict[str, LayerStatistic], post_processed: bool = True, into=None):
    """:meth:`ModelTap.layer_values`: each layer's statistic, streamed where it can be (``into``: see there). With
    the task's ``post_process_per_sample_gradient`` (and ``post_processed``), the statistics of every layer's
    post-processed per-example gradients instead, evaluated after the backward pass (the post-processing needs the
    gradients)."""
    if not post_processed or postprocess.post_process_of(tap.task) is None:
        return tap.layer_values(objective, params, buffers, batch, probes, statistics, into=into)
    loss, stats = gradient_stats(tap, objective, params, buffers, batch, probes)
    return (loss, {layer: evaluate(statistics[layer], s) for layer, s in stats.items()},
            {layer: finite(s) for layer, s in stats.items()})


def check_sharded_layout(tap: ModelTap, layout, ranks) -> None:
    """Refuse what a model sharded by ``fully_shard`` cannot do under several ranks: a store (cells resumed on one
    rank and not on another would put the ranks' forward passes, which are collectives, out of step)."""
    if tap.sharded and ranks is not None and layout.store is not None:
        raise InfluenceError(
            "A model sharded by fully_shard is analysed with every rank running the same forward and backward "
            "passes, which a store's resumed cells would break: run it without store= (the results come back in "
            "memory on every rank), or gather the full weights into a plain copy to use a store."
        )


def check_layers(factors: Factors, tap: ModelTap) -> None:
    """The factors cover the tap's layers with the same shapes and are complete, else an error saying so."""
    fitted = {name: spec.shape for name, spec in factors.layers.items() if name in tap.specs}
    here = {name: spec.shape for name, spec in tap.specs.items()}
    if fitted != here or not set(tap.specs) <= set(factors.layers):
        raise InfluenceError(
            f"The factors were fitted on layers { {n: s.shape for n, s in factors.layers.items()} }, but this model "
            f"and task track {here}. Fit factors with the same model and Task.tracked_modules()."
        )
    if not factors.complete:
        missing = [name for name in factors.pass_names if name not in factors.passes_done]
        raise InfluenceError(f"The factors are incomplete (passes {missing} missing): finish fit_factors first.")
    check_weights(factors, tap)


def check_weights(factors: Factors, tap: ModelTap) -> None:
    """The model's tracked weights are those the factors were fitted on (:attr:`Factors.weights_fingerprint`; two
    float64 sums per tracked parameter, one transfer), else an error naming the parameters that differ."""
    fitted = factors.weights_fingerprint
    if not fitted or tap.sharded:
        return
    names = [n for n in fingerprint.tracked_parameter_names(tap.specs) if n in fitted]
    now = fingerprint.weights_fingerprint(tap.params, names) or {}
    differ = fingerprint.weights_differences({n: fitted[n] for n in names}, now,
                                             {n: tap.params[n].numel() for n in names})
    if differ:
        first = next(iter(differ))
        shown = list(differ) if len(differ) <= 4 else list(differ)[:4] + [f"{len(differ) - 4} more"]
        raise InfluenceError(
            f"The factors were fitted on other weights than this model's: {shown} differ ({first}: {differ[first]}). "
            "Fit factors on this model, or, if you mean it (e.g. factors of an earlier checkpoint), pass "
            "factors.for_model(model) instead of factors."
        )


def factors_on(factors: Factors, tap: ModelTap) -> Dict[str, Dict[str, torch.Tensor]]:
    """Factors on the model's device, fetched once per call rather than per batch."""
    return {layer: {k: v.to(tap.device) for k, v in factors.tensors[layer].items()} for layer in tap.specs}
