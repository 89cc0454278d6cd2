"""Where one node's training data is: its node config, resolved on the node (``NodeData``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..config import ConfigError, RunConfig, is_local_path


#: The file celeba-partition writes into each partition folder (partition id, partitioning).
PARTITION_META = "partition.json"

@dataclass(frozen=True)
class NodeData:
    """Where one node's training data comes from: its node config, resolved on the node.

    * partition ``partition_id`` of ``num_partitions`` of the run config's ``dataset`` (what
      the Simulation Engine gives every node, and ``--node-config "partition-id=0
      num-partitions=3"`` on the Deployment Engine);
    * ``data_path``: a folder whose ``train`` split is this node's whole local data (written
      by ``celeba-partition``, whose ``partition.json`` gives the partition id; a node config
      ``partition-id`` overrides it). No other holder's rows are on such a node.

    ``cache_dir`` (node config ``cache-dir``, else the run config's) is resolved on the node;
    ``None`` when ``feature-cache=false``.
    """

    partition_id: int
    num_partitions: int | None = None
    data_path: str | None = None
    cache_dir: str | None = None
    holdout_by_identity: bool = False

    @classmethod
    def partition(cls, cfg: RunConfig, partition_id: int, num_partitions: int,
                  cache_dir: str | None = None) -> "NodeData":
        """Partition ``partition_id`` of ``num_partitions`` of the run config's dataset;
        ConfigError unless 0 <= partition_id < num_partitions."""
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(f"partition-id={partition_id} is out of range; accepted: 0..{num_partitions - 1} "
                              f"(num-partitions={num_partitions})")
        return cls(partition_id, num_partitions, None, cache_dir_for(cfg, cache_dir), cfg.split == "noniid")

    @classmethod
    def from_node_config(cls, node_config: Mapping, cfg: RunConfig) -> "NodeData":
        """Raises ConfigError naming the missing or bad node-config key."""
        cache_dir = node_config.get("cache-dir")
        if "data-path" in node_config:
            path = Path(str(node_config["data-path"])).expanduser().resolve()
            if not path.is_dir():
                raise ConfigError(f"data-path={str(node_config['data-path'])!r} (resolved on this node to "
                                  f"{str(path)!r}): no such folder; accepted: a folder with a train "
                                  "split in the flwrlabs/celeba schema, e.g. one written by celeba-partition")
            meta = _partition_meta(path)
            pid = node_config.get("partition-id", meta.get("partition_id"))
            if pid is None:
                raise ConfigError(f"data-path={str(path)!r} has no partition.json and the node config no "
                                  "partition-id; accepted: a folder written by celeba-partition, or "
                                  "--node-config \"data-path='...' partition-id=<unique integer>\"")
            return cls(int(pid), meta.get("num_partitions"), str(path), cache_dir_for(cfg, cache_dir),
                       meta.get("split", cfg.split) == "noniid")
        missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
        if missing:
            raise ConfigError(f"node config lacks {', '.join(missing)} (has: {dict(node_config) or 'nothing'}); "
                              "accepted: --node-config \"partition-id=<i> num-partitions=<n>\" or "
                              "\"data-path='<folder>'\"")
        try:
            pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"node config partition-id/num-partitions must be integers ({exc})") from exc
        if num < 1:
            raise ConfigError(f"num-partitions={num} is not valid; accepted: an integer >= 1")
        if is_local_path(cfg.dataset) and not Path(cfg.dataset).expanduser().is_dir():
            raise ConfigError(f"dataset={cfg.dataset!r} (resolved on this node to "
                              f"{str(Path(cfg.dataset).expanduser().resolve())!r}): no such folder; accepted: "
                              "an absolute path, a path from the SuperNode's working directory, or "
                              "--node-config \"data-path='<folder>'\"")
        return cls.partition(cfg, pid, num, cache_dir)

    def describe(self, cfg: RunConfig) -> str:
        """Where the data is, in words, for logs and partitions.json."""
        if self.data_path:
            return f"data-path {self.data_path}"
        return f"partition {self.partition_id} of {self.num_partitions} of {cfg.dataset}"

def cache_dir_for(cfg: RunConfig, node_cache_dir: str | None) -> str | None:
    if not cfg.feature_cache:
        return None
    return str(Path(str(node_cache_dir or cfg.cache_dir)).expanduser().resolve())

def _partition_meta(path: Path) -> dict:
    meta = path / PARTITION_META
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except ValueError as exc:
        raise ConfigError(f"{meta} is not valid JSON ({exc}); accepted: the file celeba-partition wrote") from exc
