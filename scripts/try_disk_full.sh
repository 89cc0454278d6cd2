#!/usr/bin/env bash
# A run whose results disk fills up after round 1, then its resume once space is freed.
#
#   sudo bash scripts/try_disk_full.sh DATA WEIGHTS     (root: it mounts a 3 MB tmpfs)
#
# DATA, WEIGHTS: e.g. ../shared/data/celeba-10k ../shared/weights/mobilenet_v2_imagenet.pth.
# Prints the failed run's last line and status.json, then the resumed run's status.json.
set -euo pipefail
data=$(realpath "$1"); weights=$(realpath "$2")
mnt=$(mktemp -d)
mount -t tmpfs -o size=3M tmpfs "$mnt"
trap 'kill $filler 2>/dev/null || true; umount "$mnt"; rmdir "$mnt"' EXIT
rc="num-server-rounds=4 dataset='$data' weights='$weights' results-dir='$mnt' run-name='disk-full'"
( while ! grep -qs '"round": 1' "$mnt/disk-full/history.jsonl"; do sleep 0.2; done
  dd if=/dev/zero of="$mnt/filler" bs=64k 2>/dev/null || true ) & filler=$!
flwr run . local-simulation --federation-config "options.num-supernodes=3" --run-config "$rc" 2>&1 | tail -1
echo "--- status.json after the disk filled:"; cat "$mnt/disk-full/status.json"; echo
echo "--- left in the run folder:"; ls "$mnt/disk-full"
rm -f "$mnt/filler"
flwr run . local-simulation --federation-config "options.num-supernodes=3" \
    --run-config "$rc resume='disk-full'" 2>&1 | grep -a "celeba-fl: test accuracy" || true
echo "--- status.json after the resume:"; cat "$mnt/disk-full/status.json"; echo
