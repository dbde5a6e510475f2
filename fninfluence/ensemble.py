"""Checkpoint ensembles: fit and score over several checkpoints and combine the scores.

    scores = ensemble_pairwise_scores([model_a, model_b], task, query_data, train_data)          # [Q, N], mean
    scores = ensemble_pairwise_scores(state_dicts, task, query_data, train_data, model=template)  # the same
    stack = ensemble_pairwise_scores(checkpoints, task, query_data, train_data, combine=None)    # [K, Q, N]

For each checkpoint ``k`` the factors are fitted with :func:`fninfluence.fit_factors` (on the training data) and the
scores computed with :func:`fninfluence.pairwise_scores` (or :func:`fninfluence.self_scores`), each checkpoint with
its own factors; then ``combine="mean"`` (default) averages the K score tensors, ``"sum"`` adds them, ``None``
returns them stacked on a new first axis. With ``store=DIR`` checkpoint ``k`` keeps its factors in
``DIR/checkpoint-{k}/factors`` and its scores in ``DIR/checkpoint-{k}/scores`` (ordinary fninfluence stores), and
``DIR/ensemble.json`` records the checkpoints (count and model fingerprints), so a killed run resumes (complete
checkpoints are read back, not recomputed) and a store of other checkpoints is refused.
:func:`read_ensemble_scores` reads such a store back.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import InfluenceError
from .pipeline import fit_factors, pairwise_scores, self_scores
from .store.fingerprint import model_fingerprint
from .store.scores_store import read_scores
from .task import Task

__all__ = ["ensemble_pairwise_scores", "ensemble_self_scores", "read_ensemble_scores", "EnsembleScores"]

COMBINES = ("mean", "sum", None)
MANIFEST = "ensemble.json"
MANIFEST_FORMAT = 1
#: keywords of the scoring call that the fit gets too (unless ``factors_kwargs`` sets them)
SHARED = ("batch_size", "compile", "progress", "precision", "per_example_vmap", "distributed")

Checkpoint = Union[nn.Module, Mapping[str, torch.Tensor], str, Path]
Scores = Union[torch.Tensor, Dict[str, torch.Tensor]]


class EnsembleScores(NamedTuple):
    """What :func:`read_ensemble_scores` returns: the combined scores, the ``[K, ...]`` stack, the combine rule."""

    combined: torch.Tensor
    per_checkpoint: torch.Tensor
    combine: Optional[str]


# -- checkpoints -------------------------------------------------------------------------------------

def _check_combine(combine) -> None:
    if combine not in COMBINES:
        raise InfluenceError(f"combine={combine!r} is not a combine rule: use 'mean' (the default), 'sum', or None "
                             "for the per-checkpoint stack [K, ...].")


def _signature(model: nn.Module) -> List[Tuple[str, Tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def _checkpoints(checkpoints: Sequence[Checkpoint], model: Optional[nn.Module]) -> Iterator[nn.Module]:
    """Each checkpoint as a model, one at a time: a module as given, a state dict (or a path to one saved with
    ``torch.save``) loaded strictly into a copy of ``model``; every checkpoint must have the first one's parameter
    names and shapes."""
    first = None
    for k, checkpoint in enumerate(checkpoints):
        if isinstance(checkpoint, nn.Module):
            current = checkpoint
        else:
            if model is None:
                raise InfluenceError(f"checkpoint {k} is a {type(checkpoint).__name__}, not a model: pass the "
                                     "architecture as model=<an nn.Module> to load state dicts (or paths to them) "
                                     "into, or pass the checkpoints as models.")
            state = checkpoint
            if isinstance(checkpoint, (str, os.PathLike)):
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if not isinstance(state, Mapping):
                raise InfluenceError(f"checkpoint {k} is a {type(state).__name__}: pass models, state dicts "
                                     "(name -> tensor) or paths to saved state dicts.")
            current = copy.deepcopy(model)
            try:
                current.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise InfluenceError(f"checkpoint {k} does not fit model= (different parameter names or shapes): "
                                     f"{error}. Every checkpoint must be of the same architecture.") from None
        signature = _signature(current)
        if first is None:
            first = signature
        elif signature != first:
            ours, theirs = dict(first), dict(signature)
            diff = sorted(set(ours) ^ set(theirs)) or [n for n in ours if ours[n] != theirs[n]]
            detail = ", ".join(f"{n}: {ours.get(n)} vs {theirs.get(n)}" for n in diff[:3])
            raise InfluenceError(f"checkpoint {k} has another architecture than checkpoint 0 (parameter names or "
                                 f"shapes differ: {detail}). An ensemble combines checkpoints of one architecture.")
        yield current


def _materialise(checkpoints, model) -> Sequence[Checkpoint]:
    if isinstance(checkpoints, (nn.Module, Mapping, str, os.PathLike)) or not isinstance(checkpoints, Sequence):
        raise InfluenceError("checkpoints must be a sequence (list or tuple) of models, state dicts or paths, e.g. "
                             "[model_a, model_b]; got a single " + type(checkpoints).__name__ + ".")
    if len(checkpoints) == 0:
        raise InfluenceError("checkpoints is empty: pass at least one model (or state dict with model=).")
    return checkpoints


# -- the store's manifest ----------------------------------------------------------------------------

def _manifest(kind: str, fingerprints: List[str], combine, strategy) -> Dict[str, Any]:
    return {"kind": "ensemble", "format": MANIFEST_FORMAT, "scores": kind, "checkpoints": len(fingerprints),
            "combine": combine, "strategy": strategy if isinstance(strategy, str) else repr(strategy),
            "models_sha256": fingerprints,
            "layout": {"factors": "checkpoint-{k}/factors", "scores": "checkpoint-{k}/scores"}}


def _read_manifest(root: Path) -> Dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InfluenceError(f"{root} is not a checkpoint-ensemble store (no {MANIFEST}).") from None
    except (OSError, ValueError) as error:
        raise InfluenceError(f"{path} could not be read ({error}): recompute the ensemble (overwrite=True).") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "ensemble":
        raise InfluenceError(f"{path} is not a checkpoint-ensemble manifest: recompute the ensemble (overwrite=True).")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InfluenceError(f"{path} is of ensemble format {manifest.get('format')!r}; this version reads format "
                             f"{MANIFEST_FORMAT}. Recompute it (overwrite=True).")
    return manifest


def _write_json(path: Path, value: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a killed run leaves the old manifest or the new one


def _open_store(root: Path, manifest: Dict[str, Any], overwrite: bool) -> None:
    """Check ``root`` holds this ensemble (or nothing), then write the manifest (its combine rule may change)."""
    root.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        if (root / MANIFEST).exists():
            old = _read_manifest(root)
            for key, what in (("scores", "scores of another kind"), ("checkpoints", "another number of checkpoints"),
                              ("models_sha256", "other checkpoints (model weights)")):
                if old.get(key) != manifest[key]:
                    changed = ""
                    if key == "models_sha256" and isinstance(old.get(key), list):
                        changed = " (checkpoints " + ", ".join(
                            str(k) for k, (a, b) in enumerate(zip(old[key], manifest[key])) if a != b) + " differ)"
                    raise InfluenceError(
                        f"{root} holds an ensemble of {what}{changed}: its manifest says {key}={_short(old.get(key))}"
                        f", this call has {_short(manifest[key])}. Pass overwrite=True to recompute it, or another "
                        "store directory.")
        elif any(root.iterdir()):
            raise InfluenceError(f"{root} is not empty and has no {MANIFEST}: it is not a checkpoint-ensemble store. "
                                 "Pass another directory, or overwrite=True to use it anyway.")
    else:  # drop the checkpoints of a larger ensemble that this one does not have
        for child in root.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", child.name)
            if match and int(match.group(1)) >= manifest["checkpoints"] and child.is_dir():
                shutil.rmtree(child)
    _write_json(root / MANIFEST, manifest)


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v)[:12] for v in value) + "]"
    return repr(value)


# -- combining ---------------------------------------------------------------------------------------

def _combine(results: List[Scores], combine) -> Scores:
    if isinstance(results[0], dict):
        return {key: _combine([r[key] for r in results], combine) for key in results[0]}
    stack = torch.stack(results)
    if combine is None:
        return stack
    return stack.sum(0) if combine == "sum" else stack.mean(0)


class _Options(NamedTuple):
    """The keywords of an ensemble call that shape the whole run."""

    strategy: Any
    combine: Optional[str]
    store: Optional[Union[str, Path]]
    overwrite: bool
    factors_kwargs: Optional[Dict[str, Any]]
    score_kwargs: Dict[str, Any]


def _run(kind: str, checkpoints, model, task: Task, fit_data, score, options: _Options) -> Optional[Scores]:
    strategy, combine, store, overwrite, factors_kwargs, score_kwargs = options
    _check_combine(combine)
    checkpoints = _materialise(checkpoints, model)
    fit_kwargs = {key: score_kwargs[key] for key in SHARED if key in score_kwargs}
    fit_kwargs.update(factors_kwargs or {})
    for key in ("store", "overwrite", "strategy"):
        if key in fit_kwargs:
            raise InfluenceError(f"factors_kwargs may not set {key!r}: pass it to the ensemble call itself.")
    root = None if store is None else Path(store)
    if root is not None:
        fingerprints = [model_fingerprint(m)["values_sha256"] for m in _checkpoints(checkpoints, model)]
        _open_store(root, _manifest(kind, fingerprints, combine, strategy), overwrite)
    results: List[Optional[Scores]] = []
    for k, current in enumerate(_checkpoints(checkpoints, model)):
        where = None if root is None else root / f"checkpoint-{k}"
        factors = fit_factors(current, task, fit_data, strategy=strategy,
                              store=None if where is None else where / "factors", overwrite=overwrite, **fit_kwargs)
        if factors is None:  # a partial (targeted) fit: the scores wait for it
            results.append(None)
            continue
        stored = {} if where is None else dict(store=where / "scores", overwrite=overwrite)
        results.append(score(current, factors, **stored))
    if any(r is None for r in results):
        return None
    return _combine(results, combine)


def ensemble_pairwise_scores(
    checkpoints: Sequence[Checkpoint],
    task: Task,
    query_data,
    train_data,
    *,
    model: Optional[nn.Module] = None,
    strategy="ekfac",
    combine: Optional[str] = "mean",
    store: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    factors_kwargs: Optional[Dict[str, Any]] = None,
    **score_kwargs,
) -> Optional[Scores]:
    """Pairwise scores ``[Q, N]`` of a checkpoint ensemble: each checkpoint's own factors and scores, combined.

    ``checkpoints``: models, or state dicts (or paths to ``torch.save``'d state dicts) with ``model=`` the
    architecture they are loaded into (a copy of it, strictly: the same parameter names and shapes). Each checkpoint
    gets ``fit_factors(checkpoint, task, train_data, strategy=strategy, **factors_kwargs)`` and
    ``pairwise_scores(checkpoint, task, factors, query_data, train_data, **score_kwargs)``; ``batch_size``,
    ``compile``, ``progress``, ``precision``, ``per_example_vmap`` and ``distributed`` of ``score_kwargs`` go to the
    fit too unless ``factors_kwargs`` sets them. ``combine``: ``"mean"`` (``sum_k scores_k / K``, default), ``"sum"``
    or ``None`` (the stack ``[K, Q, N]``); with ``per_module=True`` each layer is combined alike.

    ``store=DIR``: ``DIR/checkpoint-{k}/factors`` and ``DIR/checkpoint-{k}/scores`` and the manifest
    ``DIR/ensemble.json``; rerunning the same call resumes (finished checkpoints are read back), a store of other
    checkpoints is refused unless ``overwrite=True`` (which recomputes everything). Returns None while a store's cells
    are missing (targeted partitions), as the pipeline does.
    """
    def score(current, factors, **stored):
        return pairwise_scores(current, task, factors, query_data, train_data, **score_kwargs, **stored)

    options = _Options(strategy, combine, store, overwrite, factors_kwargs, score_kwargs)
    return _run("pairwise", checkpoints, model, task, train_data, score, options)


def ensemble_self_scores(
    checkpoints: Sequence[Checkpoint],
    task: Task,
    data,
    *,
    model: Optional[nn.Module] = None,
    strategy="ekfac",
    combine: Optional[str] = "mean",
    store: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    factors_kwargs: Optional[Dict[str, Any]] = None,
    **score_kwargs,
) -> Optional[Scores]:
    """Self-influence ``[N]`` of a checkpoint ensemble (``[K, N]`` with ``combine=None``): as
    :func:`ensemble_pairwise_scores`, with factors fitted on ``data`` and :func:`fninfluence.self_scores`."""
    def score(current, factors, **stored):
        return self_scores(current, task, factors, data, **score_kwargs, **stored)

    options = _Options(strategy, combine, store, overwrite, factors_kwargs, score_kwargs)
    return _run("self", checkpoints, model, task, data, score, options)


def read_ensemble_scores(store: Union[str, Path], combine: Optional[str] = "manifest",
                         module: str = "all_modules") -> EnsembleScores:
    """The scores of a complete ensemble store: ``(combined, per_checkpoint [K, ...], combine)``.

    ``combine="manifest"`` (default) uses the rule the store was written with; ``"mean"``, ``"sum"`` or ``None``
    (``combined`` is then the stack too) override it. ``module`` picks a layer of a ``per_module=True`` store."""
    root = Path(store)
    manifest = _read_manifest(root)
    if combine == "manifest":
        combine = manifest.get("combine")
    _check_combine(combine)
    stack = []
    for k in range(int(manifest["checkpoints"])):
        scores = read_scores(root / f"checkpoint-{k}" / "scores")
        if module not in scores:
            raise InfluenceError(f"{root}/checkpoint-{k}/scores has no scores of {module!r}: it has "
                                 f"{sorted(scores)}.")
        stack.append(scores[module])
    per_checkpoint = torch.stack(stack)
    return EnsembleScores(_combine(stack, combine), per_checkpoint, combine)
