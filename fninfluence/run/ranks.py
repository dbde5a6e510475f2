"""Data-parallel fitting and scoring over ``torch.distributed``: who computes which cell, and the exchanges.

fninfluence already splits every pass into cells (data partition x module partition, see
:mod:`.partitions`) that separate processes can fill. Under ``torchrun`` (an initialised process group
with more than one rank) the cells of a call are dealt round-robin to the ranks, and the results are
brought together without changing a single bit compared with a one-process run over the same cells:

* **fitting**: the partial states of a layer (sums over one data partition each) are sent to the rank
  that owns the layer (layers are dealt round-robin too), which stacks and sums them in partition order
  exactly as the one-process path and the store do, runs the layer's ``finalize`` (the
  eigendecompositions) and broadcasts the outputs. With a store, ranks write their own cells, the
  owners read the partial sums back and write the layer's outputs, and every rank reads the factors.
* **scoring**: each rank scores its cells; with a store it writes its chunks of the score array directly
  (data partitions are chunk-aligned), rank 0 marks the store complete, and every rank reads it back;
  without one, each cell is broadcast by its owner so that every rank returns the full result.

Tensors travel as raw bytes with a small header (dtype code, shape), so any dtype crosses any backend
unchanged. Collectives use the CPU for gloo and the current CUDA device for NCCL.

A rank that stops answering (frozen by SIGSTOP, a hung host) is named after ``FNINFLUENCE_RANK_TIMEOUT``
seconds (default 120; 0 turns the check off) by the ranks waiting for it, instead of after the backend's own
timeout (gloo's default is 30 minutes): see :class:`Heartbeat`. A rank that is merely slow keeps beating.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn

from ..errors import InfluenceError
from ..store.describe import missing_cells  # noqa: F401 - job arrays' documented name; it reads a store
from ..task import Task, tracked_module_names

logger = logging.getLogger("fninfluence")

Item = TypeVar("Item")
CellKey = Tuple[int, int]  # (module partition, data partition)
States = Dict[str, torch.Tensor]

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_MAX_DIMS = 8


@dataclass(frozen=True)
class Ranks:
    """This process's place in the default process group: ``rank`` of ``world``."""

    rank: int
    world: int
    device: torch.device  # where tensors must be for the backend's collectives

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that handles item ``index`` of a shared list (round-robin)."""
        return index % self.world

    def mine(self, items: Sequence[Item]) -> List[Item]:
        """This rank's share of ``items``: every ``world``-th one, starting at ``rank``."""
        return list(items[self.rank::self.world])

    def barrier(self) -> None:
        wait(self, torch.distributed.barrier(async_op=True), "barrier")

    def total(self, count: int) -> int:
        """The sum of an integer over all ranks (exact: int64)."""
        return self._reduce(count, torch.distributed.ReduceOp.SUM, "sum")

    def largest(self, count: int) -> int:
        """The largest value of an integer over all ranks."""
        return self._reduce(count, torch.distributed.ReduceOp.MAX, "maximum")

    def _reduce(self, count: int, op, what: str) -> int:
        value = torch.tensor([count], dtype=torch.int64, device=self.device)
        wait(self, torch.distributed.all_reduce(value, op=op, async_op=True), what)
        return int(value.item())


# -- a rank that stops answering -------------------------------------------------------------------------

RANK_TIMEOUT_VARIABLE = "FNINFLUENCE_RANK_TIMEOUT"
_BEAT_SECONDS = 1.0


def rank_timeout() -> float:
    """Seconds without a heartbeat after which a peer counts as stopped (0: never)."""
    value = os.environ.get(RANK_TIMEOUT_VARIABLE, "120")
    try:
        seconds = float(value)
    except ValueError:
        raise InfluenceError(f"{RANK_TIMEOUT_VARIABLE}={value!r} is not a number of seconds.") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise InfluenceError(f"{RANK_TIMEOUT_VARIABLE} must be a number of seconds >= 0, got {value!r}.")
    return seconds


