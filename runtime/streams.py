"""Overlapping I/O with compute: a reader thread that prefetches input tensors in schedule
order under a byte budget, and a writer thread that streams finished tensors to their shards.

torch and safetensors release the GIL while they copy and compute, so the three overlap.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

import torch


class Prefetcher:
    """Reads tensors ahead of use, in the given order, holding at most `budget` bytes not yet taken."""

    def __init__(self, items: list[tuple[int, int, Callable[[], torch.Tensor]]], budget: int, pin: bool = False):
        self.items = items  # (node, nbytes, read)
        self.budget = budget
        self.pin = pin
        self.ready: dict[int, torch.Tensor] = {}
        self.held = 0
        self.error: Optional[BaseException] = None
        self.stopped = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="mgc-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for node, nbytes, read in self.items:
                with self.cond:
                    while not self.stopped and self.held > 0 and self.held + nbytes > self.budget:
                        self.cond.wait()
                    if self.stopped:
                        return
                t = read()
                if self.pin:
                    t = t.pin_memory()
                with self.cond:
                    self.ready[node] = t
                    self.held += nbytes
                    self.cond.notify_all()
        except BaseException as e:  # handed to the consumer, which raises it
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def take(self, node: int, nbytes: int) -> torch.Tensor:
        with self.cond:
            while node not in self.ready:
                if self.error is not None:
                    raise self.error
                self.cond.wait()
            self.held -= nbytes
            self.cond.notify_all()
            return self.ready.pop(node)

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.ready.clear()
            self.cond.notify_all()
        self.thread.join()


class WriterThread:
    """Runs write jobs in order on a background thread; the jobs waiting hold at most `max_bytes`
    (one job at least, whatever its size)."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.jobs: queue.Queue = queue.Queue()
        self.max_bytes = max_bytes
        self.pending = 0
        self.cond = threading.Condition()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="mgc-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            job, nbytes = item
            if self.error is None:
                try:
                    job()
                except BaseException as e:
                    self.error = e
            with self.cond:
                self.pending -= nbytes
                self.cond.notify_all()

    def submit(self, job: Callable[[], None], nbytes: int = 0) -> None:
        with self.cond:
            while self.pending > 0 and self.pending + nbytes > self.max_bytes and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error
            self.pending += nbytes
        self.jobs.put((job, nbytes))

    def finish(self) -> None:
        """Wait for every job; raise the first error one of them raised."""
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
