"""Many processes, one output: a run under torchrun splits the plan's saved tensors among its ranks.

Each rank computes a share of the tensors, chosen from the plan alone (so every rank computes the same split
without asking the others): runs of consecutive tensors in schedule order, balanced by bytes, so that a rank reads
only the inputs its tensors need and no tensor is computed twice. Rank 0 stages the output folders and sizes
their shards; each rank writes its tensors at their offsets (disjoint regions of the shared files); rank 0 writes
the index, config and card and commits once every rank is done. The collectives are barriers and small objects,
over gloo (docs/distributed.md).
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from mgc.core.errors import MgcError

TIMEOUT = datetime.timedelta(hours=6)  # a barrier waits for the slowest rank's whole share


class RankStopped(MgcError):
    """Another rank failed (its own message says why), or the group could not be reached."""


def _collective(fn):
    """A collective of World: an error of the group (a rank that crashed closes its connections) is RankStopped."""
    def run(self, *args):
        try:
            return fn(self, *args)
        except RuntimeError:
            raise RankStopped("stopped: another rank of the run failed (its message says why)") from None

    return run


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @_collective
    def barrier(self) -> None:
        if self.size > 1:  # polled, so that a signal (torchrun stopping the ranks) is handled while it waits
            work = torch.distributed.barrier(async_op=True)
            while not work.is_completed():
                time.sleep(0.02)
            work.wait()

    @_collective
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if self.size == 1:
            return obj
        self.barrier()  # the waiting is done here, where a signal is seen; the exchange itself is quick
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @_collective
    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        self.barrier()
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def device(self, dev: torch.device) -> torch.device:
        """A rank's device: its own GPU (LOCAL_RANK) where the run computes on cuda."""
        if self.size > 1 and dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return dev


SINGLE = World()


def world_from_env(distributed: bool = False) -> World:
    """The World torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), its process group
    made (gloo); SINGLE without torchrun. `distributed` (mgc run --distributed) requires torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if "WORLD_SIZE" not in os.environ and distributed:
        raise MgcError("--distributed needs the environment torchrun sets (WORLD_SIZE, RANK, MASTER_ADDR, ...)",
                       hint="start it as: torchrun --nproc-per-node N -m mgc run RECIPE")
    if size <= 1:
        return SINGLE
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():  # for any tensor sent to "cuda" without an index
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=world.rank, world_size=size, timeout=TIMEOUT)
    return world


def share(units: list[tuple[Any, int]], world: World) -> set:
    """The keys of `units` (key, bytes), in order, that `world.rank` computes: consecutive runs, each rank's
    about 1/size of the bytes (a unit goes to the rank where its middle byte falls)."""
    if world.size == 1:
        return {k for k, _ in units}
    total = sum(n for _, n in units) or 1
    mine, before = set(), 0
    for key, n in units:
        if min(world.size - 1, (2 * before + n) * world.size // (2 * total)) == world.rank:
            mine.add(key)
        before += n
    return mine


def close() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
