"""The trained SPP classifier (SPP-net 2.3): conv trunk -> whole-image spatial pyramid ->
small fc head -> one logit per class.

The pyramid makes the head's input length ``C * sum(n * n)`` the same for every input
size, so one set of parameters serves 224 x 224 and 180 x 180 inputs (the paper's
"two fixed-size-input networks that share parameters" are here one module called at two
sizes). To keep CPU training cheap, only the last ``trainable_layers`` children of the
trunk are trained (SqueezeNet: fire9); the rest stays frozen in eval mode and runs without
autograd. The pooled vector is L2-normalised (as the paper's SVM features, 3.2) and
scaled by ``sqrt(D)`` so its entries have unit RMS: the ImageNet trunks' raw activations
(Caffe-scale input, values in the hundreds) otherwise blow up the first SGD steps of a
freshly initialised head. The paper trains everything (70 epochs on ImageNet); this is the same
structure, scaled to a few epochs on VOC image labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spp_detect.classification.features import pool_whole
from spp_detect.spp import PAPER_LEVELS, pyramid_bins

__all__ = ["SPPClassifier"]


class SPPClassifier(nn.Module):
    """``Tensor[B, 3, H, W]`` normalised images of any size -> ``Tensor[B, num_classes]`` logits.

    Args:
        trunk: an ``nn.Sequential`` conv trunk (:func:`spp_detect.backbones.build_trunk`).
        channels: channels of its last map.
        num_classes: outputs (20 for VOC).
        levels: pyramid levels (paper: 1, 2, 3, 6).
        hidden: width of the hidden fc layer.
        trainable_layers: how many of the trunk's last children are trained (0: none).
        dropout: dropout before each fc layer (the paper's fc6/fc7 use 0.5).
    """

    def __init__(
        self,
        trunk: nn.Sequential,
        channels: int,
        num_classes: int,
        levels: Sequence[int] = PAPER_LEVELS,
        hidden: int = 128,
        trainable_layers: int = 1,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        children = list(trunk.children())
        if not 0 <= trainable_layers <= len(children):
            raise ValueError(f"trainable_layers must be in 0..{len(children)}, got {trainable_layers}")
        split = len(children) - trainable_layers
        self.frozen = nn.Sequential(*children[:split])
        self.tuned = nn.Sequential(*children[split:])
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.levels = tuple(int(n) for n in levels)
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(channels * pyramid_bins(self.levels), hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def train(self, mode: bool = True) -> SPPClassifier:
        """Train mode for the tuned layers and the head; the frozen part stays in eval mode."""
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        maps = self.tuned(x)  # [B, C, h, w]
        pooled = pool_whole(maps.float(), self.levels)  # [B, C * bins]
        # Unit-RMS entries: L2-normalised as the paper's SVM features (3.2), times sqrt(D).
        return self.head(F.normalize(pooled, dim=1) * pooled.shape[1] ** 0.5)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters training updates (tuned trunk layers and head)."""
        return [p for p in self.parameters() if p.requires_grad]
