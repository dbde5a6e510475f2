"""Kronfluence 1.0.1's public API, as a thin shell over fninfluence's native functions.

Change the imports of a Kronfluence script and it runs on fninfluence::

    from fninfluence.compat.kronfluence import (Analyzer, DataLoaderKwargs, FactorArguments, ScoreArguments,
                                                Task, prepare_model)

The classes and functions here have Kronfluence 1.0.1's names, signatures, defaults and semantics. They
compute nothing themselves: every factor and score comes from :func:`fninfluence.fit_factors`,
:func:`fninfluence.pairwise_scores` or :func:`fninfluence.self_scores`, with the Kronfluence arguments
translated to native keywords and each factors / scores name backed by a native Zarr store:

    <output_dir>/<analysis_name>/factors_<factors_name>/   a factors store (fit_factors(store=...))
    <output_dir>/<analysis_name>/scores_<scores_name>/     a scores store (pairwise_scores / self_scores(store=...))

Next to the arrays each store holds ``factor_arguments.json`` (and, for scores, ``score_arguments.json`` and
``kronfluence_compat.json``) with the Kronfluence arguments it was computed with. The deliberate differences
from Kronfluence (fresh computations return their scores, a rerun with other arguments is an error, ...)
are listed in docs/migrating-from-kronfluence.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from .. import pipeline
from ..curvature import get_estimator
from ..run.ranks import unwrap
from ..errors import InfluenceError
from ..factors import Factors
from ..partitions import Cell
from ..precision import Precision
from ..store.names import check_name, child
from ..store.scores_store import read_scores
from ..store.zarr_io import is_store, remove_store
from ..task import Task as _NativeTask
from ..task import tracked_module_names

__all__ = [
    "Analyzer", "prepare_model", "FactorArguments", "ScoreArguments", "Task", "DataLoaderKwargs", "Arguments",
    "FactorsNotFoundError", "TrackedModuleNotFoundError", "IllegalTaskConfigurationError",
    "UnsupportableModuleError", "FACTOR_TYPE", "SCORE_TYPE", "ALL_MODULE_NAME", "KRONFLUENCE_VERSION",
]

KRONFLUENCE_VERSION = "1.0.1"
FACTOR_TYPE = Dict[str, Dict[str, torch.Tensor]]
SCORE_TYPE = Dict[str, torch.Tensor]
ALL_MODULE_NAME = "all_modules"

FACTOR_ARGUMENTS_FILE = "factor_arguments.json"
SCORE_ARGUMENTS_FILE = "score_arguments.json"
SCORES_INFO_FILE = "kronfluence_compat.json"
MODEL_FINGERPRINT_FILE = "model_fingerprint.json"

COVARIANCE_FACTOR_NAMES = ("activation_covariance", "gradient_covariance", "num_activation_covariance_processed",
                           "num_gradient_covariance_processed")
EIGENDECOMPOSITION_FACTOR_NAMES = ("activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors",
                                   "gradient_eigenvalues")
LAMBDA_FACTOR_NAMES = ("lambda_matrix", "num_lambda_processed")

logger = logging.getLogger(__name__)


# -- errors (Kronfluence's exception names; all are InfluenceError, hence ValueError) ------------------

class FactorsNotFoundError(InfluenceError):
    """The factors a computation needs have not been fitted (or are incomplete)."""


class TrackedModuleNotFoundError(InfluenceError):
    """No tracked module was found."""


class IllegalTaskConfigurationError(InfluenceError):
    """The task names modules that do not exist or cannot be tracked, or asks for an unsupported feature."""


class UnsupportableModuleError(InfluenceError, NotImplementedError):
    """A module type that cannot be tracked."""


# -- arguments -------------------------------------------------------------------------------------

@dataclass
class Arguments:
    """Base of :class:`FactorArguments` and :class:`ScoreArguments`."""

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a dict (a deep copy), with every ``torch.dtype`` written as a string."""
        values = copy.deepcopy(self.__dict__)
        return {key: str(value) if isinstance(value, torch.dtype) else value for key, value in values.items()}

    def to_str_dict(self) -> Dict[str, str]:
        """The fields as a dict of strings."""
        return {key: str(value) for key, value in copy.deepcopy(self.__dict__).items()}


@dataclass
class FactorArguments(Arguments):
    """How factors are fitted (Kronfluence 1.0.1's fields and defaults).

    Maps to :func:`fninfluence.fit_factors`: ``strategy``, ``use_empirical_fisher``; ``*_max_examples`` ->
    ``max_examples``; ``*_data_partitions`` / ``*_module_partitions`` -> ``data_partitions`` /
    ``module_partitions`` (per pass); the dtypes and ``amp_dtype`` -> :class:`fninfluence.precision.Precision`
    (one covariance dtype, the wider of the activation and gradient ones). ``amp_scale``,
    ``has_shared_parameters`` (reused layers are always handled exactly), ``eigendecomposition_dtype``
    (always at least float64), ``use_iterative_lambda_aggregation`` and ``offload_activations_to_cpu`` (memory
    only) are accepted and recorded but change nothing.
    """

    strategy: str = field(default="ekfac", metadata={"help": "identity, diagonal, kfac or ekfac."})
    use_empirical_fisher: bool = field(default=False, metadata={"help": "Use the batch's labels (True) or "
                                                                        "labels sampled from the model (False)."})
    amp_dtype: Optional[torch.dtype] = field(default=None, metadata={"help": "Autocast dtype; None disables it."})
    amp_scale: float = field(default=2.0**16, metadata={"help": "Accepted for compatibility; no loss scaling."})
    has_shared_parameters: bool = field(default=False, metadata={"help": "Accepted; reuse is always exact."})

    covariance_max_examples: Optional[int] = field(default=100_000, metadata={"help": "First examples used."})
    covariance_data_partitions: int = field(default=1, metadata={"help": "Data partitions of the covariance pass."})
    covariance_module_partitions: int = field(default=1, metadata={"help": "Module partitions of the pass."})
    activation_covariance_dtype: torch.dtype = field(default=torch.float32, metadata={"help": "A accumulator."})
    gradient_covariance_dtype: torch.dtype = field(default=torch.float32, metadata={"help": "S accumulator."})

    eigendecomposition_dtype: torch.dtype = field(default=torch.float64, metadata={"help": "Always >= float64."})

    lambda_max_examples: Optional[int] = field(default=100_000, metadata={"help": "First examples used."})
    lambda_data_partitions: int = field(default=1, metadata={"help": "Data partitions of the Lambda pass."})
    lambda_module_partitions: int = field(default=1, metadata={"help": "Module partitions of the Lambda pass."})
    use_iterative_lambda_aggregation: bool = field(default=False, metadata={"help": "Memory only; accepted."})
    offload_activations_to_cpu: bool = field(default=False, metadata={"help": "Memory only; accepted."})
    per_sample_gradient_dtype: torch.dtype = field(default=torch.float32, metadata={"help": "Per-example grads."})
    lambda_dtype: torch.dtype = field(default=torch.float32, metadata={"help": "Lambda accumulator."})

    def __post_init__(self) -> None:
        for name in ("covariance_max_examples", "lambda_max_examples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"FactorArguments.{name} must be None (all examples) or a positive number, "
                                 f"got {value!r}.")
        for name in ("covariance_data_partitions", "covariance_module_partitions", "lambda_data_partitions",
                     "lambda_module_partitions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FactorArguments.{name} must be a positive number, got {getattr(self, name)!r}.")


