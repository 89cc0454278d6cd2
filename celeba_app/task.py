"""Training and evaluating the head, on cached embeddings (or through the backbone).

Training on embeddings is exact, not an approximation: the backbone is frozen and in eval
mode, so ``head(backbone(x))`` trains the same head whether ``backbone(x)`` is computed now or
was cached. ``train_head`` accepts an ``encoder`` to run the backbone per batch, which is how
the tests prove it (same seed, same batch order, same head).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .config import RunConfig
from .metrics import Stats, metrics_report, slice_stats


def pick_device(cfg: RunConfig) -> torch.device:
    """The device of ``cfg.device``: ``cuda`` or ``cpu`` as given, ``auto`` = CUDA when torch
    sees a GPU, else the CPU. (A config asking for ``cuda`` without one fails later, in torch.)"""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the head's own computations (training, prediction) on one torch thread.

    Why: the head is a few thousand numbers; more threads do not make its small matmuls faster,
    but where several processes share the cores (SuperNodes or simulation actors on one
    host, each with torch's default of one thread per core), OpenMP threads that spin while
    waiting for each other make a local training many times slower
    (benchmarks/bench_head_threads.py). The previous thread count comes back afterwards,
    for the backbone and ONNX Runtime, which do use every thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class AdamW:
    """``torch.optim.AdamW``'s update (default betas and eps; no amsgrad), written out for
    the head's two tensors.

    Why not torch.optim: constructing any torch optimizer imports ``torch._dynamo`` (seconds),
    and the Deployment Engine starts a new ClientApp process for every message, so every
    round paid it again (docs/SPEED.md, "The Deployment Engine"). tests/test_task.py checks this class against
    torch.optim.AdamW step by step.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.weight_decay, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0

    def zero_grad(self) -> None:
        """Drop the gradients (as torch's ``set_to_none=True``)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW update of every parameter that has a gradient, in place."""
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1 ** self.steps)
        bias_correction2_sqrt = (1 - beta2 ** self.steps) ** 0.5
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            p.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(self.eps), value=-step_size)


def train_head(
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    sample_weight: torch.Tensor | None = None,
) -> dict[str, float]:
    """Local training with AdamW and BCEWithLogitsLoss; returns mean loss and step count.

    ``weight_decay`` is AdamW's decoupled decay (0 = plain Adam). ``proximal_mu`` adds
    FedProx's (mu/2)||w - w_received||^2. ``sample_weight`` weights each row's loss (e.g.
    equal total weight per demographic group); the reported loss is the unweighted BCE.

    ``x``: embeddings (N, D), or (V, N, D) for V cached views (a random view per row and
    step, e.g. original / horizontally flipped), or raw inputs when ``encoder`` is given.
    Batches come from a generator seeded with ``seed``, so the order is reproducible.
    On embeddings it runs on one torch thread (``one_thread``), and make_head's head takes
    its steps in closed form (``_logistic_step``); any other head, or raw inputs through
    ``encoder``, train by autograd. Returns {"loss": mean BCE per row and epoch, "steps"}.
    """
    # through the backbone (``encoder``), torch keeps every thread: the backbone uses them
    threads = one_thread() if encoder is None and torch.device(device).type == "cpu" else contextlib.nullcontext()
    with threads:
        return _train_head(head, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                           encoder=encoder, weight_decay=weight_decay, proximal_mu=proximal_mu,
                           sample_weight=sample_weight)


def _train_head(head, x, y, *, epochs, lr, batch_size, seed, device, encoder, weight_decay, proximal_mu,
                sample_weight) -> dict[str, float]:
    device = torch.device(device)
    head.to(device).train()
    views = None if encoder is not None else (x if x.dim() == 3 else x.unsqueeze(0))
    n = len(y)
    gen = torch.Generator().manual_seed(seed)
    opt = AdamW(list(head.parameters()), lr=lr, weight_decay=weight_decay)
    anchor = [p.detach().clone() for p in head.parameters()] if proximal_mu else None
    logistic = encoder is None and _is_logistic_head(head)
    y = y.float()
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if encoder is not None:
                with torch.no_grad():
                    feats = encoder(x[idx])
            else:
                v = torch.randint(len(views), (len(idx),), generator=gen) if len(views) > 1 else None
                feats = views[0, idx] if v is None else views[v, idx]
            weight = None if sample_weight is None else sample_weight[idx].to(device)
            if logistic:
                rows = _logistic_step(head, feats.to(device), y[idx].to(device), weight, proximal_mu, anchor)
            else:
                opt.zero_grad()
                rows = nn.functional.binary_cross_entropy_with_logits(
                    head(feats.to(device)).squeeze(-1), y[idx].to(device), reduction="none")
                loss = rows.mean() if weight is None else (rows * weight).mean()
                if anchor is not None:
                    loss = loss + proximal_mu / 2 * sum(
                        (p - a).pow(2).sum() for p, a in zip(head.parameters(), anchor))
                loss.backward()
            opt.step()
            total += float(rows.detach().sum())
            steps += 1
    head.eval()
    return {"loss": total / max(1, n * epochs), "steps": steps}


