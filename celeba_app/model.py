"""ImageNet MobileNetV2 with a frozen feature extractor and a new binary head.

The backbone is frozen twice over: ``requires_grad=False`` on every parameter AND eval mode
forever (``Backbone.train`` ignores its argument), so batch-norm running statistics never
change while the head trains. Only the head's tensors travel between server and clients.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from .config import ConfigError

FEATURE_DIM = 1280  # MobileNetV2's pooled feature width


class Backbone(nn.Module):
    """MobileNetV2's ``features`` + global average pool: image -> 1280-d embedding.

    Same computation as torchvision's ``MobileNetV2._forward_impl`` up to the classifier.
    """

    def __init__(self, mobilenet: nn.Module) -> None:
        super().__init__()
        self.features = mobilenet.features
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Backbone":  # noqa: ARG002 - frozen by design
        """Stay in eval mode whatever the caller asks: BN statistics must never move."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return torch.flatten(x, 1)


def make_head(dropout: float = 0.0, seed: int | None = None,
              state: dict[str, torch.Tensor] | None = None) -> nn.Sequential:
    """A binary head (logit output, for ``BCEWithLogitsLoss``): freshly initialised (from
    ``seed`` when given), or holding ``state`` (a received or selected head)."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # a seed leaves the global RNG alone
        if seed is not None:
            torch.manual_seed(seed)
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURE_DIM, 1))
    if state is not None:
        head.load_state_dict(state)
    return head


class SmileNet(nn.Module):
    """Backbone + head, for training through the backbone (the slow, reference path)."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.backbone(x)
        return self.head(z).squeeze(-1)


def load_mobilenet(weights: str) -> nn.Module:
    """torchvision's mobilenet_v2 with ``weights``: 'imagenet' (IMAGENET1K_V1, downloaded by
    torchvision) or the path of a state_dict file."""
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
    model = mobilenet_v2()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise ConfigError(
            f"weights={weights!r} is not a mobilenet_v2 state_dict ({type(exc).__name__}); "
            "accepted: 'imagenet' or the path of a mobilenet_v2 state_dict file"
        ) from exc
    return model


def weights_digest(weights: str) -> str:
    """Identity of the weights for the feature cache: the file's sha256, or torchvision's
    weights URL (which carries its own hash) for 'imagenet'."""
    if weights == "imagenet":
        return MobileNet_V2_Weights.IMAGENET1K_V1.url
    h = hashlib.sha256()
    with open(Path(weights).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def head_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """The head's tensors, detached on CPU: exactly what goes into the ArrayRecord."""
    return {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
