"""A checkpoint on the hub, `hf://org/name[@revision]`, checked without downloading its weights.

Opening one pins the revision to a commit sha (hub_client.resolve), downloads config.json and the safetensors index
into the hub cache, and reads each shard's header by range (hub_header.py): a few kilobytes per shard, whatever the
model's size. Its tensors are then known as a local checkpoint's are, and lie, once downloaded, in the commit's
folder of the hub cache, which is the checkpoint's path. `mgc run` downloads the shards that hold tensors the plan
loads (`fetch`) before it starts, at the pinned commit, and each is checked against the header that was validated.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, MutableMapping

from mgc.core.checkpoint import (
    INDEX_FILE, TOKENIZER_FILES, Checkpoint, _add_tensor, _check_index, _read_config, _read_index,
)
from mgc.core.errors import CheckpointError
from mgc.core.hub import PREFIX
from mgc.core.hub_client import Revision, download, resolve
from mgc.core.hub_header import relabel, remote_header
from mgc.core.lazy_torch import torch  # for annotations only
from mgc.core.paths import regular_file_size
from mgc.core.safetensors_header import TensorInfo, read_header

EXTRA_FILES = ("generation_config.json",)  # copied beside the config a save keeps
HEADER_THREADS = 8  # shard headers read at once: a model of 30 shards is 60 small requests


class RemoteCheckpoint(Checkpoint):
    """A hub repository at a pinned commit: tensors from remote headers, reads from the downloaded shards."""

    def __init__(self, rev: Revision, label: str, config: dict, tensors: dict[str, TensorInfo],
                 files: list[Path], sizes: dict[str, int]):
        super().__init__(rev.snapshot, config, tensors, files, pickled=False)
        self.revision = rev
        self.label = label  # as the recipe wrote it, for messages
        self.sizes = sizes  # shard file name -> its size on the hub
        self._local: set[str] = set()
        self._lock = threading.Lock()

    @property
    def hub_id(self) -> str:
        return f"{PREFIX}{self.revision.repo_id}@{self.revision.sha}"

    def shards_for(self, names: Iterable[str]) -> list[str]:
        """The shard files that hold these tensors."""
        return sorted({self.tensors[n].file.name for n in names if n in self.tensors})

    def missing(self, shards: Iterable[str]) -> list[str]:
        """Those of `shards` that are not in the hub cache yet."""
        return [s for s in shards if s not in self._local and not (self.path / s).is_file()]

    def fetch(self, names: Iterable[str], progress: bool = False) -> list[str]:
        """Download the shards holding these tensors that are not cached yet; returns those downloaded."""
        todo = self.missing(self.shards_for(names))
        for shard in self.shards_for(names):
            self._ensure(shard, progress)
        return todo

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        self._ensure(self.tensors[name].file.name)
        return super().read_flat(name, start, stop)

    def _ensure(self, shard: str, progress: bool = False) -> None:
        """The shard downloaded at the pinned commit and checked against the header validated at check time."""
        with self._lock:
            if shard in self._local:
                return
            with relabel(self.path, self.label):
                path = download(self.revision, shard, self.label, progress)
                want = {n: i for n, i in self.tensors.items() if i.file.name == shard}
                if path != self.path / shard:
                    raise CheckpointError(f"{path}: the hub cache put '{shard}' outside the commit's folder {self.path}")
                if regular_file_size(path) != self.sizes[shard] or read_header(path) != want:
                    raise CheckpointError(
                        f"{path}: the downloaded file differs from the one checked (its size or its header)",
                        hint=f"remove it from the hub cache ({path.resolve()}) and run again",
                    )
            self._local.add(shard)

    def fetch_extras(self) -> None:
        """The small files a save copies beside the config it keeps (generation_config.json)."""
        for name in EXTRA_FILES:
            if name in self.revision.files:
                download(self.revision, name, self.label)

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files of the pinned commit, downloaded (they are small) when first asked for."""
        return [download(self.revision, n, self.label) for n in TOKENIZER_FILES if n in self.revision.files]

    def __repr__(self) -> str:
        return f"RemoteCheckpoint({self.label!r} at {self.revision.sha[:12]}, {len(self.tensors)} tensors)"


def open_remote(text: str, opened: MutableMapping[Path, object]) -> Checkpoint:
    """The checkpoint `hf://org/name[@revision]` names. One call to the hub pins the revision; a commit already in
    `opened` (checkpoints by path) is not read again."""
    repo_id, _, asked = text[len(PREFIX):].partition("@")
    rev = resolve(repo_id, asked or "main", text)
    known = opened.get(rev.snapshot)
    if known is not None:
        return known
    with relabel(rev.snapshot, text):
        ckpt = _open(rev, text)
    opened[rev.snapshot] = ckpt
    return ckpt


def _open(rev: Revision, label: str) -> RemoteCheckpoint:
    _need(rev, label, ["config.json"], "no config.json in the repository",
          "model() reads a transformers checkpoint: config.json and safetensors weights")
    download(rev, "config.json", label)
    config = _read_config(rev.snapshot, None)
    weight_map = None
    if INDEX_FILE in rev.files:
        download(rev, INDEX_FILE, label)
        weight_map = _read_index(rev.snapshot, None)
        shards = sorted(set(weight_map.values()))
        _need(rev, label, shards, f"{INDEX_FILE} names shard files that are not in the repository: {{missing}}",
              "the repository is incomplete at this commit: name another revision with @")
    else:
        top = [f for f in rev.files if "/" not in f]
        shards = sorted(f for f in top if f.endswith(".safetensors"))
        if not shards:
            pickles = sorted(f for f in top if f.endswith((".bin", ".pt", ".pth")))
            if pickles and not rev.offline:
                raise CheckpointError(
                    f"{label}: holds only pickle files ({', '.join(pickles[:4])}), which mgc does not read from the hub",
                    hint="loading a pickle can run code: use a repository with safetensors weights",
                )
            _need(rev, label, ["model.safetensors"], "no safetensors files in the repository",
                  "model() reads a transformers checkpoint: config.json and safetensors weights")
    with ThreadPoolExecutor(min(HEADER_THREADS, len(shards))) as pool:
        headers = list(pool.map(lambda s: remote_header(rev, s, label), shards))
    tensors: dict[str, TensorInfo] = {}
    for infos, _ in headers:
        for info in infos.values():
            _add_tensor(rev.snapshot, tensors, info)
    if weight_map is not None:
        _check_index(rev.snapshot, tensors, weight_map)
    sizes = {s: size for s, (_, size) in zip(shards, headers)}
    return RemoteCheckpoint(rev, label, config, tensors, [rev.snapshot / s for s in shards], sizes)


def _need(rev: Revision, label: str, names: list[str], message: str, hint: str) -> None:
    """Every one of `names` is a file of the revision (or, offline, of the hub cache); if not, `message`
    ({missing} names those missing) and `hint`."""
    missing = [n for n in names if n not in rev.files]
    if not missing:
        return
    if rev.offline:
        raise CheckpointError(
            f"{label}: {', '.join(missing)} not in the local hub cache, and the hub cannot be asked "
            "(HF_HUB_OFFLINE is set, or the hub is out of reach)",
            hint="unset HF_HUB_OFFLINE: offline, mgc reads only what the hub cache holds, and a checkpoint's shards "
                 "are cached once `mgc run` has downloaded them",
        )
    raise CheckpointError(f"{label}: {message.format(missing=', '.join(missing))}", hint=hint)