def _is_logistic_head(head: nn.Module) -> bool:
    """Whether ``head`` is model.make_head's (Dropout, Linear(D, 1)): logistic regression."""
    return (isinstance(head, nn.Sequential) and len(head) == 2 and type(head[0]) is nn.Dropout
            and type(head[1]) is nn.Linear and head[1].out_features == 1)


@torch.no_grad()
def _logistic_step(head: nn.Sequential, feats: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                   proximal_mu: float, anchor: list[torch.Tensor] | None) -> torch.Tensor:
    """Set the gradients of one batch's loss on ``head`` (make_head's Dropout + Linear) without
    autograd; returns the per-row BCE (B,).

    Why: the head is a few thousand numbers, so a step's cost is Python and autograd bookkeeping, not
    arithmetic, and at full size a round is tens of thousands of steps; the closed form below
    skips building and walking an autograd graph (docs/SPEED.md, "CelebA at scale").

    The loss is the autograd path's exactly: the batch mean of BCE(z, y) (times ``weight`` per
    row), z = drop(x) w^T + b, plus (mu/2)||theta - theta_received||^2; its gradient is
    dz = (sigmoid(z) - y) * weight / B, dw = dz^T drop(x), db = sum(dz), plus
    mu (theta - theta_received). Dropout draws its mask from the same generator as nn.Dropout,
    so both paths give the same head (tests/test_task.py checks them against each other).
    """
    dropout, linear = head[0], head[1]
    feats = nn.functional.dropout(feats, dropout.p, training=True) if dropout.p else feats
    z = torch.addmm(linear.bias, feats, linear.weight.t()).squeeze(-1)
    rows = nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    dz = torch.sigmoid(z) - y
    if weight is not None:
        dz = dz * weight
    dz = dz / len(y)
    grads = [(dz @ feats).unsqueeze(0), dz.sum().reshape(1)]
    if anchor is not None:
        grads = [g + proximal_mu * (p - a) for g, p, a in zip(grads, (linear.weight, linear.bias), anchor)]
    linear.weight.grad, linear.bias.grad = grads
    return rows


@torch.inference_mode()
def predict(head: nn.Module, feats: torch.Tensor, device: torch.device | str = "cpu",
            batch_size: int = 8192) -> np.ndarray:
    """Probabilities of the positive class for every row of ``feats`` (N, D): an (N,) float32
    array. On one torch thread on CPU (``one_thread``)."""
    head.to(device).eval()
    with one_thread() if torch.device(device).type == "cpu" else contextlib.nullcontext():
        out = [torch.sigmoid(head(feats[i:i + batch_size].to(device)).squeeze(-1)).float().cpu()
               for i in range(0, len(feats), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def group_balance_weights(attributes: dict[str, np.ndarray], names: tuple[str, ...]) -> torch.Tensor:
    """Per-row weights giving every group (cell of ``names``) present the same total weight,
    normalised to mean 1; all ones when ``names`` is empty."""
    n = len(next(iter(attributes.values()))) if attributes else 0
    if not names or n == 0:
        return torch.ones(n)
    codes = np.zeros(n, dtype=np.int64)
    for a in names:
        codes = codes * 2 + np.asarray(attributes[a], dtype=np.int64)
    _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    w = n / (len(counts) * counts[inverse])
    return torch.as_tensor(w, dtype=torch.float32)


def bce_per_row(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of each row (clipped like torch's BCELoss, at log >= -100)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    log_p = np.maximum(np.log(np.clip(p, 1e-300, 1)), -100)
    log_q = np.maximum(np.log(np.clip(1 - p, 1e-300, 1)), -100)
    return -(y * log_p + (1 - y) * log_q)


def evaluate_stats(head: nn.Module, feats: torch.Tensor, labels: np.ndarray,
                   attributes: dict[str, np.ndarray], device: torch.device | str = "cpu",
                   threshold: float = 0.5) -> dict[str, Stats]:
    """Slice statistics (overall, groups, intersections) of ``head`` on these embeddings."""
    probs = predict(head, feats, device)
    return slice_stats(probs, labels, bce_per_row(probs, labels), attributes, threshold)


def evaluate_report(head: nn.Module, feats: torch.Tensor, labels: np.ndarray, attributes: dict[str, np.ndarray],
                    where: str, min_group_size: int, device: torch.device | str = "cpu") -> dict:
    """The metrics report (metrics.metrics_report: overall, per group, gaps) of ``head`` on
    these embeddings; ``where`` names the data in warnings (e.g. "valid")."""
    return metrics_report(evaluate_stats(head, feats, labels, attributes, device), where, min_group_size)
