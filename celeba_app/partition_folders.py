"""``celeba-partition``: one folder per data holder, for a real federation.

On the Deployment Engine each SuperNode should hold only its own images. This command cuts a
dataset the way a simulation would (the same partitioner, ``split``, ``seed``, alpha and
number of partitions, from the run config) and writes::

    OUT/partition_0/ ... partition_<N-1>/   train split of that partition only, rows in the
                                            simulation's order, + partition.json
    OUT/server/                             valid and test: the server's evaluation data

each a dataset in the flwrlabs/celeba schema (parquet and a dataset card), so that
``--node-config "data-path='OUT/partition_0'"`` on a SuperNode and ``dataset='OUT/server'``
in the run config reproduce the simulation's run (the same as flwr-datasets 0.6's
``flwr-datasets create``, which flwr-datasets 0.5 lacks).

Example::

    celeba-partition --run-config "dataset='../shared/data/celeba-10k' split='noniid'" \\
        --num-partitions 3 --out parts/

Refuses, in one line, an ``--out`` folder that exists (nothing is overwritten).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datasets import Dataset

from .config import ConfigError, RunConfig, load_run_config
from .data import (PARTITION_META, check_identity_disjoint, dataset_fingerprint, load_federated,
                   load_server)

PARTITION_KEYS = ("split", "noniid-alpha", "noniid-attributes", "seed")


def write_split_folder(folder: Path, splits: dict[str, Dataset]) -> None:
    """``{split: rows}`` as ``<split>-00000-of-00001.parquet`` files and the card that lets
    ``datasets`` name a split ``valid`` (as the hub's card does)."""
    folder.mkdir(parents=True)
    for name, rows in splits.items():
        rows.to_parquet(str(folder / f"{name}-00000-of-00001.parquet"))
    configs = "".join(f"  - split: {s}\n    path: {s}-*.parquet\n" for s in splits)
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}---\n")


def write_partitions(cfg: RunConfig, num_partitions: int, out: Path) -> list[Path]:
    """Write every partition folder and the server's folder; returns the partition folders."""
    if out.exists():
        raise ConfigError(f"--out={str(out)!r} already exists; accepted: a new folder (nothing is overwritten)")
    fds = load_federated(cfg, num_partitions)
    check_identity_disjoint(cfg, num_partitions)
    source = {"dataset": cfg.dataset, "dataset_fingerprint": dataset_fingerprint(cfg.dataset),
              **{k: cfg.as_dict()[k] for k in PARTITION_KEYS}}
    folders = []
    for pid in range(num_partitions):
        try:
            rows = fds.load_partition(pid, "train")
        except ValueError as exc:  # e.g. more partitions than identities
            raise ConfigError(f"{exc} (--num-partitions={num_partitions})") from exc
        folder = out / f"partition_{pid}"
        write_split_folder(folder, {"train": rows})
        meta = {"partition_id": pid, "num_partitions": num_partitions, "num_rows": len(rows), **source}
        (folder / PARTITION_META).write_text(json.dumps(meta, indent=2) + "\n")
        folders.append(folder)
    server = load_server(cfg)
    write_split_folder(out / "server", {s: server.load_split(s) for s in ("valid", "test")})
    return folders


def main(argv: list[str] | None = None) -> int:
    """The CLI (module docstring): 0 on success, 2 and one line on stderr for a refused input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", action="append", default=[],
                        help='overrides, as for flwr run: "dataset=\'...\' split=\'noniid\'"')
    parser.add_argument("--num-partitions", type=int, required=True, help="number of SuperNodes")
    parser.add_argument("--out", type=Path, required=True, help="a new folder")
    parser.add_argument("--project", type=Path, default=Path("."), help="folder of pyproject.toml")
    args = parser.parse_args(argv)
    try:
        if args.num_partitions < 1:
            raise ConfigError(f"--num-partitions={args.num_partitions} is not valid; accepted: an integer >= 1")
        cfg = RunConfig.from_run_config(load_run_config(args.project, args.run_config))
        folders = write_partitions(cfg, args.num_partitions, args.out)
    except ConfigError as exc:
        print(f"celeba-partition: {exc}", file=sys.stderr)
        return 2
    sizes = ", ".join(str(json.loads((f / PARTITION_META).read_text())["num_rows"]) for f in folders)
    print(f"celeba-partition: wrote {len(folders)} partitions of {cfg.dataset} (split={cfg.split}, "
          f"seed={cfg.seed}; rows {sizes}) and the server's valid/test to {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
