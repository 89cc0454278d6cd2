"""The ServerApp's memory while it prepares and embeds ``valid``/``test``, phase by phase.

    python benchmarks/bench_server_memory.py --dataset /tmp/celeba-scale/rehearsal-0.125 \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth [--keep-glibc-defaults]

Runs, in this fresh process and with a fresh cache dir (so every image is embedded), what the
ServerApp does before round 1: load and check ``valid``/``test`` (data.server_identities,
data.server_part), build the extractor, embed ``valid``, then ``test``. After each phase it
prints the process's resident anonymous memory (RssAnon: what the process allocated) and
file-backed memory (RssFile: mapped files' pages), now and at their peak (sampled every
0.2 s), in MiB.

``--keep-glibc-defaults`` skips extractor.return_freed_memory, i.e. keeps glibc's dynamic mmap
threshold, to show what that fix changes: without it the peak anonymous memory grows with
the number of images embedded (docs/SPEED.md, "CelebA at scale"). Rehearsal datasets:
scripts/make_rehearsal_dataset.py (or bench_scale.py's ``--work`` folder). Run nothing else
meanwhile if the seconds matter; the memory figures do not depend on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_scale import proc_kib_fields  # noqa: E402 - this folder is on sys.path when run as a script


def rss() -> dict[str, int]:
    """{"RssAnon", "RssFile"} of this process in MiB, from /proc/self/status."""
    fields = proc_kib_fields("/proc/self/status")
    return {key: fields.get(key, 0) // 1024 for key in ("RssAnon", "RssFile")}


class Peak(threading.Thread):
    """The peak of each ``rss()`` field, sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}

    def run(self) -> None:
        while True:
            for key, value in rss().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="a dataset folder in the hub's schema")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--keep-glibc-defaults", action="store_true",
                    help="do not fix glibc's mmap/trim thresholds (the behaviour before the fix)")
    args = ap.parse_args()

    import torch

    from celeba_app import extractor
    from celeba_app.config import RunConfig
    from celeba_app.data import server_identities, server_part
    from celeba_app.features import feature_store

    if args.keep_glibc_defaults:
        extractor.return_freed_memory = lambda: False
    peak = Peak()
    peak.start()

    def phase(name: str, t0: float) -> None:
        now = rss()
        print(f"{name:24s} {time.time() - t0:6.1f}s | anon {now['RssAnon']:6,d} (peak {peak.peak['RssAnon']:6,d}) | "
              f"file {now['RssFile']:6,d} (peak {peak.peak['RssFile']:6,d}) MiB", flush=True)

    with tempfile.TemporaryDirectory(prefix="celeba-fl-server-memory-") as cache:
        cfg = RunConfig(dataset=str(Path(args.dataset).resolve()), weights=str(Path(args.weights).resolve()),
                        cache_dir=cache).resolved()
        print(f"# {Path(args.dataset).name}, glibc thresholds "
              f"{'as glibc sets them' if args.keep_glibc_defaults else 'fixed (return_freed_memory)'}", flush=True)
        t0 = time.time()
        server_identities(cfg)
        valid, test = server_part(cfg, "valid"), server_part(cfg, "test")
        phase("load and check", t0)
        store = feature_store(cfg, torch.device("cpu"))
        t0 = time.time()
        store.load_extractor()  # now, as the ServerApp does before round 1
        phase("extractor", t0)
        for name, part in (("valid", valid), ("test", test)):
            t0 = time.time()
            feats = store.for_part(part)
            phase(f"embed {name} ({len(part):,})", t0)
            del feats


if __name__ == "__main__":
    main()
