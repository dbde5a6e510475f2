"""Reproducible label sampling for the true Fisher: each example's draws depend on (seed, example index) only.

With ``use_empirical_fisher=False`` the task samples labels from the model (``compute_train_loss(..., sample=True)``),
usually with ``torch.multinomial``. Drawn from the global generator, those labels would depend on the order in
which batches and cells run, on the batch size and on the ranks: a resumed or partitioned fit would differ from an
uninterrupted one. Instead, while the sampled objective runs, :class:`ExampleDraws` (a ``TorchFunctionMode``)
answers the random functions of PyTorch itself with counter-based draws: element ``j`` of example ``n``'s share of
the ``c``-th random call of the objective is

    u = H(seed, c, stream, [s,] n, j) / 2^52,      H = a chain of 32-bit integer finalisers (``lowbias32``),

computed with plain int64 tensor ops, so it is exact and identical on every device and batch layout, traceable by
``torch.func`` transforms and compiled by ``torch.compile(fullgraph=True)``. ``s`` is the draw index of
``fit_factors(fisher_samples=S)``, which runs the sampled objective S times per batch (draws ``s = 0 .. S-1``)
and averages the statistics; draw 0 absorbs no ``s``, so it draws what a single-draw fit draws. From ``u``:

* ``multinomial(p, k)``: inverse CDF, ``min {i : P_i >= u P_C}`` with ``P = cumsum(p)`` (with replacement or
  ``k = 1``), or the Gumbel top-k of ``log p - log(-log u)`` (without replacement);
* ``bernoulli(p)``: ``u < p``; ``rand``: ``u``; ``randn`` / ``normal``: Box-Muller on two streams;
  ``randint``: ``floor(low + u (high - low))``; ``exponential_``: ``-log(u) / lambda``.

Which elements belong to which example: a random output whose first dimension is a multiple ``k B`` of the batch
size ``B`` is read example-major (the rows of ``logits.flatten(0, 1)`` for ``[B, T, V]`` logits, say); each example
then gets ``numel / B`` consecutive values, so its draws do not depend on the batch it is in. An output without
such a dimension (e.g. ``torch.rand(())``) is keyed by the batch's first example instead: reproducible for the same
batches (resume, partitions at batch boundaries) but not across batch sizes.

Random functions not listed above (``randperm``, dropout, ``poisson``, ...) still use PyTorch's generators; the
pipeline seeds those from ``(seed, first example of the batch)`` around each batch (:func:`batch_generator_seed`),
with the same guarantee as the batch-keyed case (with several draws per example, the draws ``s = 0 .. S-1`` read
that batch's generators in turn). The draws are the same in every pass (covariance, Lambda), so
EKFAC's eigenvalue correction sees the same sampled Fisher as its eigenbasis. Random calls made inside the user's
model rather than the task's own code (noise in a forward pass) are not answered: the tap refuses them, since
they would make the scores random.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_MASK = 0xFFFFFFFF
_TWO_PI = 2.0 * math.pi


# -- counter-based uniforms -------------------------------------------------------------------------

def _mul32(x, constant: int):
    """``(x * constant) mod 2^32`` for ``0 <= x < 2^32``, split in 16-bit halves so int64 never overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + ((x * high) & 0xFFFF) * 65536) & _MASK


