"""Data-parallel extraction: the same ``sap extract`` on N processes (one per GPU) under ``torchrun``.

Every rank plans the same shards and batches a single-process run would
(:func:`~sapguard.features.extract.plan_shards`), reads the batches it is given (length-balanced by
padded tokens) with the same loop (:func:`~sapguard.features.extract.read_batches`), and rank 0
gathers the rows and writes the one features directory, shard by shard, with the same store code as
:func:`~sapguard.features.extract.extract_to_dir` (resumable, atomic, same manifest). Each batch
holds the same texts as in a single-process run, so each row is the same computation: the merged
directory equals a single-process one (byte for byte on CPU). Other ranks write nothing.

Rows travel as CPU tensors over a gloo process group (the features are on the host anyway; under a
job already using NCCL a gloo side group is made), so the compute device is free:
``cuda:LOCAL_RANK`` on GPUs, the CPU otherwise. Every step is a collective that carries each rank's
status: an error on any rank is raised on every rank, naming the rank, instead of leaving the others
waiting, and the round it happened in writes no shard. A rank that dies is noticed by the others'
next collective (and by ``torchrun``, which stops the job); one that hangs, after ``timeout``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sapguard.data.records import Record
from sapguard.errors import SapError
from sapguard.features.extract import (
    Encoded,
    open_store,
    plan_shards,
    read_batches,
    store_settings,
    write_manifest,
    write_shard,
)
from sapguard.features.hooks import LayerReader
from sapguard.features.policies import check_policy
from sapguard.features.store import FeatureSet, load_features
from sapguard.models.chat import resolve_template
from sapguard.models.layers import find_decoder_blocks, resolve_layer
from sapguard.models.loading import LoadedModel

logger = logging.getLogger(__name__)

T = TypeVar("T")
Rows = tuple[torch.Tensor, list[int], list[int]]

DEFAULT_TIMEOUT = timedelta(minutes=30)
"""How long a rank waits for the others at one step before giving up (a hung or lost rank)."""


class DistributedExtractionError(SapError):
    """A rank failed (or was lost) during data-parallel extraction; raised on every rank."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a job started by ``torchrun`` (or any launcher setting its variables)."""

    rank: int
    world_size: int
    local_rank: int


