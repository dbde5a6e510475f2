"""``torch.func.vmap`` over the user's model, with its failures explained.

Two paths run the model under ``vmap``: ``per_example_vmap=True`` (each example alone) and parameter layers (a
LayerNorm or a bare parameter named in ``Task.tracked_modules()``, whose per-example gradients are
``vmap(grad(...))``). Model code that reads a tensor's value in Python (``if mask.all():``, ``.item()``,
``.tolist()``), or calls an op without a batching rule, fails there with torch's own ``RuntimeError``, deep inside the
model. :func:`run_vmapped` turns that into an :class:`InfluenceError` that says which path needed vmap, which module
and which line of code failed, and what to do instead; the original error is kept as ``__cause__``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from ..errors import InfluenceError

_VMAP_MESSAGES = ("vmap", "data-dependent", "batching rule", "batchedtensor", "doesn't have storage",
                  "functorch")
_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep)

HUGGING_FACE_MASK = (
    "Hugging Face models check their attention mask with Python control flow: pass attention_mask as a 4-D float "
    "mask, e.g. (1 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min, which they use as it is (for a "
    "causal model, combine it with the causal mask: see the FAQ)."
)


def is_vmap_error(error: BaseException) -> bool:
    """Whether ``error`` is one of torch's own refusals under ``vmap`` (not an error of the user's code)."""
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(key in message for key in _VMAP_MESSAGES)


def _ours(filename: str) -> bool:
    return any(filename.startswith(directory) for directory in _LIBRARY_DIRS) or filename.startswith("<")


def where(error: BaseException, model: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """``(module, code)``: the innermost module of ``model`` running when ``error`` was raised (``'bert.encoder'
    (BertEncoder)``) and the innermost line outside torch and fninfluence (``transformers/masking_utils.py:354 in
    _ignore_bidirectional_mask_sdpa``); None where not found."""
    names = {id(module): name for name, module in model.named_modules()}
    module, code = None, None
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            module = f"{names[id(owner)] or '(the model itself)'!r} ({type(owner).__name__})"
        filename = frame.f_code.co_filename
        if not _ours(filename):
            short = os.sep.join(filename.split(os.sep)[-2:])
            code = f"{short}:{traceback.tb_lineno} in {frame.f_code.co_name}"
        traceback = traceback.tb_next
    return module, code


def explained(error: BaseException, model: nn.Module, why: str, instead: str) -> InfluenceError:
    """The :class:`InfluenceError` for a vmap failure ``error``: ``why`` says what ran under vmap, ``instead`` the way
    out."""
    module, code = where(error, model)
    place = " at ".join(part for part in (f"module {module}" if module else None, code) if part) or "the model"
    message = str(error).strip()
    if "data-dependent" in message or ".item()" in message:
        what = "reads a tensor's value in Python (if x.any():, .item(), .tolist()), which vmap cannot run"
    else:
        first = message.splitlines()[0] if message else type(error).__name__
        what = f"fails under vmap ({first[:157] + '...' if len(first) > 160 else first})"
    hint = f" {HUGGING_FACE_MASK}" if code and "transformers" in code and "mask" in code.lower() else ""
    return InfluenceError(f"{why}, and {place} {what}. {instead}{hint}")


def run_vmapped(fn: Callable[..., Any], args: Tuple, model: nn.Module, why: str, instead: str) -> Any:
    """``fn(*args)`` (a vmapped function), with a vmap failure raised as :func:`explained` (eagerly; under
    ``torch.compile`` the call is left alone)."""
    if torch.compiler.is_compiling():
        return fn(*args)
    try:
        return fn(*args)
    except RuntimeError as error:
        if not is_vmap_error(error):
            raise
        raise explained(error, model, why, instead) from error