class Heartbeat:
    """A daemon thread that bumps this rank's counter in the process group's store every second and reads
    the other ranks' counters.

    A rank waiting in a collective (:func:`wait`) asks :meth:`stopped` which peers' counters have not moved
    for the timeout: a process that stops altogether (SIGSTOP, a hung host) stops beating, a slow one does
    not (the thread runs while the main thread computes). Peers that have not beaten yet are not judged, so
    a rank that starts late is not mistaken for a stopped one. Counters are compared for change, not as
    times, so clocks on different hosts need not agree.
    """

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank = store, rank
        self._key = lambda r: f"fninfluence/heartbeat/{r}"
        self._seen: Dict[int, Tuple[Optional[bytes], float]] = {r: (None, time.monotonic())
                                                              for r in range(world) if r != rank}
        self._polled = time.monotonic()
        self._lock = threading.Lock()
        self._beats = 0
        self.store.set(self._key(rank), "0")
        threading.Thread(target=self._run, name="fninfluence-heartbeat", daemon=True).start()

    def _run(self) -> None:
        try:
            while True:
                self._beats += 1
                self.store.set(self._key(self.rank), str(self._beats))
                for peer in self._seen:
                    value = self.store.get(self._key(peer)) if self.store.check([self._key(peer)]) else None
                    now = time.monotonic()
                    with self._lock:
                        if value != self._seen[peer][0]:
                            self._seen[peer] = (value, now)
                        self._polled = now
                time.sleep(_BEAT_SECONDS)
        except Exception:  # the process group (and its store) went away: nothing left to watch
            return

    def stopped(self, limit: float) -> List[str]:
        """The peers (as text) silent for more than ``limit`` seconds; the store itself, if it does not answer."""
        now = time.monotonic()
        with self._lock:
            if now - self._polled > limit + _BEAT_SECONDS:
                return ["the process group's store (hosted by rank 0 or the launcher)"]
            return [f"rank {peer}" for peer, (value, changed) in self._seen.items()
                    if value is not None and now - changed > limit]


_heartbeats: Dict[int, Heartbeat] = {}


def _heartbeat(rank: int, world: int) -> Optional[Heartbeat]:
    """This process's heartbeat for the current default process group (started on first use)."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None
    key = id(store)
    if key not in _heartbeats:
        _heartbeats.clear()  # an earlier process group's thread has stopped with its store
        _heartbeats[key] = Heartbeat(store, rank, world)
    return _heartbeats[key]


def wait(ranks: "Ranks", work, what: str) -> None:
    """Wait for an asynchronous collective, raising if a peer stops answering meanwhile (see :class:`Heartbeat`).

    ``work.wait()`` runs in a helper thread (it releases the GIL) because gloo's point-to-point works report
    completion only through ``wait``; the calling thread watches the heartbeats until it returns.
    """
    limit = rank_timeout()
    heartbeat = _heartbeat(ranks.rank, ranks.world) if limit else None
    if heartbeat is None:
        work.wait()
        return
    failure: List[BaseException] = []

    def run() -> None:
        try:
            work.wait()
        except BaseException as error:  # re-raised in the calling thread
            failure.append(error)

    waiter = threading.Thread(target=run, name=f"fninfluence-{what}", daemon=True)
    waiter.start()
    pause = 1e-4
    while waiter.is_alive():
        stopped = heartbeat.stopped(limit)
        if stopped:
            raise InfluenceError(
                f"{', '.join(stopped)} stopped answering: no heartbeat for {limit:g} s while rank {ranks.rank} "
                f"waited for it in a {what} (a frozen, stopped or hung process). Cells already written to a store "
                f"are kept: end the job and rerun it. To wait longer, set {RANK_TIMEOUT_VARIABLE} (seconds)."
            )
        waiter.join(pause)
        pause = min(2 * pause, 0.02)
    if failure:
        raise failure[0]


# -- models, tasks and data --------------------------------------------------------------------------


def ranks(distributed: Optional[bool]) -> Optional[Ranks]:
    """The process group to spread work over, or None for a one-process run.

    ``distributed=None`` (the default of every entry point) uses the default process group when one is
    initialised with more than one rank; ``False`` ignores it (each rank then computes everything
    itself, e.g. inside a training job that is data-parallel for other reasons); ``True`` requires it.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise InfluenceError(f"distributed must be None (automatic), True or False, got {distributed!r}.")
    if distributed is False:
        return None
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not initialised:
        if distributed:
            raise InfluenceError(
                "distributed=True, but no torch.distributed process group is initialised. Launch with torchrun and "
                "call torch.distributed.init_process_group() first (backend 'nccl' on GPUs, 'gloo' on CPUs)."
            )
        return None
    world = torch.distributed.get_world_size()
    if world == 1:
        return None
    ranks = Ranks(torch.distributed.get_rank(), world, _collective_device())
    if rank_timeout():
        _heartbeat(ranks.rank, ranks.world)  # start beating now, before the first collective
    return ranks