def dist_env() -> DistEnv | None:
    """``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment; None unless ``WORLD_SIZE`` > 1."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise SapError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world or local_rank < 0:
        raise SapError(f"RANK={rank} / LOCAL_RANK={local_rank} out of range for WORLD_SIZE={world}")
    return DistEnv(rank, world, local_rank)


def rank_device(device: str, local_rank: int) -> str:
    """The device one rank computes on: ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` (``auto``
    without CUDA: the CPU); an explicit ``cpu`` or ``cuda:N`` is kept."""
    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if device in ("auto", "cuda"):
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise SapError(
                f"LOCAL_RANK {local_rank} but {count} CUDA device(s) here; start at most {count} processes per machine"
            )
        return f"cuda:{local_rank}"
    return device


def assign_batches(costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of the batches each rank reads: longest first, each to the least-loaded rank (ties:
    the lowest rank); deterministic. ``costs`` are padded tokens per batch."""
    loads = [0] * world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        ranks[r].append(i)
        loads[r] += costs[i]
    return [sorted(r) for r in ranks]


def round_of(plan: Sequence[Sequence[list[Encoded]]], start: int, world_size: int) -> list[int]:
    """The shards read together from ``start``: whole shards, at least one, until every rank has a batch."""
    end, batches = start, 0
    while end < len(plan) and (end == start or batches < world_size):
        batches += len(plan[end])
        end += 1
    return list(range(start, end))


def extract_to_dir_distributed(
    lm: LoadedModel,
    records: Sequence[Record],
    out_dir: str | Path,
    layer: int,
    *,
    policy: str = "last_prompt",
    template: str = "auto",
    batch_size: int = 32,
    max_length: int = 1024,
    shard_records: int = 512,
    show_progress: bool = False,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> FeatureSet | None:
    """:func:`~sapguard.features.extract.extract_to_dir` on every process of a ``torch.distributed``
    job: each call site is the same on every rank (same records and options; ``lm`` on the rank's device).

    Joins the job from the launcher's environment (``torchrun``: ``MASTER_ADDR``, ``RANK``...) unless
    a process group exists already.

    Returns:
        The features on rank 0 (equal to a single-process run's); None on the other ranks.

    Raises:
        DistributedExtractionError: On every rank when any rank failed, naming it; the shards of
            the round that failed are not written (the directory stays resumable, as after a kill).
    """
    with _process_group(timeout) as group:
        comm = _Comm(group, timeout)
        return _extract(comm, lm, records, Path(out_dir), layer, policy, template, batch_size, max_length, shard_records, show_progress)


def _extract(
    comm: _Comm, lm: LoadedModel, records: Sequence[Record], out: Path, layer: int, policy: str, template: str,
    batch_size: int, max_length: int, shard_records: int, show_progress: bool,
) -> FeatureSet | None:
    def prepare() -> tuple[int, dict[str, Any], list[list[list[Encoded]]]]:
        check_policy(policy)
        resolved = resolve_layer(layer, len(find_decoder_blocks(lm.model)))
        chosen = resolve_template(lm.tokenizer, template)
        settings = store_settings(lm, records, resolved, policy, chosen, max_length, shard_records)
        return resolved, settings, plan_shards(lm, records, policy, chosen, max_length, shard_records, batch_size)

    error, prepared = _attempt(prepare)
    mark = None if prepared is None else _fingerprint(prepared[1], prepared[2])
    statuses = comm.all_gather((error, mark))
    comm.raise_failures(_failures([e for e, _ in statuses]))
    if len({m for _, m in statuses}) > 1:
        raise DistributedExtractionError(
            "ranks planned different work (other data, model, dtype or options); start every rank with the same command"
        )
    assert prepared is not None
    resolved, settings, plan = prepared
    sizes = [sum(len(b) for b in batches) for batches in plan]

    # Rank 0 opens (or resumes) the store; the others learn where it starts.
    shards: list[dict[str, Any]] = []
    opened: tuple[int, bool] | None = None
    failure: str | None = None
    if comm.rank == 0:

        def open_() -> tuple[int, bool]:
            done, complete = open_store(out, settings, records)
            shards.extend(done)
            if not complete:
                write_manifest(out, settings, shards, False)
            return len(shards), complete

        error, opened = _attempt(open_)
        failure = _failures([error])
    failure, opened = comm.broadcast((failure, opened))
    comm.raise_failures(failure)
    assert opened is not None
    start, complete = opened

    bar = tqdm(total=sum(sizes), initial=sum(sizes[:start]), desc="extract", unit="text",
               disable=not (show_progress and comm.rank == 0))
    with LayerReader(lm.model, resolved, stop=True) as reader, bar:
        number = start
        while number < len(plan) and not complete:
            chunks = round_of(plan, number, comm.world_size)
            work = [(n, j) for n in chunks for j in range(len(plan[n]))]
            costs = [len(plan[n][j]) * max(len(e.ids) for e in plan[n][j]) for n, j in work]
            mine = [work[i] for i in assign_batches(costs, comm.world_size)[comm.rank]]
            error, rows = _attempt(functools.partial(_read, reader, lm, plan, mine, policy))
            gathered = comm.gather((error, rows))
            failure = None
            if gathered is not None:  # rank 0: all rows of the round, or the ranks that failed
                failure = _failures([e for e, _ in gathered])
                if failure is None:
                    found: dict[tuple[int, int], Rows] = {}
                    for _, part in gathered:
                        found.update(part)
                    write_error, _ = _attempt(functools.partial(_write_round, out, settings, shards, plan, chunks, found, sizes, bar))
                    failure = _failures([write_error])
            comm.raise_failures(comm.broadcast(failure))
            number = chunks[-1] + 1

    result: FeatureSet | None = None
    failure = None
    if comm.rank == 0:

        def finish() -> FeatureSet:
            if not complete:
                write_manifest(out, settings, shards, True)
            return load_features(out)

        error, result = _attempt(finish)
        failure = _failures([error])
    comm.raise_failures(comm.broadcast(failure))
    return result


def _read(reader: LayerReader, lm: LoadedModel, plan: list[list[list[Encoded]]], mine: list[tuple[int, int]],
          policy: str) -> dict[tuple[int, int], Rows]:
    """This rank's batches of the round, each read by the single-process loop."""
    return {(n, j): read_batches(reader, lm, [plan[n][j]], policy) for n, j in mine}


def _write_round(out: Path, settings: dict[str, Any], shards: list[dict[str, Any]], plan: list[list[list[Encoded]]],
                 chunks: list[int], found: dict[tuple[int, int], Rows], sizes: list[int], bar: Any) -> None:
    """Rank 0: the round's shards, rows in batch order as a single process writes them."""
    for n in chunks:
        parts = [found[(n, j)] for j in range(len(plan[n]))]
        feats = torch.cat([f for f, _, _ in parts])
        index = [i for _, ids, _ in parts for i in ids]
        pos = [p for _, _, ps in parts for p in ps]
        shards.append(write_shard(out, n, feats, index, pos, sizes[n]))
        write_manifest(out, settings, shards, False)
        bar.update(sizes[n])


def _fingerprint(settings: dict[str, Any], plan: list[list[list[Encoded]]]) -> str:
    """What every rank must agree on: the manifest settings and the texts of every batch."""
    batches = [[[e.record_index for e in batch] for batch in chunk] for chunk in plan]
    return hashlib.sha256(json.dumps([settings, batches], sort_keys=True).encode("utf-8")).hexdigest()


def _attempt(fn: Callable[[], T]) -> tuple[str | None, T | None]:
    """``(None, fn())``, or ``(one-line error, None)``: an error is sent to the others, not raised alone."""
    try:
        return None, fn()
    except SapError as err:
        return (str(err).splitlines() or [type(err).__name__])[0], None
    except Exception as err:  # reported to every rank; the traceback stays in this rank's log
        logger.exception("data-parallel extraction failed on this rank")
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}", None


def _failures(errors: Sequence[str | None]) -> str | None:
    """One line naming the ranks that failed and why (ranks with the same error grouped)."""
    by_message: dict[str, list[int]] = {}
    for rank, error in enumerate(errors):
        if error is not None:
            by_message.setdefault(error, []).append(rank)
    if not by_message:
        return None
    parts = [f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {m}" for m, r in by_message.items()]
    return "data-parallel extraction failed on " + "; ".join(parts)


@contextlib.contextmanager
def _process_group(timeout: timedelta) -> Iterator[Any]:
    """A gloo group over every rank: the job's own if it is gloo, a side group if it is not
    (e.g. NCCL), else one joined from the environment (and left on exit)."""
    if dist.is_available() and dist.is_initialized():
        yield None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        return
    if not dist.is_available():
        raise SapError("this torch build has no torch.distributed")
    try:
        dist.init_process_group("gloo", timeout=timeout)
    except (ValueError, RuntimeError) as err:
        raise SapError(f"cannot join the data-parallel job (start it with torchrun): {str(err).splitlines()[0]}") from None
    try:
        yield None
    finally:
        dist.destroy_process_group()


class _Comm:
    """Object collectives over the gloo group; a lost or timed-out peer becomes a one-line error."""

    def __init__(self, group: Any, timeout: timedelta) -> None:
        self.group = group
        self.timeout = timeout
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    @contextlib.contextmanager
    def _lost(self) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:  # gloo: peer closed the connection, or timeout
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise DistributedExtractionError(
                f"rank {self.rank} lost the other ranks during data-parallel extraction "
                f"(one died, or waited longer than {self.timeout}): {first}"
            ) from None

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        with self._lost():
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0; None on the others."""
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        with self._lost():
            dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        with self._lost():
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def raise_failures(self, failure: str | None) -> None:
        if failure is not None:
            raise DistributedExtractionError(failure)
