"""A run's output folders: staged (or an interrupted run's taken over), their writers and journals, which
tensors each process writes, and, once all are written, the rest of each folder and the commit.

With one process it does all of it. Under torchrun (runtime/distributed.py) rank 0 stages the folders and sizes
the shards, every rank writes its share into them, and rank 0 finishes and commits.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

from mgc.compiler.ir import Save
from mgc.compiler.plan import format_bytes

from .adapter_out import AdapterWriter
from .aside import Heartbeat
from .distributed import RankStopped, World, share
from .journal import Journal, read_entries, verify
from .provenance import CARD_FILE, Provenance
from .resume import adoptable, node_hashes, run_key
from .staging import StagedOutput
from .stale import clean_stale, note
from .target import check_target
from .tokenizer_out import write_tokenizer
from .writer import _nbytes


class Outputs:
    def __init__(self, plan, order, world: World, device_type: str):
        self.plan, self.order, self.world = plan, order, world
        self.saves = plan.program.saves
        graph = plan.graph
        self.tensors = {s.path: [(p.tensor, p.shape, p.dtype) for p in (graph.payload(n) for n in order)
                                 if isinstance(p, Save) and p.output == s.path] for s in self.saves}
        self.provenance = {s.path: Provenance(plan, s) for s in self.saves}
        self.device_type = device_type
        self.staged: dict[Path, StagedOutput] = {}
        self.writers: dict = {}
        self.done: dict[Path, set[str]] = {s.path: set() for s in self.saves}
        self.heartbeat: Optional[Heartbeat] = None

    @property
    def owner(self) -> bool:
        """Whether this process stages and commits (rank 0), rather than only writing its share."""
        return self.world.rank == 0

    def open(self, force: bool) -> None:
        """Stage every output (rank 0), resuming an interrupted run's folder where its key matches, and learn
        which tensors are already on disk."""
        shared = None
        if self.owner:
            try:
                shared = self._stage(force)
                self.heartbeat = Heartbeat([out.owner for out in self.staged.values()])
            finally:
                self.world.broadcast(shared)  # None tells the other ranks that rank 0 failed
        else:
            shared = self.world.broadcast(None)
            if shared is None:
                raise RankStopped("stopped: rank 0 could not start the run (its message says why)")
            for s in self.saves:
                out = self.staged[s.path] = StagedOutput(s.path, s.span)
                out.folder = Path(shared["folders"][str(s.path)])
                if s.adapter is None:
                    self.writers[s.path] = out.writer(self.tensors[s.path], s.shard_bytes,
                                                      *self.provenance[s.path].metadata(), mode="attach")
        entries = shared["entries"]
        for s in self.saves:
            key = shared["keys"].get(str(s.path))
            if key is not None:
                try:
                    self.writers[s.path].journal = Journal(self.staged[s.path].folder, key, self.world.rank)
                except OSError as e:
                    raise self.staged[s.path].error(e) from None
        checked = {}
        for path, found in entries.items():  # each rank reads back its part of the journaled tensors
            writer = self.writers[Path(path)]
            folder = self.staged[Path(path)].folder
            checked[path] = [e.tensor for i, e in enumerate(found)
                             if i % self.world.size == self.world.rank and verify(folder, e, writer.slots)]
        for part in self.world.gather(checked):
            for path, names in part.items():
                self.done[Path(path)].update(names)
        if self.owner:
            self._say_resumed(entries)

    def _stage(self, force: bool) -> dict:
        hashes = node_hashes(self.plan.graph, self.order)
        keys, adopt = {}, {}
        for s in self.saves:
            if s.adapter is None:  # an adapter's shapes are known only as it is written: it starts afresh
                every, first = self.provenance[s.path].metadata()
                keys[s.path] = run_key(self.plan, s, self.tensors[s.path], [every, first], self.device_type,
                                       hashes, self.provenance[s.path].version)

        def resume(target: Path, staging: Path) -> bool:
            return target in keys and adoptable(target, keys[target], note)(staging)

        for s in self.saves:
            # first: it may put back an output that an interrupted --force had moved aside
            adopt.update(clean_stale(s.path, resume=resume, spare=[a[0] for a in adopt.values()]))
            check_target(s.path, force, s.span)
        entries = {}
        for s in self.saves:
            out = self.staged[s.path] = StagedOutput(s.path, s.span)
            out.open(adopt.get(s.path))
            prov = self.provenance[s.path]
            if s.adapter is not None:  # extract_lora(): shapes known as they are computed
                self.writers[s.path] = AdapterWriter(out, s, prov)
                continue
            mode = "resume" if out.resumed else "create"
            self.writers[s.path] = out.writer(self.tensors[s.path], s.shard_bytes, *prov.metadata(), mode=mode)
            if out.resumed:
                entries[str(s.path)] = read_entries(out.folder)
        return {"folders": {str(p): str(o.folder) for p, o in self.staged.items()},
                "keys": {str(p): k for p, k in keys.items()}, "entries": entries}

    def _say_resumed(self, entries: dict) -> None:
        for s in self.saves:
            found = entries.get(str(s.path))
            if found is None:
                continue
            done = self.done[s.path]
            sizes = {name: _nbytes(shape, dtype) for name, shape, dtype in self.tensors[s.path]}
            total = sum(sizes.values())
            note(f"resuming '{s.path}': {len(done)} of {len(sizes)} tensors ({format_bytes(sum(sizes[n] for n in done))} "
                 f"of {format_bytes(total)}) already written")
            bad = len(found) - len(done)
            if bad:
                note(f"{bad} tensor{'s' if bad != 1 else ''} of the interrupted run did not match {'their' if bad != 1 else 'its'} "
                     "checksum and will be written again")

    def mine(self) -> set[int]:
        """The save nodes this process computes: those not on disk yet, split among the ranks by bytes (the saves
        of one tensor name together, as they share their inputs; an adapter's all on rank 0)."""
        graph = self.plan.graph
        units: OrderedDict = OrderedDict()
        own = set()
        for n in self.order:
            p = graph.payload(n)
            if not isinstance(p, Save) or p.tensor in self.done[p.output]:
                continue
            if p.output in self._adapters():
                own.add(n)
                continue
            units.setdefault(p.tensor, []).append(n)
        picked = share([(name, sum(graph.payload(n).nbytes for n in nodes)) for name, nodes in units.items()], self.world)
        mine = {n for name in picked for n in units[name]} | (own if self.owner else set())
        for s in self.saves:
            w = self.writers.get(s.path)
            if w is not None and not isinstance(w, AdapterWriter):
                w.pending = {graph.payload(n).tensor for n in mine if graph.payload(n).output == s.path}
        return mine

    def finish(self, stats) -> None:
        """Close every writer; rank 0 writes the rest of each folder; once every rank is done, rank 0 commits."""
        for s in self.saves:
            if s.adapter is not None:
                if self.owner:
                    stats.adapters[s.path] = self.writers.pop(s.path).close()
                continue
            self.writers.pop(s.path).close(index=self.owner)
            if not self.owner:
                continue
            out = self.staged[s.path]
            out.write_config(s.config, s.dtype)
            extra = [s.model.config_source.checkpoint.path / f for f in ("generation_config.json",)]
            out.copy_files([f for f in extra if f.is_file()])
            write_tokenizer(out, s)  # copied; tokens added, a chat template set where the save asks
            out.write_text(CARD_FILE, self.provenance[s.path].card())  # the model card, last: never over a copied file
        self.world.barrier()
        if self.owner:
            for s in self.saves:
                self.staged[s.path].commit()
                del self.staged[s.path]  # after: an interruption in between leaves it to abort(), harmless after commit
            self._stop_heartbeat()

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def abort(self, e: BaseException) -> None:
        """After an error: stop writing. Stopped by a signal (Ctrl-C, SIGTERM, torchrun stopping the ranks) or by
        another rank's failure, an output with tensors journaled is kept for a run started again; otherwise rank 0
        removes what it staged."""
        from .signals import Terminated

        keep = isinstance(e, (Terminated, KeyboardInterrupt, RankStopped))
        self._stop_heartbeat()
        for w in self.writers.values():
            w.abort()  # what the journals hold (fsync'd groups) is what a resumed run finds
        kept = []
        for path, out in reversed(list(self.staged.items())):
            if keep and path not in self._adapters() and read_entries(out.folder):
                kept.append(out.folder)
            elif self.owner:
                out.abort()
        if keep:
            e.kept = kept
        if isinstance(e, RankStopped) and kept:
            e.hint = f"the tensors written so far are kept in '{kept[0]}': run the same command again to resume"

    def _adapters(self) -> set[Path]:
        return {s.path for s in self.saves if s.adapter is not None}
