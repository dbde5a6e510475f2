"""Earlier factors a fit pass does not read, held outside the device's memory while the pass runs.

A pass declares the earlier factors it reads (``FitPass.reads_factors``; None: all). The others, EKFAC's A and S
and their eigenvalues during the lambda pass, would otherwise sit beside the pass's accumulators and the model's
forward and backward pass and add to the fit's peak. :func:`set_aside` takes them out of the factors the pass is
given; :meth:`Aside.restore` puts them back once the pass has ended, bit for bit, in their places in each
layer's dict. Where they are meanwhile: a temporary file (deleted when it is closed) for factors on the CPU (in
memory, as before, if no temporary file can be written), CPU memory for factors on an accelerator.
"""

from __future__ import annotations

import tempfile
from typing import Dict, Mapping, Tuple

import torch

States = Dict[str, Dict[str, torch.Tensor]]


class Aside:
    """The factors set aside during one pass; :meth:`restore` gives the factors back with them in place."""

    def __init__(self, aside: States, order: Dict[str, Tuple[str, ...]]):
        self.order = order
        self.devices = {layer: {key: value.device for key, value in tensors.items()}
                        for layer, tensors in aside.items()}
        self.file = self.moved = None
        if not any(aside.values()):
            return
        if all(value.device.type == "cpu" for tensors in aside.values() for value in tensors.values()):
            try:
                self.file = tempfile.TemporaryFile()
                torch.save(aside, self.file)
                self.file.flush()
            except (OSError, RuntimeError):  # no temporary directory to write to, or it is full (torch.save's
                # zip writer reports a failed write as a RuntimeError): they stay where they are
                self.close()
                self.moved = aside
        else:
            self.moved = {layer: {key: value.to("cpu") for key, value in tensors.items()}
                          for layer, tensors in aside.items()}

    def _back(self) -> States:
        if self.file is not None:
            self.file.seek(0)
            try:
                held = torch.load(self.file, map_location="cpu", weights_only=True)
            finally:
                self.close()
        elif self.moved is not None:
            held, self.moved = self.moved, None
        else:
            return {}
        return {layer: {key: value.to(self.devices[layer][key]) for key, value in tensors.items()}  # no copy on the CPU
                for layer, tensors in held.items()}

    def restore(self, factors: States) -> States:
        """``factors`` (the pass's, with its outputs added) with the set-aside ones back, each layer's in the order
        its factors had before the pass, new outputs after them."""
        back = self._back()
        restored = {}
        for layer, tensors in factors.items():
            earlier = back.get(layer, {})
            order = self.order.get(layer, ())
            merged = {key: tensors[key] if key in tensors else earlier[key] for key in order
                      if key in tensors or key in earlier}  # an output of the pass replaces an earlier factor
            merged.update((key, value) for key, value in tensors.items() if key not in merged)
            restored[layer] = merged
        return restored

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def set_aside(factors: States, fit_passes: Mapping[str, object]) -> Tuple[States, Aside]:
    """``(the factors the pass reads, the others set aside)``: per layer, the earlier factors its pass (in
    ``fit_passes``; a layer without one keeps all of its factors) declares it reads."""
    kept, aside = {}, {}
    for layer, tensors in factors.items():
        fit_pass = fit_passes.get(layer)
        reads = (lambda key: True) if fit_pass is None else fit_pass.reads_factor
        kept[layer] = {key: value for key, value in tensors.items() if reads(key)}
        aside[layer] = {key: value for key, value in tensors.items() if not reads(key)}
    order = {layer: tuple(tensors) for layer, tensors in factors.items()}
    return kept, Aside({layer: tensors for layer, tensors in aside.items() if tensors}, order)