@dataclass
class ScoreArguments(Arguments):
    """How scores are computed (Kronfluence 1.0.1's fields and defaults).

    Maps to :func:`fninfluence.pairwise_scores` / :func:`fninfluence.self_scores`: ``damping_factor`` ->
    ``damping`` (None: 0.1 x mean Lambda per module); ``compute_per_module_scores`` -> ``per_module``;
    ``compute_per_token_scores`` -> ``per_token`` with ``conv_tokens=False`` (as in Kronfluence, conv layers have no
    per-token scores, and without any layer with tokens the scores are ``[Q, N]``); ``query_gradient_low_rank`` ->
    ``query_rank``;
    ``use_full_svd`` -> ``full_svd``; ``aggregate_query_gradients`` / ``aggregate_train_gradients`` ->
    ``aggregate_queries`` / ``aggregate_train``; ``query_gradient_accumulation_steps`` -> ``queries_per_pass``
    (= query batch size x steps); ``use_measurement_for_self_influence`` -> ``use_measurement``; partitions
    as in :class:`FactorArguments`; the dtypes and ``amp_dtype`` -> :class:`fninfluence.precision.Precision`.
    ``offload_activations_to_cpu`` only changes memory: accepted and recorded.
    """

    damping_factor: Optional[float] = field(default=1e-08, metadata={"help": "None: 0.1 x mean(Lambda)."})
    amp_dtype: Optional[torch.dtype] = field(default=None, metadata={"help": "Autocast dtype; None disables it."})
    offload_activations_to_cpu: bool = field(default=False, metadata={"help": "Memory only; accepted."})

    data_partitions: int = field(default=1, metadata={"help": "Partitions of the training data."})
    module_partitions: int = field(default=1, metadata={"help": "Partitions of the tracked modules."})

    compute_per_module_scores: bool = field(default=False, metadata={"help": "One score tensor per module."})
    compute_per_token_scores: bool = field(default=False, metadata={"help": "[Q, N, T] pairwise scores."})

    query_gradient_accumulation_steps: int = field(default=1, metadata={"help": "Query batches per pass."})
    query_gradient_low_rank: Optional[int] = field(default=None, metadata={"help": "Rank of query gradients."})
    use_full_svd: bool = field(default=False, metadata={"help": "Exact SVD instead of torch.svd_lowrank."})
    aggregate_query_gradients: bool = field(default=False, metadata={"help": "Sum the query gradients."})
    aggregate_train_gradients: bool = field(default=False, metadata={"help": "Sum the training gradients."})

    use_measurement_for_self_influence: bool = field(default=False, metadata={"help": "Self scores with f."})

    query_gradient_svd_dtype: torch.dtype = field(default=torch.float32, metadata={"help": "SVD dtype."})
    per_sample_gradient_dtype: torch.dtype = field(default=torch.float32, metadata={"help": "Per-example grads."})
    precondition_dtype: torch.dtype = field(default=torch.float32, metadata={"help": "Preconditioning dtype."})
    score_dtype: torch.dtype = field(default=torch.float32, metadata={"help": "Score dtype."})

    def __post_init__(self) -> None:
        if self.damping_factor is not None and self.damping_factor < 0:
            raise ValueError(f"ScoreArguments.damping_factor must be None or non-negative, got {self.damping_factor!r}.")
        for name in ("data_partitions", "module_partitions", "query_gradient_accumulation_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ScoreArguments.{name} must be a positive number, got {getattr(self, name)!r}.")
        if self.query_gradient_low_rank is not None and self.query_gradient_low_rank <= 0:
            raise ValueError("ScoreArguments.query_gradient_low_rank must be None or a positive number, got "
                             f"{self.query_gradient_low_rank!r}.")


@dataclass
class DataLoaderKwargs:
    """Extra ``torch.utils.data.DataLoader`` arguments (Kronfluence 1.0.1's fields and defaults).

    Loaders are always sequential (no shuffling) with ``drop_last=False``; these fields are added to them.
    """

    num_workers: int = 0
    collate_fn: Optional[Callable] = None
    pin_memory: bool = False
    timeout: int = 0
    worker_init_fn: Optional[Callable] = None
    multiprocessing_context: Optional[Any] = None
    generator: Optional[torch.Generator] = None
    prefetch_factor: Optional[int] = None
    persistent_workers: bool = False
    pin_memory_device: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -- Task and prepare_model --------------------------------------------------------------------------

class Task(_NativeTask):
    """fninfluence's :class:`~fninfluence.Task` with Kronfluence's extra attributes.

    ``compute_train_loss(batch, model, sample=False)`` (summed), ``compute_measurement(batch, model)``,
    ``get_influence_tracked_modules()`` (or ``tracked_modules()``) and ``get_attention_mask(batch)`` work
    as in Kronfluence, and so does ``post_process_per_sample_gradient`` when
    ``enable_post_process_per_sample_gradient = True`` (see :mod:`fninfluence.postprocess`).
    """

    enable_post_process_per_sample_gradient: bool = False

    def post_process_per_sample_gradient(self, module_name: str, gradient: torch.Tensor) -> torch.Tensor:
        return gradient


def _check_task(model: nn.Module, task: Any) -> None:
    """The task's tracked modules exist in ``model`` and can be tracked; no unsupported task feature is on."""
    from ..capture.layers import resolve_targets

    model, task = unwrap(model, task)  # a DistributedDataParallel model, names with or without "module."
    try:
        resolve_targets(model, tracked_module_names(task))
    except InfluenceError as error:
        raise IllegalTaskConfigurationError(str(error)) from error


def prepare_model(model: nn.Module, task: Task) -> nn.Module:
    """Check ``task``'s tracked modules on ``model``, put the model in eval mode and return it.

    Unlike Kronfluence, the model is not wrapped and nothing is registered on it: the same object is
    returned, and ``requires_grad`` flags are left as they are (fninfluence never reads them).
    """
    _check_task(model, task)
    model.eval()
    return model


# -- helpers ---------------------------------------------------------------------------------------

