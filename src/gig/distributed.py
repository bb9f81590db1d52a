"""Several processes on one run: ``torchrun --nproc_per_node=N -m gig run ...``.

torchrun starts N copies of the command with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set.
gig then splits the sharded stages (collect, decompose, attribute) by shard: rank ``r`` computes
the shards ``r, r + N, r + 2N, …`` and writes them into the run store itself; rank 0 alone
writes the config and the manifest, merges the shards and runs the stages that are not sharded
(concepts, graph), while the others wait at a barrier. Shards are named by their index, so a
launch with any number of processes, after a crash of any rank, finishes exactly the shards
that are missing. Gloo on CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class Ranks:
    """This process's place in the launch: ``rank`` of ``world`` (1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """The items this rank computes: every ``world``-th, starting at ``rank``."""
        return list(items[self.rank :: self.world])

    def shards(self, items: Sequence[T], size: int) -> tuple[list[tuple[str, list[T]]], int]:
        """``items`` cut into shards of ``size``, named by index (``00000``, …): this rank's
        ``(name, shard)`` pairs and the number of shards in all."""
        cut = [list(items[i : i + size]) for i in range(0, len(items), size)]
        return self.mine([(f"{index:05d}", shard) for index, shard in enumerate(cut)]), len(cut)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a JSON-like object), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a JSON-like object), e.g. the λ picked per layer, so that
        every rank codes with exactly the same numbers."""
        if self.world == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def from_environment(device: str) -> tuple[Ranks, str]:
    """The ranks of this launch (from torchrun's variables) and the device this rank uses;
    initialises the process group once. ``device`` ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        device = f"cuda:{ranks.local_rank}"
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group(backend)
    return ranks, device


@contextmanager
def sharded_stage(store, stage: str, ranks: Ranks) -> Iterator[dict[str, Any]]:
    """:meth:`RunStore.stage` for a stage whose shards several ranks compute.

    Rank 0 opens the stage (wiping stale artefacts, marking it running) before any rank writes a
    shard, and closes it (marking it done) before any rank goes on; the body runs on every rank
    and must call ``ranks.barrier()`` between its shards and its merge (which rank 0 alone does).
    Other ranks get a summary dict that is thrown away.
    """
    if ranks.is_main:
        with store.stage(stage) as summary:
            ranks.barrier()
            yield summary
    else:
        ranks.barrier()
        yield {}
    ranks.barrier()


class ShardLoop(Generic[T]):
    """The sharded stage loop, written once for collect, decompose and attribute: this rank's
    shards of ``items`` (:meth:`Ranks.shards`), skipping those already marked done (a resumed
    stage), with one progress bar (rank 0's) advanced by finished shards; after the last shard
    every rank waits at the barrier, so rank 0 can merge.

    >>> loop = ShardLoop(store, "decompose", ranks, records, SHARD_IMAGES, progress)  # doctest: +SKIP
    >>> for name, shard in loop:                    # compute and write shard ``name``, then
    ...     store.mark_shard("decompose", name)      # mark it (the body owns its artefacts)
    >>> loop.n_shards                               # shards of the whole stage (all ranks)

    The body may advance :attr:`bar` itself within a shard (per batch); whatever it did not
    count is counted when the shard ends."""

    def __init__(
        self, store, stage: str, ranks: Ranks, items: Sequence[T], size: int, progress: bool, unit: str = "img"
    ):
        from tqdm.auto import tqdm

        self.store, self.stage, self.ranks = store, stage, ranks
        self.mine, self.n_shards = ranks.shards(items, size)
        self.bar = tqdm(
            total=sum(len(s) for _, s in self.mine), desc=stage, unit=unit, disable=not progress or not ranks.is_main
        )

    def __iter__(self) -> Iterator[tuple[str, list[T]]]:
        for name, shard in self.mine:
            if self.store.shard_done(self.stage, name):
                self.bar.update(len(shard))
                continue
            before = self.bar.n
            yield name, shard
            self.bar.update(max(0, len(shard) - (self.bar.n - before)))
        self.bar.close()
        self.ranks.barrier()  # every rank's shards written
