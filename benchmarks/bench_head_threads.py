"""Local training of the head when several processes share the cores, by torch thread count.

    python benchmarks/bench_head_threads.py --processes 3

Each of ``--processes`` processes trains a fresh head 4 times (2,400 random 1280-d rows, 5
epochs, batch 32: one client's local training on celeba-10k split 3 ways) at the same time
as the others, first with torch's default thread count (one per core) and then as
``task.train_head`` runs it (one thread, ``task.one_thread``). Prints seconds per training.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch


def _worker(threads: int | None, queue) -> None:
    from celeba_app.model import make_head
    from celeba_app.task import _train_head, train_head

    feats, labels = torch.randn(2400, 1280), torch.randint(0, 2, (2400,)).float()
    times = []
    for r in range(4):
        head = make_head(1280, 0.0, seed=r)
        t0 = time.perf_counter()
        if threads is None:
            train_head(head, feats, labels, epochs=5, lr=1e-3, batch_size=32, seed=r)
        else:
            torch.set_num_threads(threads)
            _train_head(head, feats, labels, epochs=5, lr=1e-3, batch_size=32, seed=r, device="cpu",
                        encoder=None, weight_decay=0.0, proximal_mu=0.0, sample_weight=None)
        times.append(time.perf_counter() - t0)
    queue.put(times)


def run(processes: int, threads: int | None) -> list[float]:
    queue = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_worker, args=(threads, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    out = [t for _ in procs for t in queue.get()]
    for p in procs:
        p.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3)
    args = parser.parse_args()
    default = torch.get_num_threads()
    for label, threads in ((f"{default} threads (torch's default here)", default),
                           ("1 thread (train_head)", None)):
        times = sorted(run(args.processes, threads))
        print(f"{args.processes} processes at once, {label:34s}: median {times[len(times) // 2]:.2f}s, "
              f"max {times[-1]:.2f}s per local training")


if __name__ == "__main__":
    main()