def _as_dtype(value: Any, what: str) -> Optional[torch.dtype]:
    """A ``torch.dtype`` from a dtype or its string (``"torch.float32"``, as saved in the arguments JSON)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.split(".")[-1], None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise InfluenceError(f"{what} must be a torch.dtype, got {value!r}.")


def _factor_precision(args: FactorArguments) -> Precision:
    activation = _as_dtype(args.activation_covariance_dtype, "activation_covariance_dtype")
    gradient = _as_dtype(args.gradient_covariance_dtype, "gradient_covariance_dtype")
    return Precision(
        amp_dtype=_as_dtype(args.amp_dtype, "amp_dtype"),
        covariance_dtype=torch.promote_types(activation, gradient),
        lambda_dtype=_as_dtype(args.lambda_dtype, "lambda_dtype"),
        per_sample_gradient_dtype=_as_dtype(args.per_sample_gradient_dtype, "per_sample_gradient_dtype"),
    )


def _score_precision(args: ScoreArguments) -> Precision:
    return Precision(
        amp_dtype=_as_dtype(args.amp_dtype, "amp_dtype"),
        per_sample_gradient_dtype=_as_dtype(args.per_sample_gradient_dtype, "per_sample_gradient_dtype"),
        precondition_dtype=_as_dtype(args.precondition_dtype, "precondition_dtype"),
        score_dtype=_as_dtype(args.score_dtype, "score_dtype"),
        svd_dtype=_as_dtype(args.query_gradient_svd_dtype, "query_gradient_svd_dtype"),
    )


def _fit_keywords(args: FactorArguments) -> Dict[str, Any]:
    return dict(
        strategy=args.strategy,
        use_empirical_fisher=args.use_empirical_fisher,
        max_examples={"covariance": args.covariance_max_examples, "lambda": args.lambda_max_examples},
        data_partitions={"covariance": args.covariance_data_partitions, "lambda": args.lambda_data_partitions},
        module_partitions={"covariance": args.covariance_module_partitions, "lambda": args.lambda_module_partitions},
        precision=_factor_precision(args),
    )


def _arguments_from_json(cls, values: Dict[str, Any]):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            continue
        if key.endswith("dtype") and isinstance(value, str):
            value = _as_dtype(value, key)
        kwargs[key] = value
    return cls(**kwargs)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _write_json(path: Path, value: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _jsonable(values: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def _differences(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    now = _jsonable(now)
    return [f"{key}: {saved.get(key, '<absent>')!r} (saved) vs {now.get(key, '<absent>')!r} (now)"
            for key in sorted(set(saved) | set(now)) if saved.get(key, "<absent>") != now.get(key, "<absent>")]


def _targets(value: Union[None, int, Sequence[int]]) -> Optional[List[int]]:
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _check_targets(data_partitions: int, module_partitions: int, target_data, target_modules, what: str) -> None:
    if data_partitions == 1 and module_partitions == 1 and (target_data is not None or target_modules is not None):
        raise ValueError(
            f"target_data_partitions / target_module_partitions were given, but the {what} are not partitioned "
            "(data and module partitions are both 1). Set the partitions in the arguments, or drop the targets."
        )


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def _with_batch_size(run: Callable[[int, bool], Any], batch_size: Optional[int], dataset: Dataset,
                     initial_attempt: int, what: str) -> Any:
    """``run(batch_size, first_attempt)``; without a given batch size, halve from the initial attempt on OOM."""
    if batch_size is not None:
        return run(batch_size, True)
    size = max(1, min(int(initial_attempt), len(dataset) if hasattr(dataset, "__len__") else initial_attempt))
    first = True
    while True:
        try:
            return run(size, first)
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are retried
            if not _is_out_of_memory(error) or size == 1:
                raise
            logger.warning("%s: out of memory with batch size %d; retrying with %d.", what, size, size // 2)
            size //= 2
            first = False
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _ungroup(tensor: torch.Tensor) -> torch.Tensor:
    """Drop the leading groups dimension of size 1 (every layer but grouped convolutions)."""
    return tensor[0] if tensor.dim() > 0 and tensor.shape[0] == 1 else tensor


def _count(value: torch.Tensor) -> torch.Tensor:
    return torch.tensor([int(round(float(value)))], dtype=torch.int64)


def _raw_sum(mean: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``mean * count`` in the mean's own dtype (the one the factor arguments asked for)."""
    return _ungroup((mean.double() * count.double()).to(mean.dtype))


def _kronfluence_factors(factors: Factors) -> FACTOR_TYPE:
    """The native factors with Kronfluence's names, shapes and conventions.

    Kronfluence stores covariances and Lambda as raw sums next to their counts; fninfluence stores them
    already divided by the count, so they are multiplied back here.
    """
    done = set(factors.passes_done)
    result: FACTOR_TYPE = {}

    def put(name: str, layer: str, value: torch.Tensor) -> None:
        result.setdefault(name, {})[layer] = value

    for layer, tensors in factors.tensors.items():
        if "covariance" in done and "activation_covariance" in tensors:
            tokens = tensors["num_tokens"]
            put("activation_covariance", layer, _raw_sum(tensors["activation_covariance"], tokens))
            put("gradient_covariance", layer, _raw_sum(tensors["gradient_covariance"], tokens))
            put("num_activation_covariance_processed", layer, _count(tokens))
            put("num_gradient_covariance_processed", layer, _count(tokens))
            for name in EIGENDECOMPOSITION_FACTOR_NAMES:
                put(name, layer, _ungroup(tensors[name]))
        if "lambda" in done and "num_lambda_examples" in tensors:
            examples = tensors["num_lambda_examples"]
            put("lambda_matrix", layer, _raw_sum(tensors["lambda"], examples))
            put("num_lambda_processed", layer, _count(examples))
    return result


def _select(factors: FACTOR_TYPE, names: Sequence[str]) -> Optional[FACTOR_TYPE]:
    if not all(name in factors for name in names):
        return None
    return {name: factors[name] for name in names}


def _load_native_factors(directory: Path) -> Optional[Factors]:
    try:
        return Factors.load(directory)
    except InfluenceError:
        return None


def _drop_passes_after_covariance(directory: Path, estimator) -> None:
    """Forget every pass after ``covariance`` in a factors store, so that the next run recomputes it.

    Removes the completion markers of those passes (``_done/<pass>-data<i>-modules<j>.json``,
    ``_done/pass-<pass>.json``) and ``_done/complete.json``, following the layout in docs/storage.md.
    Their arrays stay and are rewritten cell by cell.
    """
    done = directory / "_done"
    later = [p.name for p in estimator.passes if p.name != "covariance"]
    for marker in list(done.glob("*.json")) if done.exists() else []:
        stem = marker.name[: -len(".json")]
        cell = Cell.parse(stem)
        if stem == "complete" or stem in {f"pass-{p}" for p in later} or (cell is not None and cell.kind in later):
            marker.unlink()


def _model_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().to("cpu", torch.float64 if value.is_floating_point() else value.dtype)
                          .contiguous().numpy().tobytes())
    return digest.hexdigest()


