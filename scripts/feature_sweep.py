"""Which frozen MobileNetV2 layer the head reads, and how it is pooled: chosen on ``valid``.

    python scripts/feature_sweep.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth [--out outputs/feature-sweep]

For every setting ``feature-layer`` x ``feature-pool`` (``--layers``, default the outputs of
features[6], [10], [13], [16] and the last layer, [18]; ``--pools`` 1, 2, 3, 4, 7 where the
block's map at ``--image-size`` is at least that large), the app's head is trained
centrally on the whole ``train`` split of ``--data``, exactly as ``celeba-centralized`` trains
it (the pyproject defaults: AdamW lr 0.005, batch 32, 10 rounds of 5 epochs), and the round
with the lowest ``valid`` loss is kept (as the app selects). Besides the linear head
(the app's), two small heads trained from scratch read the spatial map (``SMALL_HEADS``) on
the settings of ``--small-head-pools``. Every image is embedded once, by one ONNX Runtime
model that outputs every setting at once (the same modules as the app: model.Backbone's
blocks and model.AdaptiveAvgPool2d).

Writes ``<out>/sweep.json`` and ``<out>/sweep.md`` and prints the table: setting, numbers per
image, the learning rate and round kept, valid accuracy, AUROC, Male equalized-odds difference (with its 95% interval), the
app's embedding throughput for that setting (images/s: decode, resize and the backbone run
only up to the block, ONNX Runtime on this CPU, ``--throughput-images`` real images, median of 3, one
setting at a time), and the cache's bytes per image (float32 values, a checksum and a flag:
row_store.py) with what that is at full CelebA size (202,599 images). ``test`` is read only
for the final table (``--final``: settings named ``L/P``, default the chosen one and the
app's earlier ``18/1``). ``--write-doc`` fills the ``feature-sweep`` block of
docs/RESULTS.md. Last, for the chosen setting, ``flwr run .`` (IID, 50 clients) with each of
``--federated-lrs`` gives the federated head's learning rate, again on ``valid`` alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from celeba_app import mobilenet_layers  # noqa: E402
from celeba_app.config import RunConfig  # noqa: E402
from celeba_app.data import dataset_fingerprint, make_part  # noqa: E402
from celeba_app.extractor import Extractor, ImageNetBackbone, export_onnx, extract  # noqa: E402
from celeba_app.metrics import metrics_report  # noqa: E402
from celeba_app.model import AdaptiveAvgPool2d, Backbone, ConvHead, load_mobilenet, make_head  # noqa: E402
from celeba_app.selection import BestRound  # noqa: E402
from celeba_app.task import evaluate_stats, train_head  # noqa: E402

FULL_CELEBA = 202_599
#: A cache at full CelebA size above this is not practical (the features issue's bound).
PRACTICAL_BYTES = 4e9
#: Bytes per row of a RowStore besides its float32 values: crc32 (4) and the filled flag (1).
ROW_OVERHEAD = 5


class AttentionPoolHead(nn.Module):
    """Attention pooling over the p*p positions (one learned score per position's C-vector,
    softmax), then a linear layer on the pooled C numbers."""

    def __init__(self, channels: int, pool: int) -> None:
        super().__init__()
        self.c, self.p = channels, pool
        self.score = nn.Linear(channels, 1)
        self.out = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.view(-1, self.c, self.p * self.p).transpose(1, 2)  # (N, positions, C)
        a = torch.softmax(self.score(z), dim=1)
        return self.out((a * z).sum(1))


SMALL_HEADS = {"conv1x1-8": ConvHead, "attention-pool": AttentionPoolHead}
SMALL_HEAD_WORDS = ("a 1x1 convolution to 8 channels, ReLU, a linear layer: the app's `head='conv1x1'`; "
                    "attention pooling over the positions, then a linear layer")
#: The sweep's heads that the app has, by its ``head`` values.
APP_HEADS = {"linear": "linear", "conv1x1-8": "conv1x1"}


class AllSettings(nn.Module):
    """uint8 images -> every setting's embedding, concatenated: one pass of the backbone."""

    def __init__(self, backbone: Backbone, settings: list[tuple[int, int]]) -> None:
        super().__init__()
        self.norm = ImageNetBackbone(backbone)
        self.settings = settings
        self.pools = nn.ModuleDict({str(p): AdaptiveAvgPool2d(p) for p in sorted({p for _, p in settings})})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.norm.mean) / self.norm.std
        outs, last = {}, max(layer for layer, _ in self.settings)
        for i, block in enumerate(self.norm.backbone.features[:last + 1]):
            x = block(x)
            for layer, p in self.settings:
                if layer == i:
                    outs[(layer, p)] = torch.flatten(self.pools[str(p)](x), 1)
        return torch.cat([outs[s] for s in self.settings], 1)


