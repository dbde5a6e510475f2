"""The Task protocol: how to compute the training loss and the measurement for a batch.

It is shaped like Kronfluence's ``Task`` so that existing task code ports unchanged. The ``model``
a task receives is the user's own module; while fninfluence runs it, its parameters are swapped
for the ones being analysed through ``torch.func.functional_call`` (so ``model.config``, submodules
and custom methods keep working) and nothing is registered on or changed in it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

Mask = Optional[Union[torch.Tensor, Dict[str, torch.Tensor]]]


class Task:
    """Base class for an influence task. Subclass it the way you would subclass Kronfluence's Task.

    ``compute_train_loss`` must return the loss **summed** over the examples (and tokens) of the batch:
    per-example gradients are read off the gradient of that sum, so a mean would scale every score by
    the batch size. With ``sample=False`` it uses the labels in the batch (all that the default empirical-Fisher
    fit asks for); with ``sample=True`` (``fit_factors(use_empirical_fisher=False)``, the true Fisher) it must draw
    the labels from the model's own predictive distribution.
    """

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        raise NotImplementedError("Task.compute_train_loss(batch, model, sample=False) must be implemented.")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError(
            "Task.compute_measurement(batch, model) must be implemented to compute pairwise scores "
            "(a common choice is the training loss itself)."
        )

    def tracked_modules(self) -> Optional[List[str]]:
        """Names from ``model.named_modules()`` to analyse, or ``None`` for every supported layer.

        ``None`` leaves ``nn.Embedding`` layers out (their factors and query gradients are as large as the
        vocabulary); name an embedding here to track it. An embedding tied to an output layer (an LM head
        sharing its weight) cannot be tracked.
        """
        return None

    def get_influence_tracked_modules(self) -> Optional[List[str]]:
        """Kronfluence 1.0.1's name for :meth:`tracked_modules`; either may be overridden."""
        return self.tracked_modules()

    def get_attention_mask(self, batch: Any) -> Mask:
        """A ``[batch, tokens]`` mask of the tokens that count, or ``None``."""
        return None

    #: Set to ``True`` to have :meth:`post_process_per_sample_gradient` applied (as in Kronfluence).
    enable_post_process_per_sample_gradient: bool = False

    def post_process_per_sample_gradient(self, module_name: str, gradient: torch.Tensor) -> torch.Tensor:
        """Map a layer's per-row gradients ``[rows, out, in]`` to one per example, ``[batch, out, in]``.

        Called only when :attr:`enable_post_process_per_sample_gradient` is true, wherever a per-example
        gradient is formed (not in the covariance pass); see :mod:`fninfluence.postprocess`.
        """
        del module_name
        return gradient


class FunctionTask(Task):
    """A Task assembled from plain functions; see :func:`task_from_functions`."""

    def __init__(
        self,
        train_loss: Callable[..., torch.Tensor],
        measurement: Optional[Callable[[Any, nn.Module], torch.Tensor]] = None,
        tracked_modules: Optional[List[str]] = None,
        attention_mask: Optional[Callable[[Any], Mask]] = None,
    ):
        self._train_loss = train_loss
        self._measurement = measurement
        self._tracked_modules = None if tracked_modules is None else list(tracked_modules)
        self._attention_mask = attention_mask

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        return self._train_loss(batch, model, sample)

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        if self._measurement is None:
            return self._train_loss(batch, model, False)
        return self._measurement(batch, model)

    def tracked_modules(self) -> Optional[List[str]]:
        return self._tracked_modules

    def get_attention_mask(self, batch: Any) -> Mask:
        return None if self._attention_mask is None else self._attention_mask(batch)


def task_from_functions(
    train_loss: Callable[..., torch.Tensor],
    measurement: Optional[Callable[[Any, nn.Module], torch.Tensor]] = None,
    *,
    tracked_modules: Optional[List[str]] = None,
    attention_mask: Optional[Callable[[Any], Mask]] = None,
) -> Task:
    """Build a Task from functions.

    ``train_loss(batch, model, sample)`` returns the summed loss; ``measurement(batch, model)``
    returns the summed measurement and defaults to the training loss with the batch's labels.
    """
    return FunctionTask(train_loss, measurement, tracked_modules, attention_mask)


def classification_task(tracked_modules: Optional[List[str]] = None) -> Task:
    """A ready-made task for ``(inputs, labels)`` batches and a model returning class logits.

    Training loss: summed cross-entropy (labels sampled from the softmax when ``sample=True``).
    Measurement: minus the summed margin ``logit[y] - logsumexp(other logits)`` (a loss-like quantity, as in
    Kronfluence's examples), so a positive score means the training example raises the query's margin.
    """

    def train_loss(batch, model, sample):
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
        return nn.functional.cross_entropy(logits, labels, reduction="sum")

    def margin(batch, model):
        inputs, labels = batch
        logits = model(inputs)
        true_logit = logits.gather(-1, labels[:, None]).squeeze(-1)
        others = logits.masked_fill(nn.functional.one_hot(labels, logits.shape[-1]).bool(), float("-inf"))
        return -(true_logit - torch.logsumexp(others, dim=-1)).sum()

    return FunctionTask(train_loss, margin, tracked_modules)


def tracked_module_names(task: Any) -> Optional[List[str]]:
    """The task's tracked modules, asked by Kronfluence 1.0.1's name first and by the documented name next."""
    if hasattr(task, "get_influence_tracked_modules"):
        return task.get_influence_tracked_modules()
    if hasattr(task, "tracked_modules"):
        return task.tracked_modules()
    return None
