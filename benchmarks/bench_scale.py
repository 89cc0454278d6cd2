"""Scale benchmark: `flwr run .` on rehearsal CelebA at growing sizes, per phase, memory, disk, bytes.

Run from the project root (figures in docs/SPEED.md, "CelebA at scale"):

    python benchmarks/bench_scale.py --labels ../shared/data/celeba-labels/labels_full_202599.csv.gz \
        --faces ../shared/data/celeba-10k --weights ../shared/weights/mobilenet_v2_imagenet.pth \
        --work /tmp/celeba-scale --fractions 0.125 0.25 0.5 1.0

For each fraction of CelebA's size it builds (once, kept in ``--work``) a rehearsal dataset
(scripts/make_rehearsal_dataset.py: real labels, identities and splits, synthetic pixels, so
costs are real and accuracy is meaningless and not printed), times flwr-datasets'
partitioning of its train split into ``--clients`` partitions in this process, then runs
``flwr run . local-simulation`` with ``--clients`` SuperNodes and ``--rounds`` rounds, IID
first and non-IID second, both with one cache dir per fraction (so the second run embeds
nothing: embeddings are kept per dataset row). While a run goes, every process under
``flwr run`` is sampled from /proc every 0.5 s. Printed per run:

* wall time per phase, from the arrival time of the app's log lines: start-up (launch to the
  ServerApp's first line), describe (SuperNodes load and partition their data and answer the
  query; the server checks), server embed (valid/test, the "before round 1" line), round 1,
  rounds 2..R together, final test, report (to exit);
* peak RSS (VmHWM) of the ServerApp's process and of the largest client actor, and the peak
  of the whole simulation's proportional set size (PSS summed over the process tree, so
  pages shared between processes, e.g. the page cache of the embedding files, count once),
  also split into its anonymous part (memory the processes allocated) and its file-backed
  part (mapped files' pages, which the kernel drops and re-reads under pressure; each
  peak on its own, so the two need not add up to the whole);
* disk used by the cache dir after the run (allocated blocks: the embedding files are sparse);
* mean bytes per message each way (train and evaluate, Flower's protobuf encoding).

Targets (issue #14) at full size on the 2-core machine: whole-simulation memory <= 6 GB,
rounds 2..10 together <= 10% of round 1, non-IID partitioning of 162,770 rows in < 30 s.
Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = [("start-up", "celeba-fl: dataset "), ("describe", "celeba-fl: run folder "),
          ("server embed", "celeba-fl: before round 1"), ("round 1", "celeba-fl: round 1/"),
          ("rounds 2..R", None), ("final test", "celeba-fl: test accuracy")]


def proc_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def proc_kib_fields(path: str) -> dict[str, int]:
    """{field: kB} of a /proc file of "Field:  123 kB" lines (status, smaps_rollup); empty if
    the process is gone."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in lines) if v.strip().endswith("kB")}


