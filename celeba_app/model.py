"""ImageNet MobileNetV2 with a frozen feature extractor and a new binary head.

The backbone is frozen twice over: ``requires_grad=False`` on every parameter AND eval mode
forever (``Backbone.train`` ignores its argument), so batch-norm running statistics never
change while the head trains. Only the head's tensors travel between server and clients.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .mobilenet_layers import CHANNELS, LAST, feature_dim

#: torchvision's ``MobileNet_V2_Weights.IMAGENET1K_V1.url`` (a test checks they agree): the
#: identity of weights='imagenet', known without importing torchvision (seconds per process).
IMAGENET1K_V1_URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"


class AdaptiveAvgPool2d(nn.Module):
    """``torch.nn.functional.adaptive_avg_pool2d(x, pool)``, written as two matrix products.

    Why: ONNX export supports adaptive pooling only to a size that divides the map (14 -> 7,
    not 14 -> 3). PyTorch's bins are rows ``floor(i*H/p) .. ceil((i+1)*H/p) - 1``; ``P_h``
    (p, H) averages each bin, and ``P_h x P_w^T`` is the pooled map, for any H, W and p <= H, W.
    The matrices are built from the input's shape, so an exported graph holds them as
    constants for the image size it was traced at. Computed in float32 whatever autocast says.
    """

    def __init__(self, pool: int) -> None:
        super().__init__()
        self.pool = int(pool)

    @staticmethod
    def bins(size: int, pool: int) -> torch.Tensor:
        """float32 (pool, size): row i averages input positions floor(i*size/pool) .. ceil((i+1)*size/pool)-1."""
        m = torch.zeros(pool, size)
        for i in range(pool):
            start, end = (i * size) // pool, -((-(i + 1) * size) // pool)
            m[i, start:end] = 1.0 / (end - start)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float (N, C, H, W) -> float32 (N, C, pool, pool)."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if (h, w) == (self.pool, self.pool):
            return x.float()
        ph = self.bins(h, self.pool).to(x.device)
        pw = ph if w == h else self.bins(w, self.pool).to(x.device)
        with torch.autocast(x.device.type, enabled=False):
            return torch.matmul(torch.matmul(ph, x.float()), pw.t())


class Backbone(nn.Module):
    """MobileNetV2's ``features[0..layer]``, then its output pooled to ``pool`` x ``pool``:
    image -> ``mobilenet_layers.feature_dim(layer, pool)`` numbers (channel-major).

    ``layer=18, pool=1`` is torchvision's ``MobileNetV2._forward_impl`` up to the classifier
    (the global average of the last layer, 1,280 numbers). Only the blocks up to ``layer``
    are kept: the rest is never run.
    """

    def __init__(self, mobilenet: nn.Module, layer: int = LAST, pool: int = 1) -> None:
        super().__init__()
        if not 0 <= layer <= LAST:
            raise ValueError(f"layer={layer} is not a block of mobilenet_v2().features (0..{LAST})")
        self.layer, self.pool_size = layer, pool
        self.features = mobilenet.features[:layer + 1]
        self.pool = AdaptiveAvgPool2d(pool)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    @property
    def dim(self) -> int:
        """Numbers per image in the output."""
        return feature_dim(self.layer, self.pool_size)

    def train(self, mode: bool = True) -> "Backbone":  # noqa: ARG002 - frozen by design
        """Stay in eval mode whatever the caller asks: BN statistics must never move."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float (N, 3, H, W), ImageNet-normalised -> float32 (N, dim): the block's output, pooled."""
        return torch.flatten(self.pool(self.features(x)), 1)


#: Channels of the ``conv1x1`` head's 1x1 convolution.
CONV_HEAD_CHANNELS = 8