class SettingsExtractor:
    """What extractor.extract needs (image_size, decode_device, dim, a call) for AllSettings on ONNX Runtime."""

    def __init__(self, model: AllSettings, image_size: int, path: Path) -> None:
        import onnxruntime as ort

        self.image_size, self.decode_device = image_size, torch.device("cpu")
        self.dim = sum(mobilenet_layers.feature_dim(*s) for s in model.settings)
        export_onnx(model, image_size, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"x": x.contiguous().numpy()})[0])


def load_parts(args) -> dict:
    """train, valid, test of ``--data`` as data.LabeledRows (labels and sensitive attributes)."""
    from datasets import load_dataset

    cfg = RunConfig(dataset=args.data)
    data_id = dataset_fingerprint(args.data)
    ds = load_dataset(args.data)
    return {s: make_part(cfg, s, ds[s], data_id, source=args.data, split=s) for s in ("train", "valid", "test")}


def embed_all(args, parts: dict, settings: list[tuple[int, int]]) -> dict:
    """{split: {setting: float32 (N, dim)}}, cached in ``<out>/embeddings-<split>-<key>.npy``
    (the key: a digest of the data's fingerprint, the weights file, image size and settings)."""
    import hashlib

    key = hashlib.sha256(json.dumps([parts["train"].data_id, str(Path(args.weights).resolve()), args.image_size,
                                     settings]).encode()).hexdigest()[:12]
    mobilenet = load_mobilenet(args.weights)
    model = AllSettings(Backbone(mobilenet), settings).eval()
    dims = [mobilenet_layers.feature_dim(*s) for s in settings]
    ex = None
    out = {}
    for split, part in parts.items():
        path = args.out / f"embeddings-{split}-{key}.npy"
        if path.exists():
            flat = np.load(path, mmap_mode="r")
        else:
            if ex is None:
                ex = SettingsExtractor(model, args.image_size, args.out / "all-settings.onnx")
            t0 = time.time()
            flat = extract(ex, part.encoded_images(args.batch_size)).numpy()
            print(f"  embedded {split}: {len(flat)} images in {time.time() - t0:.0f}s", flush=True)
            np.save(path, flat)
        cuts = np.cumsum([0, *dims])
        out[split] = {s: torch.from_numpy(np.ascontiguousarray(flat[:, a:b])) for s, a, b in zip(settings, cuts, cuts[1:])}
    return out


def new_head(args, layer: int, pool: int, name: str) -> nn.Module:
    """A fresh head named ``name`` (``linear`` or a key of SMALL_HEADS) on a setting, from ``--seed``."""
    dim, c = mobilenet_layers.feature_dim(layer, pool), mobilenet_layers.CHANNELS[layer]
    if name == "linear":
        return make_head(dim, seed=args.seed)
    return seeded(args.seed, SMALL_HEADS[name], c, pool)


def fit_best_lr(args, parts: dict, feats: dict, layer: int, pool: int, name: str, ips: float) -> dict:
    """The row of head ``name`` on a setting: trained at each of ``--lrs``, the lowest valid loss kept."""
    tried = []
    for lr in args.lrs:
        t0 = time.time()
        best, rep = fit(new_head(args, layer, pool, name), {s: feats[s][(layer, pool)] for s in feats}, parts, args, lr)
        tried.append({"key": f"{layer}/{pool}/{name}", "layer": layer, "pool": pool, "head": name, "lr": lr,
                      "dim": mobilenet_layers.feature_dim(layer, pool), "best_round": best.round,
                      "valid_loss": best.value, "valid": summary(rep), "img_per_s": ips,
                      "cache_bytes": cache_bytes(layer, pool)})
        print(f"  {mobilenet_layers.describe(layer, pool)}, {name}, lr {lr}: valid loss {best.value:.4f} acc "
              f"{rep['overall']['accuracy']:.4f} AUROC {rep['overall']['auroc']:.4f} (round {best.round}, "
              f"{time.time() - t0:.0f}s); {ips:.0f} img/s", flush=True)
    return min(tried, key=lambda r: r["valid_loss"])