class Sampler(threading.Thread):
    """Every 0.5 s: each process's VmHWM (by command line) and the tree's summed PSS, whole
    and split into anonymous (+ shared memory: what the processes allocated) and file-backed
    (pages of files they map, e.g. the Arrow files and the embedding cache: the kernel can
    drop and re-read those under memory pressure)."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.stop = root, threading.Event()
        self.hwm: dict[int, tuple[str, int]] = {}
        self.peak_pss_kib = self.peak_anon_kib = self.peak_file_kib = 0

    def run(self) -> None:
        while not self.stop.is_set():
            total = anon = file = 0
            for pid in proc_tree(self.root):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
                except OSError:
                    continue
                hwm = proc_kib_fields(f"/proc/{pid}/status").get("VmHWM", 0)
                if hwm:
                    self.hwm[pid] = (cmd, max(hwm, self.hwm.get(pid, ("", 0))[1]))
                rollup = proc_kib_fields(f"/proc/{pid}/smaps_rollup")
                total += rollup.get("Pss", 0)
                anon += rollup.get("Pss_Anon", 0) + rollup.get("Pss_Shmem", 0)
                file += rollup.get("Pss_File", 0)
            self.peak_pss_kib = max(self.peak_pss_kib, total)
            self.peak_anon_kib = max(self.peak_anon_kib, anon)
            self.peak_file_kib = max(self.peak_file_kib, file)
            self.stop.wait(0.5)

    def peak(self, pattern: str) -> int:
        return max((kib for cmd, kib in self.hwm.values() if pattern in cmd), default=0)


def quote(v) -> str:
    return f"'{v}'" if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def run_flwr(work: Path, dataset: Path, cache: Path, split: str, args) -> dict:
    name = f"{dataset.name}-{split}"
    config = {"dataset": str(dataset), "weights": args.weights, "split": split,
              "num-server-rounds": args.rounds, "results-dir": str(work / "outputs"), "cache-dir": str(cache),
              "run-name": f"{name}-{int(time.time())}"}
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", ".", "local-simulation", "--federation-config",
           f"options.num-supernodes={args.clients}", "--run-config", " ".join(f"{k}={quote(v)}" for k, v in config.items())]
    t0 = time.time()
    log = open(work / f"{config['run-name']}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    seen: dict[str, float] = {}
    last_round = f"celeba-fl: round {args.rounds}/"
    for line in proc.stdout:
        log.write(line)
        for _, marker in PHASES:
            if marker and marker in line and marker not in seen:
                seen[marker] = time.time() - t0
        if last_round in line and last_round not in seen:
            seen[last_round] = time.time() - t0
    proc.wait()
    end = time.time() - t0
    sampler.stop.set()
    sampler.join()
    log.close()
    marks = [seen.get(m) if m else seen.get(last_round) for _, m in PHASES]
    phases, prev = {}, 0.0
    for (label, _), at in zip(PHASES, marks):
        phases[label] = None if at is None else at - prev
        prev = at if at is not None else prev
    phases["report"] = end - prev
    run_dir = work / "outputs" / config["run-name"]
    from celeba_app.results import read_history

    history = read_history(run_dir) or []  # history.jsonl of a run that was stopped
    sizes = next((h["message_bytes"] for h in history if h.get("message_bytes", {}).get("evaluate")), {})
    status = json.loads((run_dir / "status.json").read_text())["state"] if (run_dir / "status.json").exists() else "-"
    return {"split": split, "rc": proc.returncode, "status": status, "wall": end, "phases": phases,
            "server_rss_mib": sampler.peak("flower-simulation") / 1024,
            "client_rss_mib": sampler.peak("ClientAppActor") / 1024,
            "total_pss_mib": sampler.peak_pss_kib / 1024, "anon_pss_mib": sampler.peak_anon_kib / 1024,
            "file_pss_mib": sampler.peak_file_kib / 1024, "cache_mib": du(cache) / 2**20, "bytes": sizes}


def du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def time_partitioning(dataset: Path, clients: int) -> dict:
    """Seconds for flwr-datasets to assign the train split's rows to ``clients`` partitions,
    IID and non-IID (this project's partitioner), in this process (the dataset already built)."""
    from celeba_app import data
    from celeba_app.config import RunConfig

    out = {}
    for split in ("iid", "noniid"):
        cfg = RunConfig(dataset=str(dataset), split=split)
        data.clear_caches()
        fds = data.load_federated(cfg, clients)
        t0 = time.perf_counter()
        sizes = [len(fds.load_partition(pid, "train")) for pid in range(clients)]
        out[split] = time.perf_counter() - t0
        out[f"{split}_rows"] = sum(sizes)
    return out


def fmt(v, spec=".0f") -> str:
    return "–" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", required=True)
    ap.add_argument("--faces", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
    ap.add_argument("--splits", nargs="+", default=["iid", "noniid"])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    args.weights = str(Path(args.weights).resolve())
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_rehearsal_dataset

    rows = []
    for fraction in args.fractions:
        dataset = args.work / f"rehearsal-{fraction:g}"
        if not (dataset / "README.md").exists():
            make_rehearsal_dataset.main(["--labels", args.labels, "--faces", args.faces, "--out", str(dataset),
                                         "--fraction", str(fraction)])
        parts = time_partitioning(dataset, args.clients)
        print(f"# {dataset.name}: partitioning {parts['iid_rows']} train rows into {args.clients}: "
              f"iid {parts['iid']:.1f}s, noniid {parts['noniid']:.1f}s", flush=True)
        for split in args.splits:
            r = run_flwr(args.work, dataset, args.work / f"cache-{fraction:g}", split, args)
            r.update(fraction=fraction, rows=parts["iid_rows"], partitioning=parts[split])
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n| size | train rows | split | partitioning (s) | start-up | describe | server embed | round 1 | "
          "rounds 2..R | final test | report | status | ServerApp peak RSS (MiB) | largest client actor "
          "peak RSS (MiB) | whole simulation peak PSS (MiB): all / anonymous / file-backed | cache on disk (MiB) | bytes/message train "
          "to client / to server | evaluate to client / to server |")
    print("|" + "---|" * 19)
    for r in rows:
        p, b = r["phases"], r["bytes"]
        t, e = b.get("train", {}), b.get("evaluate", {})
        print(f"| {r['fraction']:.1%} | {r['rows']} | {r['split']} | {r['partitioning']:.1f} | "
              + " | ".join(fmt(p[k]) for k in ("start-up", "describe", "server embed", "round 1", "rounds 2..R",
                                                 "final test", "report"))
              + f" | {r['status']} | {r['server_rss_mib']:.0f} | {r['client_rss_mib']:.0f} | "
              f"{r['total_pss_mib']:.0f} / {r['anon_pss_mib']:.0f} / {r['file_pss_mib']:.0f} | {r['cache_mib']:.0f} | {fmt(t.get('to_client'), 'd')} / "
              f"{fmt(t.get('to_server'), 'd')} | {fmt(e.get('to_client'), 'd')} / {fmt(e.get('to_server'), 'd')} |")


if __name__ == "__main__":
    main()