def _mix(x):
    """The ``lowbias32`` finaliser (a bijection of 32-bit words); works on Python ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(state, value):
    """Fold a non-negative integer (up to 64 bits) into a 32-bit hash state."""
    return _mix(_mix(state ^ (value & _MASK)) ^ ((value >> 32) & _MASK))


def _key(seed: int, call: int, stream: int, draw: int = 0) -> int:
    """The hash state of one random call: a Python int, so it is a constant of a compiled graph. Draw 0 absorbs
    nothing more, so its draws are those of a single-draw fit (``fit_factors(fisher_samples=1)``)."""
    state = _mix(0x9E3779B9)
    for value in (seed % (1 << 64), call, stream):
        state = _absorb(state, value)
    return _absorb(state, draw) if draw else state


def uniforms(seed: int, call: int, stream: int, examples: torch.Tensor, count: int, draw: int = 0) -> torch.Tensor:
    """``[B, count]`` float64 uniforms in (0, 1): entry ``[b, j]`` is a function of (seed, call, stream, draw,
    ``examples[b]``, j) only. 52 random bits each (two hashed words), so ``(m + 1/2) / 2^52`` is exact."""
    state = _absorb(torch.full_like(examples, _key(seed, call, stream, draw)), examples)[:, None]
    offsets = torch.arange(count, device=examples.device, dtype=torch.int64)[None, :]
    first = _mix(state ^ offsets)
    second = _mix(first ^ 0x5BD1E995)
    bits = (first >> 6) * 67108864 + (second >> 6)  # 26 + 26 bits
    return (bits.to(torch.float64) + 0.5) * (2.0 ** -52)


# -- the mode ---------------------------------------------------------------------------------------

def _size(args: Sequence[Any]) -> Tuple[int, ...]:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return tuple(args)


def _factory(kwargs: Dict[str, Any], default_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    options = {k: kwargs[k] for k in ("dtype", "device", "layout") if kwargs.get(k) is not None}
    if default_dtype is not None:
        options.setdefault("dtype", default_dtype)
    return options


def _check_probabilities(probs: torch.Tensor, what: str, upper: bool) -> None:
    """Refuse what ``torch.multinomial`` / ``torch.bernoulli`` refuse (NaN, Inf, negative, above 1 for a
    probability, or an all-zero row), as they would: a ``RuntimeError``. Not where values cannot be read
    without breaking the transform (compiled, or under vmap): there the non-finite loss is refused instead."""
    if torch.compiler.is_compiling():
        return
    try:
        bad = ~torch.isfinite(probs) | (probs < 0)
        if upper:
            bad = bad | (probs > 1)
        invalid = bool(bad.any()) or (not upper and bool((probs.sum(-1) <= 0).any()))
    except RuntimeError:  # vmap: a data-dependent check is not possible
        return
    if invalid:
        problem = "NaN or values outside [0, 1]" if upper else "NaN, Inf or negative values, or a row that sums to 0"
        raise RuntimeError(
            f"{what} was given probabilities with {problem} while sampling labels for the true Fisher. Check the "
            "model's outputs on this batch for NaN/Inf (or fit with use_empirical_fisher=True)."
        )


_CALL_IMPL = nn.Module._call_impl.__code__


def _inside_the_users_model() -> bool:
    """Whether the caller runs inside a module's forward below fninfluence's objective wrapper (itself one
    module call): the user's model, as opposed to the task's own code."""
    calls, frame = 0, sys._getframe(2)
    while frame is not None:
        calls += frame.f_code is _CALL_IMPL
        if calls >= 2:
            return True
        frame = frame.f_back
    return False


class ExampleDraws(TorchFunctionMode):
    """Answers PyTorch's random functions with per-example counter-based draws (see the module docstring).

    ``examples``: the ``[B]`` int64 indices (in the whole dataset) of the batch's examples. One mode per
    objective call: its call counter starts at 0, so the ``c``-th random call gets the same draws every time.
    ``draw``: which of an example's independent draws (0 for the first, the only one by default).
    """

    def __init__(self, examples: torch.Tensor, seed: int = 0, draw: int = 0):
        super().__init__()
        self.examples = examples
        self.seed = int(seed)
        self.draw = int(draw)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None or kwargs.get("generator") is not None or kwargs.get("out") is not None:
            return func(*args, **kwargs)  # not random, or the user's own generator / output buffer: theirs
        if not torch.compiler.is_compiling() and _inside_the_users_model():
            # randomness inside the model (dropout, noise) is the tap's to refuse in discovery, not to answer
            return func(*args, **kwargs)
        return getattr(self, handler)(*args, **{k: v for k, v in kwargs.items() if k != "generator"})

    # -- draws shaped like an output --

    def _draw(self, shape: Sequence[int], streams: int = 1) -> Tuple[torch.Tensor, ...]:
        """``streams`` float64 uniform tensors of ``shape`` for the next random call."""
        call, self.calls = self.calls, self.calls + 1
        shape = tuple(shape)
        numel = math.prod(shape)
        batch = self.examples.shape[0]
        if len(shape) >= 1 and shape[0] >= batch and shape[0] % batch == 0:
            keys, count = self.examples, numel // batch  # example-major: each example its own block
        else:
            keys, count = self.examples[:1], numel  # no example dimension: keyed by the batch's first example
        return tuple(uniforms(self.seed, call, s, keys, count, self.draw).reshape(shape) for s in range(streams))

    def _normals(self, shape: Sequence[int]) -> torch.Tensor:
        u1, u2 = self._draw(shape, streams=2)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)

    # -- handlers --

    def _multinomial(self, input, num_samples, replacement=False):
        probs = input if input.dim() == 2 else input[None]
        _check_probabilities(probs.detach(), "torch.multinomial", upper=False)
        rows, categories = probs.shape
        if replacement or num_samples == 1:
            (u,) = self._draw((rows, num_samples))
            cdf = probs.detach().to(torch.float64).cumsum(-1)
            target = u * cdf[:, -1:]
            picked = (cdf[:, None, :] < target[:, :, None]).sum(-1).clamp_max(categories - 1)
        else:
            (u,) = self._draw((rows, categories))
            keys = torch.log(probs.detach().to(torch.float64)) - torch.log(-torch.log(u))
            picked = keys.topk(num_samples, dim=-1).indices
        return picked if input.dim() == 2 else picked[0]

    def _bernoulli(self, input, p=None):
        (u,) = self._draw(input.shape)
        probs = input.detach() if p is None else p
        if isinstance(probs, torch.Tensor):
            _check_probabilities(probs.detach(), "torch.bernoulli", upper=True)
            probs = probs.to(torch.float64)
        return (u < probs).to(input.dtype)

    def _bernoulli_(self, input, p=0.5):
        return input.copy_(self._bernoulli(input, p))

    def _uniform(self, shape, dtype):
        (u,) = self._draw(shape)
        if dtype != torch.float64:  # [0, 1) in the narrower type: round down to its mantissa
            u = torch.floor(u * 2.0 ** 24) * 2.0 ** -24
        return u

    def _rand(self, *size, **kwargs):
        like = torch.empty(_size(size), **_factory(kwargs))
        return self._uniform(like.shape, like.dtype).to(like)

    def _rand_like(self, input, **kwargs):
        like = torch.empty_like(input, **_factory(kwargs))
        return self._uniform(like.shape, like.dtype).to(like)

    def _randn(self, *size, **kwargs):
        like = torch.empty(_size(size), **_factory(kwargs))
        return self._normals(like.shape).to(like)

    def _randn_like(self, input, **kwargs):
        like = torch.empty_like(input, **_factory(kwargs))
        return self._normals(like.shape).to(like)

    def _integers(self, low, high, like):
        (u,) = self._draw(like.shape)
        return torch.floor(low + u * (high - low)).clamp_max(high - 1).to(like)

    def _randint(self, *args, **kwargs):
        bounds, size = (args[:-1], args[-1]) if "size" not in kwargs else (args, kwargs["size"])
        low, high = (0, bounds[0]) if len(bounds) == 1 else bounds
        return self._integers(low, high, torch.empty(_size((size,)), **_factory(kwargs, torch.int64)))

    def _randint_like(self, input, *args, **kwargs):
        low, high = (0, args[0]) if len(args) == 1 else args
        return self._integers(low, high, torch.empty_like(input, **_factory(kwargs)))

    def _normal(self, mean, std=1.0, size=None, **kwargs):
        if size is not None:
            like = torch.empty(_size((size,)), **_factory(kwargs))
        else:
            tensors = [t for t in (mean, std) if isinstance(t, torch.Tensor)]
            like = torch.empty(torch.broadcast_shapes(*(t.shape for t in tensors)),
                               dtype=tensors[0].dtype, device=tensors[0].device)
        return (mean + std * self._normals(like.shape)).to(like)

    def _uniform_(self, input, a=0.0, b=1.0, **kwargs):
        a, b = kwargs.get("from", a), kwargs.get("to", b)
        return input.copy_(a + (b - a) * self._uniform(input.shape, input.dtype))

    def _normal_(self, input, mean=0.0, std=1.0):
        return input.copy_(mean + std * self._normals(input.shape))

    def _exponential_(self, input, lambd=1.0):
        (u,) = self._draw(input.shape)
        return input.copy_(-torch.log(u) / lambd)


_HANDLERS = {
    torch.multinomial: "_multinomial", torch.Tensor.multinomial: "_multinomial",
    torch.bernoulli: "_bernoulli", torch.Tensor.bernoulli: "_bernoulli", torch.Tensor.bernoulli_: "_bernoulli_",
    torch.rand: "_rand", torch.randn: "_randn", torch.randint: "_randint", torch.rand_like: "_rand_like",
    torch.randn_like: "_randn_like", torch.randint_like: "_randint_like", torch.normal: "_normal",
    torch.Tensor.uniform_: "_uniform_", torch.Tensor.normal_: "_normal_", torch.Tensor.exponential_: "_exponential_",
}


# -- the task the pipeline runs ---------------------------------------------------------------------

def with_example_ids(batch: Any, first: int, examples: int, device: torch.device) -> Tuple[Any, torch.Tensor]:
    """``(batch, ids)``: the batch and the dataset indices ``first .. first + examples - 1`` of its examples."""
    return batch, torch.arange(first, first + examples, dtype=torch.int64, device=device)


class SeededTask:
    """The user's task, fed ``(batch, ids)`` batches; ``compute_train_loss(..., sample=True)`` runs under
    :class:`ExampleDraws` with draw index ``draw`` (set by a fit step that draws several labels per example, see
    :func:`set_draw`). Everything else is the user's task, called with the plain batch."""

    def __init__(self, task: Any, seed: int = 0):
        self.task = task
        self.seed = int(seed)
        self.draw = 0

    @property
    def wraps(self) -> Any:
        """The user's task (what decides which code runs)."""
        return self.task

    def compute_train_loss(self, batch, model, sample: bool = False):
        inner, ids = batch
        if not sample:
            return self.task.compute_train_loss(inner, model, sample=False)
        with ExampleDraws(ids, self.seed, self.draw):
            return self.task.compute_train_loss(inner, model, sample=True)

    def compute_measurement(self, batch, model):
        return self.task.compute_measurement(batch[0], model)

    def get_attention_mask(self, batch):
        return self.task.get_attention_mask(batch[0]) if hasattr(self.task, "get_attention_mask") else None

    def __getattr__(self, name):  # tracked modules, post-processing flags, ...: the user's task's own
        if name == "task":
            raise AttributeError(name)
        return getattr(self.task, name)


def set_draw(task: Any, draw: int) -> None:
    """The draw index the sampled objective of ``task`` (a :class:`SeededTask`) uses from now on. A plain
    attribute, set inside the (possibly compiled) step: each draw's index is a constant of the graph."""
    task.draw = draw


def batch_generator_seed(seed: int, first: int) -> int:
    """The seed of PyTorch's generators for the batch whose first example is ``first`` (the fallback for random
    functions :class:`ExampleDraws` does not answer): a 63-bit hash of (seed, first)."""
    state = _absorb(_key(seed, 0, 0xFA11BAC), first)
    return (_mix(state ^ 1) << 31) ^ _mix(state ^ 2)


@contextlib.contextmanager
def seeded_generators(seed: int, first: int, device: torch.device):
    """PyTorch's CPU generator (and ``device``'s) seeded for one batch, restored afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(batch_generator_seed(seed, first))
        yield
