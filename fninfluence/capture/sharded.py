"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``), run as they are.

Each rank of a sharded model holds a slice of every parameter (a ``DTensor``). While a unit runs forward, FSDP's
own pre-forward hook gathers its parameters and sets the full, unsharded tensors on its modules; they are
resharded after the forward pass and gathered again when the backward pass reaches the unit. The tap therefore
does not swap parameters in (``torch.func.functional_call`` would replace FSDP's tensors and break the model for
later training): the model is called directly, and a tracked weight is recognised by being the tensor its
module holds *at the time of the call* (:class:`CallTimeWeights`). Gradients are taken with the autograd engine
(``torch.func.grad`` is not used), with respect to the tap's probes and accumulators only: no parameter gradient
is computed or reduced, and the model's state is as before when a call returns.

Every forward pass gathers parameters with collectives, so all ranks must run the same sequence of forward and
backward passes: the run loop keeps them in lockstep (:func:`fninfluence.run.loop.run_pass`).
"""

from __future__ import annotations

import sys
from typing import Iterator, Optional, Sequence

from torch import nn

from ..errors import InfluenceError
from .layers import Target
from .tap import TrackedWeight


def _fsdp_classes(*names: str) -> tuple:
    # a model can only be FSDP-wrapped if torch.distributed.fsdp was imported; importing it here would cost
    # every call seconds
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return tuple(getattr(fsdp, name) for name in names if hasattr(fsdp, name))


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether some module of ``model`` is sharded with FSDP2 (``fully_shard``)."""
    kinds = _fsdp_classes("FSDPModule")
    return bool(kinds) and any(isinstance(m, kinds) for m in model.modules())


def check_shardable(model: nn.Module) -> None:
    """Refuse the sharded models the tap cannot run: FSDP1 wrappers, and DTensor parameters without FSDP2."""
    fsdp1 = _fsdp_classes("FullyShardedDataParallel")
    if fsdp1 and any(isinstance(m, fsdp1) for m in model.modules()):
        raise InfluenceError(
            "The model is wrapped in FullyShardedDataParallel (FSDP1), whose flat parameters hide the layers' "
            "weights. Shard it with torch.distributed.fsdp.fully_shard (FSDP2) instead, which fninfluence runs as "
            "it is, or gather the full weights into a plain copy (docs/distributed.md)."
        )
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and not is_fully_sharded(model) and any(isinstance(p, dtensor) for p in model.parameters()):
        raise InfluenceError(
            "The model's parameters are DTensors but it is not sharded with fully_shard (FSDP2): tensor-parallel "
            "layers are not supported. Shard it with fully_shard, or gather the full weights into a plain copy."
        )


def _attribute(model: nn.Module, name: Optional[str]):
    """``(module, attribute)`` of a parameter name such as ``"blocks.0.qkv.weight"`` (None: no parameter)."""
    if name is None:
        return None
    path, _, attribute = name.rpartition(".")
    return model.get_submodule(path), attribute


class CallTimeWeights:
    """The tracked layers' weights as their modules hold them now: iterated afresh at each tracked call, so that a
    layer's weight is the unsharded tensor FSDP put on its module for the forward pass of its unit."""

    at_call_time = True  # the tap iterates it at every call instead of keeping a snapshot

    def __init__(self, model: nn.Module, targets: Sequence[Target]):
        self._entries = [(t, _attribute(model, t.weight), _attribute(model, t.bias)) for t in targets]

    def __iter__(self) -> Iterator[TrackedWeight]:
        for target, (module, weight), bias in self._entries:
            yield TrackedWeight(target.layer, getattr(module, weight),
                                None if bias is None else getattr(bias[0], bias[1]), target.one_hot)