class ConvHead(nn.Module):
    """The ``conv1x1`` head: the (C, p, p) map a setting gives (flattened channel-major, as the
    cache holds it), a 1x1 convolution to ``k`` channels, ReLU, then a linear layer on the
    k x p x p result: (N, C*p*p) -> logits (N, 1). Dropout, if any, acts on the input."""

    def __init__(self, channels: int, pool: int, k: int = CONV_HEAD_CHANNELS, dropout: float = 0.0) -> None:
        super().__init__()
        self.c, self.p = channels, pool
        self.drop = nn.Dropout(dropout)
        self.conv = nn.Conv2d(channels, k, 1)
        self.out = nn.Linear(k * pool * pool, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop.p:
            x = self.drop(x)
        z = torch.relu(self.conv(x.reshape(-1, self.c, self.p, self.p)))
        return self.out(torch.flatten(z, 1))


def make_head(in_features: int, dropout: float = 0.0, seed: int | None = None,
              state: dict[str, torch.Tensor] | None = None, *, kind: str = "linear",
              channels: int | None = None) -> nn.Module:
    """A binary head on ``in_features`` numbers per image (logit output, for
    ``BCEWithLogitsLoss``): freshly initialised (from ``seed`` when given), or holding
    ``state`` (a received or selected head; its shapes must match).

    ``kind``: ``linear`` (Dropout, Linear(in_features, 1): logistic regression, trained in
    closed form by task.train_head) or ``conv1x1`` (``ConvHead``; ``channels`` is the block's,
    and in_features = channels x pool x pool). ``head_for`` builds the run config's."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # a seed leaves the global RNG alone
        if seed is not None:
            torch.manual_seed(seed)
        if kind == "linear":
            head = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, 1))
        elif kind == "conv1x1":
            pool = round((in_features // channels) ** 0.5)
            if channels * pool * pool != in_features:
                raise ValueError(f"in_features={in_features} is not channels={channels} x pool x pool")
            head = ConvHead(channels, pool, dropout=dropout)
        else:
            raise ValueError(f"kind={kind!r} is not known; accepted: linear, conv1x1")
    if state is not None:
        head.load_state_dict(state)
    return head


def head_for(cfg, seed: int | None = None, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The run config's head (``head``, on ``feature-layer`` pooled ``feature-pool``, with
    ``head-dropout``): fresh from ``seed``, or holding ``state``."""
    return make_head(cfg.feature_dim, cfg.head_dropout, seed, state, kind=cfg.head,
                     channels=CHANNELS[cfg.feature_layer])


class BackboneWithHead(nn.Module):
    """Backbone + head, for training through the backbone (the slow, reference path)."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float (N, 3, H, W), normalised -> logits (N,); no gradient reaches the backbone."""
        with torch.no_grad():
            z = self.backbone(x)
        return self.head(z).squeeze(-1)


ACCEPTED_WEIGHTS = ("accepted: 'imagenet' or a torchvision mobilenet_v2 state_dict file (plain, "
                    "'module.'-prefixed, or under 'state_dict'/'model'/'model_state_dict'; any classifier)")
#: Training checkpoints that hold the state_dict under one of these keys (beside epoch, optimizer, ...).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
log = logging.getLogger("flwr")  # Flower's console handler shows it next to the round lines


def _names(keys: list[str], few: int = 3) -> str:
    return ", ".join(keys[:few]) + (", ..." if len(keys) > few else "")


def _load_error(path: Path, exc: Exception) -> str:
    """What torch.load's failure means, in one line (its own messages run to paragraphs)."""
    text = str(exc)
    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if pickled:  # e.g. torch.save(model, path): a whole pickled module
        return (f"holds a pickled {pickled.group(1)}, which torch.load(weights_only=True) does not "
                "run (save model.state_dict() instead)")
    if path.stat().st_size == 0:
        return "is an empty file"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0][:200]
    return f"cannot be read by torch.load ({type(exc).__name__}{': ' + first if first else ''})"


def _is_state_dict(blob: object) -> bool:
    return isinstance(blob, Mapping) and bool(blob) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items())


