"""One data partition file per client: what ``secfed deploy split`` writes and a SuperNode reads.

:func:`write_partitions` splits the config's data into ``partition-<i>.safetensors`` (with the
config fingerprint and the client id in its metadata); :class:`PartitionTask` is the config's task
holding one client's shard read from its file, so a SuperNode never loads anyone else's data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from secfed.config import ExperimentConfig
from secfed.data import TensorData
from secfed.errors import DataError
from secfed.task import Task, task_class


class PartitionTask(Task):
    """A task that holds one client's shard only, read from a safetensors partition file.

    ``PartitionTask(cfg, path, i)`` is an instance of the config's task class (see
    :func:`secfed.task.task_class`) with this class's ``_load``: the same loss and model
    as on the server, only the data differs.
    """

    _combined: dict[type, type] = {}

    def __new__(cls, cfg: ExperimentConfig, *args: Any, **kwargs: Any) -> "PartitionTask":
        if cls is PartitionTask:
            base = task_class(cfg)
            cls = PartitionTask._combined.setdefault(base, type(f"Partition{base.__name__}", (PartitionTask, base), {}))
        return object.__new__(cls)

    def __init__(self, cfg: ExperimentConfig, path: str | Path, client_id: int) -> None:
        self._path, self._client_id = Path(path), client_id
        super().__init__(cfg)

    def _load(self) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self._path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as e:
            raise DataError(f"node config 'data-file': cannot read {self._path}: {e}") from None
        if meta.get("fingerprint") != self.cfg.fingerprint():
            raise DataError(f"node config 'data-file': {self._path} was split from a different config")
        if meta.get("client_id") != str(self._client_id):
            raise DataError(f"node config 'data-file': {self._path} is partition {meta.get('client_id')}, "
                            f"not partition-id {self._client_id}")
        names = tuple(json.loads(meta.get("label_names", "[]")))
        self.train = TensorData(tensors, int(meta["num_classes"]), names)
        self.test = TensorData({k: v[:0] for k, v in tensors.items()}, self.train.num_classes, names)
        self.root = None
        # the same shape as in-process (a list indexed by client id): this node's shard, nobody else's examples
        self.shards = [np.arange(0) for _ in range(self.cfg.data.num_clients)]
        self.shards[self._client_id] = np.arange(len(self.train))


def write_partitions(cfg: ExperimentConfig, out_dir: str | Path) -> list[Path]:
    """Split the config's data into one safetensors file per client (``partition-<i>.safetensors``)."""
    from safetensors.torch import save_file

    task = Task(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(cfg.data.num_clients):
        shard = task.client_data(i)
        meta = {"client_id": str(i), "num_classes": str(task.num_classes), "fingerprint": cfg.fingerprint(),
                "label_names": json.dumps(list(task.train.label_names))}
        p = out / f"partition-{i}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.tensors.items()}, str(p), metadata=meta)
        paths.append(p)
    return paths