def _read_zarr_arrays(path: Path) -> Dict[str, torch.Tensor]:
    """Every numeric array of a Zarr group (by relative path), or ``{name: array}`` for one array."""
    import numpy as np
    import zarr

    from ..store.zarr_io import decode

    def tensor(array) -> torch.Tensor:
        if np.dtype(array.dtype).kind not in "biufc":
            raise InfluenceError(f"{path}: array of dtype {array.dtype} is not numeric; only numeric arrays are read.")
        return decode(array, array[...])  # bfloat16 arrays from their raw bits

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return {path.name: tensor(node)}
    result: Dict[str, torch.Tensor] = {}

    def walk(group, prefix: str) -> None:
        for name, array in group.arrays():
            result[prefix + name] = tensor(array)
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")

    walk(node, "")
    return result


# -- the Analyzer ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _FitData:
    """The data of a fitting call and how Kronfluence's arguments batch it."""

    dataset: Dataset
    per_device_batch_size: Optional[int]
    initial_attempt: int
    dataloader_kwargs: Optional["DataLoaderKwargs"]


class Analyzer:
    """Kronfluence 1.0.1's ``Analyzer``: fit factors and compute scores, stored under ``output_dir``.

    Every method keeps Kronfluence's signature. Differences (see docs/migrating-from-kronfluence.md): the
    ``compute_*`` methods return the scores on a fresh run too; rerunning a name with other arguments is an
    error unless ``overwrite_output_dir=True``; results are Zarr stores, not safetensors files; names must be
    plain folder names (letters, digits, ``.``, ``_``, ``-``).
    """

    def __init__(
        self,
        analysis_name: str,
        model: nn.Module,
        task: Task,
        cpu: bool = False,
        log_level: Optional[int] = None,
        log_main_process_only: bool = True,
        profile: bool = False,
        disable_tqdm: bool = False,
        output_dir: str = "./influence_results",
        disable_model_save: bool = True,
    ) -> None:
        if log_level is not None:
            logging.getLogger("fninfluence").setLevel(log_level)
        self.logger = logger
        self.analysis_name = check_name(analysis_name, "analysis_name")
        _check_task(model, task)
        if model.training:
            self.logger.warning(
                "The model is in training mode (dropout on): call prepare_model(model, task) first, which puts it "
                "in eval mode as Kronfluence's does."
            )
        self.model = model
        self.task = task
        self.device = torch.device("cpu") if cpu or not torch.cuda.is_available() else torch.device("cuda")
        self.model.to(self.device)
        self.cpu = cpu
        self.log_main_process_only = log_main_process_only
        self.profile = profile
        self.disable_tqdm = disable_tqdm
        self.disable_model_save = disable_model_save
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.output_dir = child(Path(output_dir), analysis_name, "analysis_name")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._dataloader_params = DataLoaderKwargs()
        if not disable_model_save:
            self._check_model_fingerprint()

    # -- set-up ------------------------------------------------------------------------------------

    def _check_model_fingerprint(self) -> None:
        path = self.output_dir / MODEL_FINGERPRINT_FILE
        digest = {"state_dict_sha256": _model_digest(self.model)}
        saved = _read_json(path)
        if saved is not None and saved != digest:
            raise ValueError(
                f"The model differs from the one saved for analysis {self.analysis_name!r} ({path}). Use another "
                "analysis_name or output_dir for another model, or delete that file."
            )
        if saved is None:
            _write_json(path, digest)

    def set_dataloader_kwargs(self, dataloader_kwargs: DataLoaderKwargs) -> None:
        """The DataLoader arguments used when a method is not given ``dataloader_kwargs``."""
        self._dataloader_params = dataloader_kwargs

    def factors_output_dir(self, factors_name: str) -> Path:
        return child(self.output_dir, "factors_" + check_name(factors_name, "factors_name"), "factors_name")

    def scores_output_dir(self, scores_name: str) -> Path:
        return child(self.output_dir, "scores_" + check_name(scores_name, "scores_name"), "scores_name")

    def _loader(self, dataset: Dataset, batch_size: int, dataloader_kwargs: Optional[DataLoaderKwargs],
                indices: Optional[Sequence[int]] = None) -> DataLoader:
        if indices is not None:
            dataset = Subset(dataset, list(indices))
        options = {"batch_size": batch_size, "sampler": SequentialSampler(dataset), "drop_last": False}
        options.update((dataloader_kwargs or self._dataloader_params).to_dict())
        return DataLoader(dataset, **options)

    def _timed(self, what: str, started: float) -> None:
        if self.profile:
            self.logger.info("%s took %.3f s.", what, time.perf_counter() - started)

    def _check_saved(self, path: Path, now: Dict[str, Any], what: str, name: str, overwrite: bool) -> None:
        """Raise if ``path`` holds other arguments than ``now`` (unless ``overwrite``)."""
        saved = _read_json(path)
        if saved is None or overwrite:
            return
        lines = _differences(saved, now)
        if lines:
            raise ValueError(
                f"{what} {name!r} in {path.parent} were computed with different arguments:\n  " + "\n  ".join(lines)
                + "\nPass overwrite_output_dir=True to recompute them with the new arguments, or use another name."
            )

    # -- factors -------------------------------------------------------------------------------------

    def fit_all_factors(
        self,
        factors_name: str,
        dataset: Dataset,
        per_device_batch_size: Optional[int] = None,
        initial_per_device_batch_size_attempt: int = 4096,
        dataloader_kwargs: Optional[DataLoaderKwargs] = None,
        factor_args: Optional[FactorArguments] = None,
        overwrite_output_dir: bool = False,
    ) -> None:
        """Fit every factor of the strategy (covariance, eigendecomposition, Lambda) on ``dataset``."""
        self._fit("all", factors_name, _FitData(dataset, per_device_batch_size, initial_per_device_batch_size_attempt,
                                                dataloader_kwargs), factor_args, None, None, overwrite_output_dir)

    def fit_covariance_matrices(
        self,
        factors_name: str,
        dataset: Dataset,
        per_device_batch_size: Optional[int] = None,
        initial_per_device_batch_size_attempt: int = 4096,
        dataloader_kwargs: Optional[DataLoaderKwargs] = None,
        factor_args: Optional[FactorArguments] = None,
        target_data_partitions: Optional[Union[Sequence[int], int]] = None,
        target_module_partitions: Optional[Union[Sequence[int], int]] = None,
        overwrite_output_dir: bool = False,
    ) -> None:
        """The covariance pass (kfac, ekfac). fninfluence eigendecomposes at the end of this pass."""
        self._fit("covariance", factors_name, _FitData(dataset, per_device_batch_size,
                                                       initial_per_device_batch_size_attempt, dataloader_kwargs),
                  factor_args, target_data_partitions, target_module_partitions, overwrite_output_dir)

    def perform_eigendecomposition(
        self,
        factors_name: str,
        factor_args: Optional[FactorArguments] = None,
        overwrite_output_dir: bool = False,
        load_from_factors_name: Optional[str] = None,
    ) -> None:
        """Check that the eigendecomposition is there (it is done by the covariance pass).

        With ``load_from_factors_name`` the covariance pass (with its eigendecomposition) of those factors is
        copied into ``factors_name`` first; both must use the same FactorArguments and data.
        """
        started = time.perf_counter()
        directory = self.factors_output_dir(factors_name)
        args = factor_args or FactorArguments()
        estimator = get_estimator(args.strategy)
        if load_from_factors_name is not None:
            self._check_saved(directory / FACTOR_ARGUMENTS_FILE, args.to_dict(), "Factors", factors_name,
                              overwrite_output_dir)
            if "covariance" in [p.name for p in estimator.passes]:
                self._seed_covariance(load_from_factors_name, directory, args, overwrite_output_dir)
            _write_json(directory / FACTOR_ARGUMENTS_FILE, args.to_dict())
            self._timed("perform_eigendecomposition", started)
            return
        saved = _read_json(directory / FACTOR_ARGUMENTS_FILE)
        lines: List[str] = []
        if saved is not None:
            lines = _differences(saved, args.to_dict())
            substantive = [line for line in lines if not line.startswith("eigendecomposition_dtype:")]
            if (lines and not overwrite_output_dir) or substantive:
                raise ValueError(
                    f"Factors {factors_name!r} were fitted with different arguments:\n  " + "\n  ".join(lines)
                    + "\nThe eigendecomposition is part of fninfluence's covariance pass: pass the same "
                    "FactorArguments, or refit with fit_covariance_matrices(..., overwrite_output_dir=True)."
                )
        if "covariance" not in [p.name for p in estimator.passes]:
            directory.mkdir(parents=True, exist_ok=True)
            _write_json(directory / FACTOR_ARGUMENTS_FILE, args.to_dict())
            return
        factors = _load_native_factors(directory)
        if saved is None or factors is None or "covariance" not in factors.passes_done:
            raise FactorsNotFoundError(
                f"The covariance matrices of factors {factors_name!r} were not found (or are incomplete) in "
                f"{directory}: run fit_covariance_matrices first."
            )
        if lines:
            _write_json(directory / FACTOR_ARGUMENTS_FILE, args.to_dict())
        self._timed("perform_eigendecomposition", started)

    def fit_lambda_matrices(
        self,
        factors_name: str,
        dataset: Dataset,
        per_device_batch_size: Optional[int] = None,
        initial_per_device_batch_size_attempt: int = 4096,
        dataloader_kwargs: Optional[DataLoaderKwargs] = None,
        factor_args: Optional[FactorArguments] = None,
        target_data_partitions: Optional[Union[Sequence[int], int]] = None,
        target_module_partitions: Optional[Union[Sequence[int], int]] = None,
        overwrite_output_dir: bool = False,
        load_from_factors_name: Optional[str] = None,
    ) -> None:
        """The Lambda pass (ekfac, diagonal). With ``load_from_factors_name`` the covariance pass of those
        factors is copied first (same FactorArguments and data needed)."""
        self._fit("lambda", factors_name, _FitData(dataset, per_device_batch_size, initial_per_device_batch_size_attempt,
                                                   dataloader_kwargs), factor_args, target_data_partitions,
                  target_module_partitions, overwrite_output_dir, load_from_factors_name)

    def _seed_covariance(self, source_name: str, directory: Path, args: FactorArguments, overwrite: bool) -> None:
        """Copy the covariance pass of factors ``source_name`` into ``directory`` (a new factors store)."""
        source = self.factors_output_dir(source_name)
        if source == directory:
            return
        source_factors = _load_native_factors(source)
        if source_factors is None or "covariance" not in source_factors.passes_done:
            raise FactorsNotFoundError(
                f"load_from_factors_name={source_name!r}: its covariance matrices were not found (or are "
                f"incomplete) in {source}."
            )
        ignored = {"amp_scale", "has_shared_parameters", "eigendecomposition_dtype",
                   "use_iterative_lambda_aggregation", "offload_activations_to_cpu"}
        source_args = _read_json(source / FACTOR_ARGUMENTS_FILE) or {}
        lines = [line for line in _differences(source_args, args.to_dict()) if line.split(":")[0] not in ignored]
        if lines:
            raise ValueError(
                f"load_from_factors_name={source_name!r}: those factors were fitted with other FactorArguments:\n  "
                + "\n  ".join(lines) + "\nfninfluence records the settings of every pass in one factors store, so "
                "it can only reuse the covariance of factors fitted with the same arguments (and data)."
            )
        here = _load_native_factors(directory)
        if here is not None and "covariance" in here.passes_done and not overwrite:
            return
        if directory.is_dir() and not is_store(directory):
            (directory / FACTOR_ARGUMENTS_FILE).unlink(missing_ok=True)  # our own file, from an earlier call
        remove_store(directory)  # never a folder that holds anything else
        if directory.exists():
            directory.rmdir()
        shutil.copytree(source, directory, ignore=shutil.ignore_patterns(
            FACTOR_ARGUMENTS_FILE, ".fninfluence-create.lock", ".*.tmp"))
        _drop_passes_after_covariance(directory, get_estimator(args.strategy))

    def _fit(self, stage: str, factors_name: str, data: "_FitData", factor_args: Optional[FactorArguments],
             target_data_partitions, target_module_partitions, overwrite: bool,
             load_from_factors_name: Optional[str] = None) -> None:
        started = time.perf_counter()
        directory = self.factors_output_dir(factors_name)
        args = factor_args or FactorArguments()
        all_passes = [p.name for p in get_estimator(args.strategy).passes]
        wanted = list(all_passes) if stage == "all" else [p for p in all_passes if p == stage]
        self._check_saved(directory / FACTOR_ARGUMENTS_FILE, args.to_dict(), "Factors", factors_name, overwrite)
        targets = _targets(target_data_partitions), _targets(target_module_partitions)
        if stage != "all":
            _check_targets(getattr(args, f"{stage}_data_partitions"), getattr(args, f"{stage}_module_partitions"),
                           *targets, f"{stage} matrices")
        native_overwrite = overwrite
        if stage == "lambda" and "lambda" in all_passes and "covariance" in all_passes:
            wanted, native_overwrite = self._prepare_lambda(factors_name, directory, args, targets, overwrite,
                                                            load_from_factors_name)
        existing = _load_native_factors(directory)
        needs_store = not all_passes and (existing is None or not existing.complete or overwrite)
        if wanted or needs_store:
            keywords = _fit_keywords(args)
            passes = None if set(wanted) == set(all_passes) else wanted

            def run(batch_size: int, first: bool):
                return pipeline.fit_factors(
                    self.model, self.task, self._loader(data.dataset, batch_size, data.dataloader_kwargs),
                    batch_size=None, progress=not self.disable_tqdm, store=directory,
                    overwrite=native_overwrite and first, passes=passes, target_data_partitions=targets[0],
                    target_module_partitions=targets[1], **keywords,
                )

            _with_batch_size(run, data.per_device_batch_size, data.dataset, data.initial_attempt,
                             f"factors {factors_name!r}")
        else:
            directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / FACTOR_ARGUMENTS_FILE, args.to_dict())
        self._timed({"all": "fit_all_factors", "covariance": "fit_covariance_matrices",
                     "lambda": "fit_lambda_matrices"}[stage], started)

    def _prepare_lambda(self, factors_name: str, directory: Path, args: "FactorArguments", targets, overwrite: bool,
                        load_from_factors_name: Optional[str]):
        """``(passes to run, overwrite the native store)`` for fit_lambda_matrices: the covariance pass must be
        in the store (seeded from ``load_from_factors_name`` if given); new arguments that change it redo it."""
        estimator = get_estimator(args.strategy)
        wanted, native_overwrite = ["lambda"], overwrite
        if load_from_factors_name is not None:
            self._seed_covariance(load_from_factors_name, directory, args, overwrite)
            native_overwrite = False
        existing = _load_native_factors(directory)
        if existing is None or "covariance" not in existing.passes_done:
            raise FactorsNotFoundError(
                f"Fitting the Lambda matrices of factors {factors_name!r} ({args.strategy}) needs its covariance "
                f"matrices, which were not found (or are incomplete) in {directory}: run fit_covariance_matrices "
                "(and perform_eigendecomposition) first."
            )
        if overwrite and load_from_factors_name is None:
            saved = _read_json(directory / FACTOR_ARGUMENTS_FILE)
            if saved is not None and not _differences(saved, args.to_dict()):
                _drop_passes_after_covariance(directory, estimator)  # recompute Lambda only
                native_overwrite = False
            else:
                if targets[0] is not None or targets[1] is not None:
                    raise ValueError(
                        f"Factors {factors_name!r}: the new arguments change the covariance pass too, which "
                        "target partitions of the Lambda pass cannot redo. Run fit_covariance_matrices(..., "
                        "overwrite_output_dir=True) with the new arguments first."
                    )
                wanted = [p.name for p in estimator.passes]  # fitted with other arguments: redo the covariance too
                self.logger.info("Factors %r: refitting the covariance pass too, since the arguments changed.",
                                 factors_name)
        return wanted, native_overwrite

    # -- factor loading ------------------------------------------------------------------------------

    def load_factor_args(self, factors_name: str) -> Optional[FactorArguments]:
        """The FactorArguments that factors ``factors_name`` were fitted with (dtypes as ``torch.dtype``)."""
        saved = _read_json(self.factors_output_dir(factors_name) / FACTOR_ARGUMENTS_FILE)
        return None if saved is None else _arguments_from_json(FactorArguments, saved)

    def _kronfluence_factors(self, factors_name: str) -> FACTOR_TYPE:
        factors = _load_native_factors(self.factors_output_dir(factors_name))
        return {} if factors is None else _kronfluence_factors(factors)

    def load_covariance_matrices(self, factors_name: str) -> Optional[FACTOR_TYPE]:
        """``{activation_covariance, gradient_covariance, num_*_processed: {module: tensor}}`` (raw sums), or None."""
        return _select(self._kronfluence_factors(factors_name), COVARIANCE_FACTOR_NAMES)

    def load_eigendecomposition(self, factors_name: str) -> Optional[FACTOR_TYPE]:
        """``{activation/gradient_eigenvectors/eigenvalues: {module: tensor}}``, or None."""
        return _select(self._kronfluence_factors(factors_name), EIGENDECOMPOSITION_FACTOR_NAMES)

    def load_lambda_matrices(self, factors_name: str) -> Optional[FACTOR_TYPE]:
        """``{lambda_matrix (raw sum), num_lambda_processed: {module: tensor}}``, or None."""
        return _select(self._kronfluence_factors(factors_name), LAMBDA_FACTOR_NAMES)

    def load_all_factors(self, factors_name: str) -> FACTOR_TYPE:
        """The factors the strategy preconditions with: eigendecomposition (kfac, ekfac), Lambda (ekfac, diagonal)."""
        args = self.load_factor_args(factors_name)
        directory = self.factors_output_dir(factors_name)
        if args is None:
            raise FileNotFoundError(f"Factors {factors_name!r} were not found at {directory}.")
        estimator = get_estimator(args.strategy)
        available = self._kronfluence_factors(factors_name)
        needed = []
        if "covariance" in [p.name for p in estimator.passes]:
            needed.append(("eigendecomposition results", EIGENDECOMPOSITION_FACTOR_NAMES))
        if "lambda" in [p.name for p in estimator.passes]:
            needed.append(("Lambda matrices", LAMBDA_FACTOR_NAMES))
        loaded: FACTOR_TYPE = {}
        for what, names in needed:
            part = _select(available, names)
            if part is None:
                raise FactorsNotFoundError(f"Strategy {args.strategy!r} needs the {what} of factors {factors_name!r}, "
                                           f"which were not found (or are incomplete) in {directory}.")
            loaded.update(part)
        return loaded

    def aggregate_covariance_matrices(self, factors_name: str) -> None:
        """Nothing to do: the store aggregates a pass when its last cell is written. Logs whether it is complete."""
        self._report_factors(factors_name, "covariance")

    def aggregate_lambda_matrices(self, factors_name: str) -> None:
        """Nothing to do: the store aggregates a pass when its last cell is written. Logs whether it is complete."""
        self._report_factors(factors_name, "lambda")

    def _report_factors(self, factors_name: str, pass_name: str) -> None:
        args = self.load_factor_args(factors_name)
        if args is None:
            raise ValueError(f"No factor arguments were found for factors {factors_name!r}: fit them first.")
        if pass_name not in [p.name for p in get_estimator(args.strategy).passes]:
            return
        factors = _load_native_factors(self.factors_output_dir(factors_name))
        if factors is not None and pass_name in factors.passes_done:
            self.logger.info("Factors %r: the %s pass is complete and aggregated.", factors_name, pass_name)
        else:
            self.logger.warning("Factors %r: the %s pass still has missing partitions; rerun the fit with the "
                                "missing target partitions to complete it.", factors_name, pass_name)

    # -- scores --------------------------------------------------------------------------------------

    def _factors_for_scores(self, factors_name: str) -> tuple:
        factor_args = self.load_factor_args(factors_name)
        directory = self.factors_output_dir(factors_name)
        factors = _load_native_factors(directory)
        if factor_args is None or factors is None or not factors.complete:
            raise FactorsNotFoundError(
                f"Factors {factors_name!r} were not found (or are incomplete) in {directory}: fit them first "
                "(fit_all_factors)."
            )
        return factor_args, factors

    def _prepare_scores(self, kind: str, scores_name: str, factors_name: str, score_args: ScoreArguments,
                        overwrite: bool, target_data, target_modules):
        directory = self.scores_output_dir(scores_name)
        factor_args, factors = self._factors_for_scores(factors_name)
        self._check_saved(directory / SCORE_ARGUMENTS_FILE, score_args.to_dict(), "Scores", scores_name, overwrite)
        self._check_saved(directory / FACTOR_ARGUMENTS_FILE, factor_args.to_dict(), "Scores (their factors)",
                          scores_name, overwrite)
        info = _read_json(directory / SCORES_INFO_FILE)
        if info is not None and info.get("kind") != kind and not overwrite:
            raise ValueError(f"Scores {scores_name!r} in {directory} are {info.get('kind')} scores, not {kind} scores. "
                             "Use another scores_name, or overwrite_output_dir=True.")
        _check_targets(score_args.data_partitions, score_args.module_partitions, target_data, target_modules, "scores")
        return directory, factor_args, factors

    def _finish_scores(self, kind: str, directory: Path, factors_name: str, score_args: ScoreArguments,
                       factor_args: FactorArguments, result, per_token: bool) -> Optional[SCORE_TYPE]:
        _write_json(directory / SCORE_ARGUMENTS_FILE, score_args.to_dict())
        _write_json(directory / FACTOR_ARGUMENTS_FILE, factor_args.to_dict())
        _write_json(directory / SCORES_INFO_FILE, {"kind": kind, "factors_name": factors_name,
                                                   "per_module": bool(score_args.compute_per_module_scores),
                                                   "per_token": per_token})
        if result is None:
            return None
        if isinstance(result, torch.Tensor):
            return _kronfluence_token_shape({ALL_MODULE_NAME: result}, per_token)
        return _kronfluence_token_shape(dict(result), per_token)

    def compute_pairwise_scores(
        self,
        scores_name: str,
        factors_name: str,
        query_dataset: Dataset,
        train_dataset: Dataset,
        per_device_query_batch_size: int,
        per_device_train_batch_size: Optional[int] = None,
        initial_per_device_train_batch_size_attempt: int = 4096,
        query_indices: Optional[Sequence[int]] = None,
        train_indices: Optional[Sequence[int]] = None,
        dataloader_kwargs: Optional[DataLoaderKwargs] = None,
        score_args: Optional[ScoreArguments] = None,
        target_data_partitions: Optional[Sequence[int]] = None,
        target_module_partitions: Optional[Sequence[int]] = None,
        overwrite_output_dir: bool = False,
    ) -> Optional[SCORE_TYPE]:
        """Pairwise scores ``{"all_modules": [Q, N]}`` (or one entry per module), returned and stored.

        Returns None while target partitions leave cells missing (rerun with the others to complete).
        """
        started = time.perf_counter()
        args = score_args or ScoreArguments()
        target_data, target_modules = _targets(target_data_partitions), _targets(target_module_partitions)
        directory, factor_args, factors = self._prepare_scores("pairwise", scores_name, factors_name, args,
                                                               overwrite_output_dir, target_data, target_modules)
        per_token = args.compute_per_token_scores
        if per_token and (args.aggregate_train_gradients or factor_args.has_shared_parameters):
            self.logger.warning("compute_per_token_scores is ignored with aggregate_train_gradients or "
                                "has_shared_parameters (as in Kronfluence): computing [Q, N] scores.")
            per_token = False
        query_loader = self._loader(query_dataset, per_device_query_batch_size, dataloader_kwargs, query_indices)
        train = Subset(train_dataset, list(train_indices)) if train_indices is not None else train_dataset
        queries_per_pass = None if args.aggregate_query_gradients else \
            per_device_query_batch_size * args.query_gradient_accumulation_steps

        def run(batch_size: int, first: bool):
            return pipeline.pairwise_scores(
                self.model, self.task, factors, query_loader, self._loader(train, batch_size, dataloader_kwargs),
                damping=args.damping_factor, per_module=args.compute_per_module_scores,
                progress=not self.disable_tqdm, per_token=per_token, conv_tokens=False,
                query_rank=args.query_gradient_low_rank,
                full_svd=args.use_full_svd, aggregate_queries=args.aggregate_query_gradients,
                aggregate_train=args.aggregate_train_gradients, queries_per_pass=queries_per_pass,
                store=directory, overwrite=overwrite_output_dir and first, data_partitions=args.data_partitions,
                module_partitions=args.module_partitions, target_data_partitions=target_data,
                target_module_partitions=target_modules, precision=_score_precision(args),
            )

        result = _with_batch_size(run, per_device_train_batch_size, train,
                                  initial_per_device_train_batch_size_attempt, f"pairwise scores {scores_name!r}")
        scores = self._finish_scores("pairwise", directory, factors_name, args, factor_args, result, per_token)
        self._timed("compute_pairwise_scores", started)
        return scores

    def compute_self_scores(
        self,
        scores_name: str,
        factors_name: str,
        train_dataset: Dataset,
        per_device_train_batch_size: Optional[int] = None,
        initial_per_device_train_batch_size_attempt: int = 4096,
        train_indices: Optional[Sequence[int]] = None,
        dataloader_kwargs: Optional[DataLoaderKwargs] = None,
        score_args: Optional[ScoreArguments] = None,
        target_data_partitions: Optional[Sequence[int]] = None,
        target_module_partitions: Optional[Sequence[int]] = None,
        overwrite_output_dir: bool = False,
    ) -> Optional[SCORE_TYPE]:
        """Self-influence scores ``{"all_modules": [N]}`` (or one entry per module), returned and stored.

        As in Kronfluence, low-rank query gradients, query-gradient accumulation, gradient aggregation and
        per-token scores do not apply to self scores: they are ignored with a warning.
        """
        started = time.perf_counter()
        args = score_args or ScoreArguments()
        target_data, target_modules = _targets(target_data_partitions), _targets(target_module_partitions)
        directory, factor_args, factors = self._prepare_scores("self", scores_name, factors_name, args,
                                                               overwrite_output_dir, target_data, target_modules)
        ignored = [name for name, value in (("query_gradient_low_rank", args.query_gradient_low_rank is not None),
                                            ("query_gradient_accumulation_steps",
                                             args.query_gradient_accumulation_steps != 1),
                                            ("aggregate_query_gradients", args.aggregate_query_gradients),
                                            ("aggregate_train_gradients", args.aggregate_train_gradients),
                                            ("compute_per_token_scores", args.compute_per_token_scores)) if value]
        if ignored:
            self.logger.warning("Self-influence scores ignore %s (as in Kronfluence).", ", ".join(ignored))
        train = Subset(train_dataset, list(train_indices)) if train_indices is not None else train_dataset

        def run(batch_size: int, first: bool):
            return pipeline.self_scores(
                self.model, self.task, factors, self._loader(train, batch_size, dataloader_kwargs),
                damping=args.damping_factor, use_measurement=args.use_measurement_for_self_influence,
                per_module=args.compute_per_module_scores, progress=not self.disable_tqdm, store=directory,
                overwrite=overwrite_output_dir and first, data_partitions=args.data_partitions,
                module_partitions=args.module_partitions, target_data_partitions=target_data,
                target_module_partitions=target_modules, precision=_score_precision(args),
            )

        result = _with_batch_size(run, per_device_train_batch_size, train,
                                  initial_per_device_train_batch_size_attempt, f"self scores {scores_name!r}")
        scores = self._finish_scores("self", directory, factors_name, args, factor_args, result, False)
        self._timed("compute_self_scores", started)
        return scores

    # -- score loading -------------------------------------------------------------------------------

    def load_score_args(self, scores_name: str) -> Optional[ScoreArguments]:
        """The ScoreArguments that scores ``scores_name`` were computed with (dtypes as ``torch.dtype``)."""
        saved = _read_json(self.scores_output_dir(scores_name) / SCORE_ARGUMENTS_FILE)
        return None if saved is None else _arguments_from_json(ScoreArguments, saved)

    def _load_scores(self, scores_name: str, kind: str) -> Optional[SCORE_TYPE]:
        directory = self.scores_output_dir(scores_name)
        info = _read_json(directory / SCORES_INFO_FILE)
        if info is None or info.get("kind") != kind:
            return None
        return _scores_from_store(directory, bool(info.get("per_module")), bool(info.get("per_token")))

    def load_pairwise_scores(self, scores_name: str) -> Optional[SCORE_TYPE]:
        """``{"all_modules": [Q, N]}`` (or per module), or None if missing or incomplete."""
        return self._load_scores(scores_name, "pairwise")

    def load_self_scores(self, scores_name: str) -> Optional[SCORE_TYPE]:
        """``{"all_modules": [N]}`` (or per module), or None if missing or incomplete."""
        return self._load_scores(scores_name, "self")

    def aggregate_pairwise_scores(self, scores_name: str) -> None:
        """Nothing to do: the store aggregates when its last cell is written. Logs whether it is complete."""
        self._report_scores(scores_name, "pairwise")

    def aggregate_self_scores(self, scores_name: str) -> None:
        """Nothing to do: the store aggregates when its last cell is written. Logs whether it is complete."""
        self._report_scores(scores_name, "self")

    def _report_scores(self, scores_name: str, kind: str) -> None:
        if self.load_score_args(scores_name) is None:
            raise ValueError(f"No score arguments were found for scores {scores_name!r}: compute them first.")
        if self._load_scores(scores_name, kind) is not None:
            self.logger.info("Scores %r are complete and aggregated.", scores_name)
        else:
            self.logger.warning("Scores %r still have missing partitions; rerun the computation with the missing "
                                "target partitions to complete them.", scores_name)

    # -- static helpers ------------------------------------------------------------------------------

    @staticmethod
    def load_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
        """Read results from disk without unpickling anything.

        ``path`` may be a scores store (``{"all_modules": ..., module: ...}``), a factors store
        (``{"<module>/<factor>": tensor}`` in fninfluence's layout), any Zarr array or group (its numeric arrays
        by relative path), or a Kronfluence file name inside one of this layer's stores
        (``scores_<name>/pairwise_scores.safetensors``, ``factors_<name>/lambda_matrix.safetensors``, ...),
        which gives the dict Kronfluence would have read from that file.
        """
        path = Path(path).resolve() if isinstance(path, str) else Path(path)
        if not path.exists():
            mapped = _kronfluence_file(path)
            if mapped is not None:
                return mapped
            raise FileNotFoundError(f"File not found: {path}.")
        kind = _store_kind(path)
        if kind in ("pairwise", "self"):
            return read_scores(path)
        if kind == "factors":
            factors = Factors.load(path)
            return {f"{layer}/{name}": value for layer, tensors in factors.tensors.items()
                    for name, value in tensors.items()}
        return _read_zarr_arrays(path)

    @staticmethod
    def get_module_summary(model: nn.Module) -> str:
        """Every leaf module with parameters, by name: the names to return from ``get_influence_tracked_modules``."""
        lines = ["==Model Summary=="]
        for name, module in model.named_modules():
            if next(module.children(), None) is not None or next(module.parameters(), None) is None:
                continue
            lines.append(f"Module Name: `{name}`, Module: {module!r}")
        return "\n".join(lines)