def _collective_device() -> torch.device:
    backend = str(torch.distributed.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def enough_partitions(data_partitions: int, module_partitions: int, ranks: Optional[Ranks],
                      sharded: bool = False) -> int:
    """The data partitions to use: ``data_partitions``, raised so that there is a cell for every rank.

    Results equal a one-process run with the returned number of partitions bit for bit (and any other
    number up to rounding): pass it explicitly to resume a distributed store from a single process. A sharded
    model (``sharded``) gets a multiple of the ranks, so that the ranks, dealt cells in turn, always work on
    the same module partition at the same time (their forward and backward passes are collectives).
    """
    if ranks is None or not isinstance(data_partitions, int) or not isinstance(module_partitions, int):
        return data_partitions
    if sharded:
        return math.ceil(data_partitions / ranks.world) * ranks.world
    if data_partitions * module_partitions >= ranks.world:
        return data_partitions
    raised = math.ceil(ranks.world / module_partitions)
    logger.info("%d ranks: using %d data partitions instead of %d, one cell per rank at least.", ranks.world,
                raised, data_partitions)
    return raised


# -- models, tasks and data --------------------------------------------------------------------------

def unwrap(model: nn.Module, task: Task) -> Tuple[nn.Module, Task]:
    """The model to run (``DistributedDataParallel`` / ``DataParallel`` unwrapped) and a task whose tracked
    module names fit it (a ``"module."`` prefix taken from the wrapped model's names is dropped).

    DDP's forward adds gradient-synchronisation machinery that ``torch.func`` does not need; its
    ``module`` holds the same parameters on every rank. A model sharded by ``fully_shard`` (FSDP2) is run as it
    is (:mod:`fninfluence.capture.sharded`); FSDP1 and other DTensor models are refused there.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    names = tracked_module_names(task)
    if not names:
        return model, task
    known = {name for name, _ in model.named_modules()}
    renamed = [name[len("module."):] if name not in known and name.startswith("module.")
               and name[len("module."):] in known else name for name in names]
    return model, (task if renamed == list(names) else _RenamedTask(task, renamed))


class _RenamedTask(Task):
    """``task`` with other tracked module names; every other attribute is the original task's."""

    def __init__(self, task: Task, names: List[str]):
        self._task, self._names = task, names

    @property
    def wraps(self) -> Task:
        """The user's task (what decides which code runs)."""
        return self._task

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        return self._task.compute_train_loss(batch, model, sample)

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self._task.compute_measurement(batch, model)

    def get_attention_mask(self, batch: Any):
        return self._task.get_attention_mask(batch)

    def tracked_modules(self) -> List[str]:
        return list(self._names)

    def get_influence_tracked_modules(self) -> List[str]:
        return list(self._names)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_task"], name)


def check_data(data: Any, argument: str) -> None:
    """Refuse a DataLoader with a ``DistributedSampler``: fninfluence shards by rank itself, and scores are
    indexed by example, so every rank must see the whole data set."""
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
        raise InfluenceError(
            f"{argument} is a DataLoader with a DistributedSampler, so each rank sees a different part of the data. "
            f"Pass the whole Dataset as {argument} (or a DataLoader without that sampler) on every rank: fninfluence "
            "deals the "
            "data partitions to the ranks itself."
        )


# -- moving tensors ----------------------------------------------------------------------------------

_HEADER = 2 + 2 * _MAX_DIMS  # dtype code, dimensions, shape, strides


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its elements fill one block of memory in some dimension order (a transposed or
    permuted result), else a contiguous copy. Receivers rebuild the same strides: the layout of an operand
    can change which kernel a later contraction uses, and with it the last bits of the result."""
    order = sorted(range(tensor.dim()), key=lambda i: -tensor.stride(i))
    dense = tensor.permute(order).is_contiguous() and all(s > 0 for s in tensor.stride())
    return tensor if dense else tensor.contiguous()


def _header(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.dim() > _MAX_DIMS or tensor.dtype not in _DTYPES:
        raise InfluenceError(f"Cannot exchange a {tensor.dtype} tensor of shape {tuple(tensor.shape)} between ranks.")
    padding = [0] * (_MAX_DIMS - tensor.dim())
    values = [_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape, *padding, *tensor.stride(), *padding]
    return torch.tensor(values, dtype=torch.int64, device=device)


def _empty_like_header(header: torch.Tensor, device: torch.device) -> torch.Tensor:
    code, ndim, *rest = (int(v) for v in header.tolist())
    shape, stride = rest[:ndim], rest[_MAX_DIMS:_MAX_DIMS + ndim]
    return torch.empty_strided(shape, stride, dtype=_DTYPES[code], device=device)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The memory block of a dense tensor (see :func:`_dense`) as bytes, in memory order: a view."""
    block = torch.as_strided(tensor, (tensor.numel(),), (1,), tensor.storage_offset())
    return block.view(torch.uint8)


def broadcast(ranks: Ranks, tensor: Optional[torch.Tensor], source: int, device: torch.device) -> torch.Tensor:
    """``tensor`` of rank ``source`` on every rank (on ``device``), bit for bit, whatever its dtype."""
    original, tensor = tensor, (_dense(tensor) if ranks.rank == source else None)
    header = _header(tensor, ranks.device) if ranks.rank == source else \
        torch.zeros(_HEADER, dtype=torch.int64, device=ranks.device)
    wait(ranks, torch.distributed.broadcast(header, source, async_op=True), "broadcast")
    if ranks.rank == source:
        payload = _as_bytes(tensor.to(ranks.device))
    else:
        received = _empty_like_header(header, ranks.device)
        payload = _as_bytes(received)
    if payload.numel():
        wait(ranks, torch.distributed.broadcast(payload, source, async_op=True), "broadcast")
    if ranks.rank == source:
        return original.to(device)
    return received.to(device)  # ``payload`` is a view of ``received``


def _send(ranks: Ranks, tensor: torch.Tensor, destination: int) -> None:
    tensor = _dense(tensor)
    header = _header(tensor, ranks.device)
    wait(ranks, torch.distributed.isend(header, destination), "send")
    payload = _as_bytes(tensor.to(ranks.device))
    if payload.numel():
        wait(ranks, torch.distributed.isend(payload, destination), "send")


def _receive(ranks: Ranks, source: int, device: torch.device) -> torch.Tensor:
    header = torch.zeros(_HEADER, dtype=torch.int64, device=ranks.device)
    wait(ranks, torch.distributed.irecv(header, source), "receive")
    received = _empty_like_header(header, ranks.device)
    payload = _as_bytes(received)
    if payload.numel():
        wait(ranks, torch.distributed.irecv(payload, source), "receive")
    return received.to(device)


# -- fitting -------------------------------------------------------------------------------------------

def sum_in_order(partials: List[States]) -> States:
    """``sum_d partials[d]`` as ``stack(...).sum(0)``: the same reduction as the one-process path and the
    store's ``sum_partials``, so every route gives identical bits."""
    return {k: torch.stack([p[k].to(partials[0][k].dtype) for p in partials]).sum(0) for k in partials[0]}


def finalize_pass(ranks: Ranks, fit_passes: Dict[str, Any], cells: Sequence[CellKey], partition_layers: List[List[str]],
                  computed: Dict[CellKey, Dict[str, States]], earlier: Dict[str, States],
                  device: torch.device) -> Dict[str, States]:
    """One fitting pass brought together in memory: ``{layer: outputs of finalize}`` on every rank.

    ``cells`` lists every cell of the pass in order (module partition, then data partition); cell ``i``
    was computed by rank ``owner(i)`` and is in its ``computed``. Layer ``j`` (in ``fit_passes`` order)
    is owned by rank ``owner(j)``, which receives the layer's partial states of every cell point to point,
    sums them in data-partition order, finalizes, and broadcasts the outputs.
    """
    layers = list(fit_passes)
    cell_owner = {cell: ranks.owner(i) for i, cell in enumerate(cells)}
    mine: Dict[str, List[States]] = {}
    # one global order of (layer, cell) transfers, each between two ranks: every rank walks the same
    # order, so sends and receives pair up and nothing deadlocks
    for j, layer in enumerate(layers):
        layer_owner = ranks.owner(j)
        m = next(i for i, g in enumerate(partition_layers) if layer in g)
        for cell in [c for c in cells if c[0] == m]:
            source = cell_owner[cell]
            if source == ranks.rank and layer_owner == ranks.rank:
                mine.setdefault(layer, []).append(computed[cell][layer])
            elif source == ranks.rank:
                _send_states(ranks, computed[cell][layer], layer_owner)
            elif layer_owner == ranks.rank:
                mine.setdefault(layer, []).append(_receive_states(ranks, source, device))
    outputs = {layer: fit_passes[layer].finalize(sum_in_order(mine[layer]), earlier[layer])
               for layer in layers if layer in mine}
    return share_outputs(ranks, layers, outputs, device)


def _send_states(ranks: Ranks, states: States, destination: int) -> None:
    names = sorted(states)
    _send(ranks, _encode(names), destination)
    for name in names:
        _send(ranks, states[name], destination)


def _receive_states(ranks: Ranks, source: int, device: torch.device) -> States:
    names = _decode(_receive(ranks, source, torch.device("cpu")))
    return {name: _receive(ranks, source, device) for name in names}


def _encode(names: List[str]) -> torch.Tensor:
    return torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8)