def seeded(seed: int, cls, *args) -> nn.Module:
    """``cls(*args)`` initialised from ``seed``, leaving the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(*args)


def fit(head: nn.Module, feats: dict, parts: dict, args, lr: float) -> tuple[BestRound, dict]:
    """Train ``head`` as celeba-centralized does; the best round by valid loss and its valid report."""
    train = parts["train"]
    best = BestRound("loss")
    reports = {}
    for rnd in range(1, args.rounds + 1):
        train_head(head, feats["train"], torch.as_tensor(train.labels), epochs=args.local_epochs, lr=lr,
                   batch_size=args.batch, seed=args.seed + rnd)
        rep = report(head, feats["valid"], parts["valid"])
        reports[rnd] = rep
        best.update(rnd, rep, {k: t.clone() for k, t in head.state_dict().items()})
    return best, reports[best.round]


def report(head: nn.Module, feats: torch.Tensor, part) -> dict:
    return metrics_report(evaluate_stats(head, feats, part.labels, part.attributes), part.name)


def summary(rep: dict) -> dict:
    male = rep["gaps"]["Male"]
    return {"accuracy": rep["overall"]["accuracy"], "auroc": rep["overall"]["auroc"],
            "male_eodds": male["equalized_odds_difference"], "male_eodds_ci": male["equalized_odds_difference_ci"],
            "worst_group_accuracy": min(g["worst_group_accuracy"] for g in rep["gaps"].values()
                                        if g["worst_group_accuracy"] is not None)}


def throughput(args, parts: dict, layer: int, pool: int) -> float:
    """The app's embedding images/s for one setting (extractor.extract, ONNX Runtime fp32)."""
    ex = Extractor(Backbone(load_mobilenet(args.weights), layer, pool), "onnx", torch.device("cpu"),
                   args.image_size, onnx_dir=args.out / "onnx", weights_id="sweep")
    rows = np.arange(min(args.throughput_images, len(parts["valid"])))
    extract(ex, parts["valid"].encoded_images(args.batch_size, rows[:args.batch_size]))  # warm-up
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        extract(ex, parts["valid"].encoded_images(args.batch_size, rows))
        rates.append(len(rows) / (time.perf_counter() - t0))
    return float(np.median(rates))


def federated_lrs(args, chosen: dict) -> list[dict]:
    """``flwr run .`` (IID, 50 clients) on the chosen setting for each of ``--federated-lrs``;
    per rate, the valid figures of the round with the lowest valid loss (test is not read)."""
    from experiment_runs import ensure_run

    out, rows = args.out / "federated", []
    for lr in args.federated_lrs:
        run = ensure_run(out / f"lr-{lr}", f"dataset='{args.data}' weights='{args.weights}' results-dir='{out}' "
                         f"split='iid' head='{APP_HEADS[chosen['head']]}' feature-layer={chosen['layer']} feature-pool={chosen['pool']} "
                         f"learning-rate={lr} num-server-rounds={args.rounds} seed={args.seed}")
        history = json.loads((run / "history.json").read_text())
        best = min((h for h in history if h["round"] >= 1), key=lambda h: h["server_valid"]["overall"]["loss"])
        o = best["server_valid"]["overall"]
        rows.append({"lr": lr, "valid_loss": o["loss"], "accuracy": o["accuracy"], "auroc": o["auroc"],
                     "round": best["round"]})
    return rows