def _store_kind(path: Path) -> Optional[str]:
    """``"factors"``, ``"pairwise"`` or ``"self"`` for a fninfluence store, else None."""
    header = path / "zarr.json"
    if not path.is_dir() or not header.exists():
        return None
    try:
        attributes = json.loads(header.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None
    return attributes.get("fninfluence", {}).get("kind")


def _kronfluence_token_shape(scores: SCORE_TYPE, per_token: bool) -> SCORE_TYPE:
    """Per-token scores as Kronfluence shapes them: ``[Q, N]`` when no tracked layer has tokens (an MLP, or a
    CNN, whose conv layers Kronfluence sums over positions), where the native API keeps ``[Q, N, 1]``."""
    if not per_token:
        return scores
    return {name: value[..., 0] if value.dim() == 3 and value.shape[-1] == 1 else value
            for name, value in scores.items()}


def _scores_from_store(directory: Path, per_module: bool, per_token: bool = False) -> Optional[SCORE_TYPE]:
    try:
        scores = read_scores(directory)
    except InfluenceError:
        return None
    if per_module:
        scores.pop(ALL_MODULE_NAME, None)
    else:
        scores = {ALL_MODULE_NAME: scores[ALL_MODULE_NAME]}
    return _kronfluence_token_shape(scores, per_token)


def _kronfluence_file(path: Path) -> Optional[Dict[str, torch.Tensor]]:
    """What Kronfluence's file ``path`` would hold, read from the store of this layer it would sit in."""
    if path.suffix != ".safetensors":
        return None
    directory, stem = path.parent, path.stem
    kind = _store_kind(directory)
    if kind in ("pairwise", "self") and stem == f"{kind}_scores":
        info = _read_json(directory / SCORES_INFO_FILE) or {}
        return _scores_from_store(directory, bool(info.get("per_module")), bool(info.get("per_token")))
    if kind == "factors" and stem in COVARIANCE_FACTOR_NAMES + EIGENDECOMPOSITION_FACTOR_NAMES + LAMBDA_FACTOR_NAMES:
        factors = _load_native_factors(directory)
        return None if factors is None else _kronfluence_factors(factors).get(stem)
    return None