def read_features_state(weights: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ``features.*`` tensors of a mobilenet_v2 weights file (prefix removed), checked
    against torchvision's architecture, and notes on what was adapted to get them.

    Accepted: a plain state_dict; one saved from DataParallel/DDP (``module.`` on every key);
    a checkpoint dict holding it under 'state_dict', 'model_state_dict' or 'model'; with a
    classifier of any size or none (the app replaces the classifier; only ``features.*`` is
    used, and any key outside it is ignored). Anything else is a ConfigError naming the file
    and the first mismatch: missing keys, unexpected keys, or a shape.
    """
    path = Path(weights).expanduser()
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"weights={weights!r} {_load_error(path, exc)}; {ACCEPTED_WEIGHTS}") from exc
    notes: list[str] = []
    for _ in range(2):  # {'model': {'state_dict': ...}} at most
        if _is_state_dict(blob) or not isinstance(blob, Mapping):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(blob.get(k), Mapping)), None)
        if key is None:
            break
        others = [repr(k) for k in blob if k != key]
        ignored = f" (ignored {_names(others)})" if others else ""
        notes.append(f"took the state_dict under {key!r}{ignored}")
        blob = blob[key]
    if not _is_state_dict(blob):
        if isinstance(blob, Mapping):
            found = f"a dict with keys {_names([repr(k) for k in blob], 5)}" if blob else "an empty dict"
        else:
            found = f"a {type(blob).__name__}"
        raise ConfigError(f"weights={weights!r} is not a state_dict (a dict of tensors): it holds "
                          f"{found}; {ACCEPTED_WEIGHTS}")
    if all(k.startswith("module.") for k in blob):
        blob = {k[len("module."):]: v for k, v in blob.items()}
        notes.append("stripped the 'module.' prefix (a DataParallel/DDP checkpoint)")
    from torchvision.models import mobilenet_v2

    reference = mobilenet_v2().state_dict()
    expected = {k: v.shape for k, v in reference.items() if k.startswith("features.")}
    found = {k: v for k, v in blob.items() if k.startswith("features.")}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatch = None
    if missing and not found:
        mismatch = (f"it has none of mobilenet_v2's {len(expected)} features.* keys "
                    f"({_names(missing)}); its keys are {_names(list(blob))}")
    elif missing:
        mismatch = (f"{len(missing)} of mobilenet_v2's {len(expected)} features.* keys "
                    f"{'is' if len(missing) == 1 else 'are'} missing ({_names(missing)})")
    elif unexpected:
        mismatch = (f"{len(unexpected)} of its features.* keys "
                    f"{'is' if len(unexpected) == 1 else 'are'} not in mobilenet_v2 ({_names(unexpected)})")
    else:
        wrong = next((k for k in expected if found[k].shape != expected[k]), None)
        if wrong:
            mismatch = (f"{wrong} has shape {tuple(found[wrong].shape)}, mobilenet_v2's is "
                        f"{tuple(expected[wrong])}")
    if mismatch:
        raise ConfigError(f"weights={weights!r} is not a mobilenet_v2 state_dict: {mismatch}; "
                          f"{ACCEPTED_WEIGHTS}")
    ignored = [k for k, v in blob.items() if not k.startswith("features.")
               and (k not in reference or v.shape != reference[k].shape)]
    if ignored:  # a stock 1000-class classifier goes unmentioned; it is replaced all the same
        notes.append(f"ignored {len(ignored)} keys outside features.* ({_names(ignored, 2)}); "
                     "the app replaces the classifier")
    return {k[len("features."):]: v for k, v in found.items()}, notes


def load_mobilenet(weights: str) -> nn.Module:
    """torchvision's mobilenet_v2 with ``weights``: 'imagenet' (IMAGENET1K_V1, downloaded by
    torchvision) or the path of a weights file (see ``read_features_state``). Only ``features``
    is loaded from a file; the classifier stays as built (the app never uses it)."""
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2  # seconds to import: only when needed

    if weights == "imagenet":
        try:
            return mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1)
        except Exception as exc:  # URLError, OSError, ... behind torch.hub
            raise ConfigError(
                f"weights='imagenet' could not be downloaded by torchvision ({exc}); accepted: "
                "'imagenet' with a network, or the path of a mobilenet_v2 state_dict file"
            ) from exc
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights={weights!r}: no such file; accepted: 'imagenet' or the path of a "
            "mobilenet_v2 state_dict file"
        )
    state, notes = read_features_state(weights)
    model = mobilenet_v2()
    model.features.load_state_dict(state)  # strict: read_features_state checked keys and shapes
    if notes:
        log.info("celeba-fl: weights=%r: %s", weights, "; ".join(notes))
    return model


def weights_digest(weights: str) -> str:
    """Identity of the weights for the feature cache: the file's sha256, or torchvision's
    weights URL (which carries its own hash) for 'imagenet'."""
    if weights == "imagenet":
        return IMAGENET1K_V1_URL
    h = hashlib.sha256()
    with open(Path(weights).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def head_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """The head's tensors, detached on CPU: exactly what goes into the ArrayRecord."""
    return {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