def _decode(encoded: torch.Tensor) -> List[str]:
    text = bytes(encoded.tolist()).decode()
    return text.split("\n") if text else []


def share_outputs(ranks: Ranks, layers: Sequence[str], outputs: Dict[str, States],
                  device: torch.device) -> Dict[str, States]:
    """Every layer's outputs, broadcast from its owner (layer ``j`` -> rank ``owner(j)``) to all ranks."""
    shared: Dict[str, States] = {}
    for j, layer in enumerate(layers):
        source = ranks.owner(j)
        names = sorted(outputs[layer]) if source == ranks.rank else None
        names = _broadcast_names(ranks, names, source)
        shared[layer] = {name: broadcast(ranks, outputs[layer][name] if source == ranks.rank else None, source, device)
                         for name in names}
    return shared


def _broadcast_names(ranks: Ranks, names: Optional[List[str]], source: int) -> List[str]:
    """A list of output names from ``source`` (outputs are named by the estimator, not fixed in advance)."""
    return _decode(broadcast(ranks, None if names is None else _encode(names), source, torch.device("cpu")))


def finalize_stored_pass(ranks: Ranks, saved, pass_name: str, fit_passes: Dict[str, Any],
                         earlier: Dict[str, States]) -> None:
    """A stored pass whose cells are all written: each layer's owner sums its partials from the store,
    finalizes and writes the outputs; rank 0 marks the pass done once all are written."""
    layers = [layer for j, layer in enumerate(fit_passes) if ranks.owner(j) == ranks.rank]
    summed = saved.sum_partials(pass_name, layers)
    outputs = {layer: fit_passes[layer].finalize(summed[layer], earlier[layer]) for layer in layers}
    saved.write_pass_outputs(pass_name, outputs, mark=False)
    ranks.barrier()
    if ranks.leader:
        saved.mark_pass_done(pass_name)
    ranks.barrier()