def cache_bytes(layer: int, pool: int) -> int:
    return mobilenet_layers.feature_dim(layer, pool) * 4 + ROW_OVERHEAD


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def table(rows: list[dict], chosen: str | None) -> list[str]:
    lines = ["| setting | head | numbers per image | valid acc. | valid AUROC | EOdds diff. Male [95% CI] | "
             "lr, best round | embedding img/s | cache bytes per image | cache at full CelebA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"`feature-layer={r['layer']} feature-pool={r['pool']}`"
        mark = " **(default)**" if r["key"] == chosen else ""
        full = r["cache_bytes"] * FULL_CELEBA / 1e9
        lines.append(f"| {name}{mark} | {r['head']} | {r['dim']:,} | {r['valid']['accuracy']:.4f} | "
                     f"{r['valid']['auroc']:.4f} | {r['valid']['male_eodds']:.3f} {fmt_ci(r['valid']['male_eodds_ci'])} | "
                     f"{r['lr']}, {r['best_round']} | {r['img_per_s']:.0f} | {r['cache_bytes']:,} | {full:.2f} GB |")
    return lines


def final_table(finals: list[dict]) -> list[str]:
    lines = ["| setting | head | numbers per image | test acc. | test AUROC | EOdds diff. Male [95% CI] | "
             "worst-group acc. |", "|---|---|---|---|---|---|---|"]
    for r in finals:
        t = r["test"]
        lines.append(f"| `feature-layer={r['layer']} feature-pool={r['pool']}` | {r['head']} | {r['dim']:,} | "
                     f"{t['accuracy']:.4f} | "
                     f"{t['auroc']:.4f} | {t['male_eodds']:.3f} {fmt_ci(t['male_eodds_ci'])} | "
                     f"{t['worst_group_accuracy']:.4f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "feature-sweep")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 10, 13, 16, 18])
    ap.add_argument("--pools", type=int, nargs="+", default=[1, 2, 3, 4, 7])
    ap.add_argument("--small-head-pools", type=int, nargs="+", default=[7],
                    help="the small heads are trained on every layer at these pools")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=5)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.001, 0.0002],
                    help="learning rates tried for every head; the one with the lowest valid loss is kept")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="embedding batch")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--throughput-images", type=int, default=640)
    ap.add_argument("--final", nargs="*", default=None, help="settings L/P whose test figures are reported")
    ap.add_argument("--federated-lrs", type=float, nargs="*", default=[0.01, 0.005, 0.002, 0.001, 0.0005],
                    help="learning rates of the federated check on the chosen setting (none: skip it)")
    ap.add_argument("--rows-from", type=Path, default=None,
                    help="an earlier sweep.json: reuse its fits and throughput (the final heads are trained again)")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    settings = [(layer, p) for layer in args.layers for p in args.pools
                if p <= mobilenet_layers.map_size(layer, args.image_size)]
    parts = load_parts(args)
    if args.rows_from:  # the fits of an earlier sweep; only the final heads are trained again
        rows = json.loads(args.rows_from.read_text())["rows"]
        settings = sorted({(r["layer"], r["pool"]) for r in rows})
        feats = embed_all(args, parts, settings)
    else:
        speed = {s: throughput(args, parts, *s) for s in settings}  # first, while nothing else runs
        feats = embed_all(args, parts, settings)
        rows = [fit_best_lr(args, parts, feats, layer, p, name, speed[(layer, p)])
                for layer, p in settings for name in ["linear", *(SMALL_HEADS if p in args.small_head_pools else [])]]

    def practical(r: dict) -> bool:
        return r["cache_bytes"] * FULL_CELEBA <= PRACTICAL_BYTES

    linear = max((r for r in rows if r["head"] == "linear" and practical(r)), key=lambda r: r["valid"]["accuracy"])
    small = max((r for r in rows if r["head"] in APP_HEADS and r["head"] != "linear" and practical(r)),
                key=lambda r: r["valid"]["accuracy"], default=None)
    # The default head stays linear unless a small head beats it on valid by at least one point.
    chosen = small if small and small["valid"]["accuracy"] >= linear["valid"]["accuracy"] + 0.01 else linear
    finals = [chosen["key"], linear["key"], "18/1/linear"] if args.final is None else args.final
    final_rows = []
    for key in dict.fromkeys(finals):
        r = next(r for r in rows if r["key"] == key)
        best, _ = fit(new_head(args, r["layer"], r["pool"], r["head"]),
                      {sp: feats[sp][(r["layer"], r["pool"])] for sp in feats}, parts, args, r["lr"])
        head = new_head(args, r["layer"], r["pool"], r["head"])
        head.load_state_dict(best.state)
        final_rows.append({**{k: v for k, v in r.items() if k != "state"},
                           "test": summary(report(head, feats["test"][(r["layer"], r["pool"])], parts["test"]))})
    rows = [{k: v for k, v in r.items() if k != "state"} for r in rows]
    gain = 100 * (small["valid"]["accuracy"] - linear["valid"]["accuracy"]) if small else None
    lines = [f"Data: `{args.data}` (train {len(parts['train']):,} / valid {len(parts['valid']):,} / test "
             f"{len(parts['test']):,}), weights `{args.weights}`, {args.image_size} px; each head trained centrally on "
             f"`train` ({args.rounds} rounds x {args.local_epochs} epochs, AdamW, batch {args.batch}, seed {args.seed}); "
             f"for each head the learning rate of {', '.join(map(str, args.lrs))} and the round with the lowest "
             f"`valid` loss are kept. Small heads: {', '.join(SMALL_HEADS)} ({SMALL_HEAD_WORDS}), on the "
             f"{'/'.join(map(str, args.small_head_pools))}x pools. Embedding img/s: the app's extraction (ONNX Runtime, "
             f"{torch.get_num_threads()} threads) of {args.throughput_images} real images, median of 3, backbone run up "
             f"to the block. Generated on {time.strftime('%Y-%m-%d')} by:",
             "", "```bash", f"python scripts/feature_sweep.py --data {args.data} --weights {args.weights}", "```", "",
             *table(rows, chosen["key"]), "",
             f"Best linear head whose cache at full CelebA size is at most {PRACTICAL_BYTES / 1e9:.0f} GB: "
             f"`feature-layer={linear['layer']} feature-pool={linear['pool']}`, valid accuracy "
             f"{linear['valid']['accuracy']:.4f}."
             + (f" Best small head the app has: {small['head']} on features[{small['layer']}] pooled "
                f"{small['pool']}x{small['pool']}, {small['valid']['accuracy']:.4f} ({gain:+.1f} points)." if small else "")
             + (f" **Default: `head='{APP_HEADS[chosen['head']]}' feature-layer={chosen['layer']} "
                f"feature-pool={chosen['pool']}`**: " + ("a small head at least one point better on `valid`."
                                                        if chosen is small else "the small heads are less than one "
                                                        "point better on `valid`, so the head stays linear.")),
             "", "Test, read once, for the default, the best linear setting and the earlier default "
             "(`feature-layer=18 feature-pool=1`), each head trained again as above:", "",
             *final_table(final_rows)]
    if args.federated_lrs:
        fed = federated_lrs(args, chosen)
        best_lr = min(fed, key=lambda r: r["valid_loss"])
        lines += ["", f"The federated head on the chosen setting (`flwr run .`, IID, 50 clients, {args.rounds} rounds, "
                  "defaults otherwise) for each learning rate; `valid` at the round of lowest `valid` loss (its clients "
                  "take far fewer steps than the central fit, so their best rate differs):", "",
                  "| learning-rate | valid loss | valid acc. | valid AUROC | best round |", "|---|---|---|---|---|"]
        lines += [f"| {r['lr']}{' **(default)**' if r is best_lr else ''} | {r['valid_loss']:.4f} | "
                  f"{r['accuracy']:.4f} | {r['auroc']:.4f} | {r['round']} |" for r in fed]
    text = "\n".join(lines) + "\n"
    (args.out / "sweep.md").write_text(text)
    (args.out / "sweep.json").write_text(json.dumps(
        {"rows": rows, "chosen": chosen["key"], "final": final_rows,
         "federated": fed if args.federated_lrs else None}, indent=1))
    print(text)
    if args.write_doc:
        from make_results import fill_blocks

        doc = ROOT / "docs" / "RESULTS.md"
        doc.write_text(fill_blocks(doc.read_text(), {"feature-sweep": lines}))
        print(f"wrote the feature-sweep block of {doc}")


if __name__ == "__main__":
    main()