# -- scoring -------------------------------------------------------------------------------------------

def share_cells(ranks: Ranks, cells: Sequence[CellKey], partition_layers: List[List[str]],
                computed: Dict[CellKey, Dict[str, torch.Tensor]],
                device: torch.device) -> Dict[CellKey, Dict[str, torch.Tensor]]:
    """Every cell's per-layer scores on every rank: cell ``i`` is broadcast by rank ``owner(i)``."""
    return {cell: {layer: broadcast(ranks, computed[cell][layer] if ranks.owner(i) == ranks.rank else None,
                                    ranks.owner(i), device)
                   for layer in partition_layers[cell[0]]}
            for i, cell in enumerate(cells)}


def share_batches(ranks: Ranks, chunks: List[Optional[Dict[str, torch.Tensor]]], layers: Sequence[str],
                  device: torch.device) -> List[Dict[str, torch.Tensor]]:
    """Per-batch results ``{layer: tensor}`` on every rank: batch ``i`` was computed by rank ``owner(i)``
    (the others hold None there) and is broadcast from it."""
    return [{layer: broadcast(ranks, chunk[layer] if ranks.owner(i) == ranks.rank else None, ranks.owner(i), device)
             for layer in layers}
            for i, chunk in enumerate(chunks)]


def open_in_turn(ranks: Optional[Ranks], open_store: Callable[[bool], Any], overwrite: bool):
    """Open (or create) a store: rank 0 first, alone when ``overwrite`` deletes the old one, then the rest."""
    if ranks is None:
        return open_store(overwrite)
    saved = open_store(overwrite) if ranks.leader else None
    ranks.barrier()
    return saved if ranks.leader else open_store(False)
