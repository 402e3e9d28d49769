"""Conv trunks whose last feature map is pooled by SPP, with the geometry windows need.

``BACKBONES`` is the registry: a plain dict from name to :class:`BackboneSpec`. Each spec
declares

* ``channels``: channels of the pooled map (256 for the paper's ZF-5 conv5);
* ``stride``: the total stride ``S`` (product of all strides before that map);
* ``offset``: the 0-based pixel index, in the resized image, of the receptive-field
  centre of cell 0. For a net whose layers all pad ``floor(k/2)`` (odd kernels) this is
  0, the case the SPP paper's appendix formula is written for; other nets shift it
  (SqueezeNet's unpadded conv1 and pools: 17; AlexNet: 15; VGG16's 2x2 pools: 7.5). Cell
  ``j``'s receptive field is centred at pixel ``offset + S * j``.
* the normalisation that torchvision's ImageNet weights expect.

``tests/test_backbones.py`` checks ``stride`` and ``offset`` against the gradient of each
real trunk, so these numbers cannot drift from the code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "NORMALIZATIONS",
    "KNOWN_WEIGHT_FILES",
    "BackboneSpec",
    "Normalization",
    "ZF5",
    "get_backbone",
    "build_model",
    "build_trunk",
    "resolve_normalization",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Normalization:
    """How a network wants its input: channel order, then ``(x - mean) / std`` per channel,
    with ``x`` in 0..255 and mean/std given in that order's channels."""

    channel_order: str  # "RGB" or "BGR"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images_rgb: Tensor) -> Tensor:
        """Normalise ``Tensor[B, 3, H, W]`` (or ``[3, H, W]``) RGB images in 0..255 (any dtype)
        to float32 network input on the same device."""
        x = images_rgb.to(torch.float32)
        if self.channel_order == "BGR":
            x = x.flip(-3)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return (x - mean) / std


NORMALIZATIONS: dict[str, Normalization] = {
    # torchvision's ImageNet weights: RGB in [0, 1], ImageNet mean/std; written in 0..255.
    "torchvision": Normalization("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    # Caffe models (BVLC/SqueezeNet releases): BGR 0..255 minus the per-channel mean
    # (104, 117, 123) (shared/data/README.md).
    "caffe-bgr": Normalization("BGR", (104.0, 117.0, 123.0), (1.0, 1.0, 1.0)),
    # TF-slim / Coral models: RGB, (x - 128) / 128 (shared/data/README.md).
    "tf-rgb": Normalization("RGB", (128.0, 128.0, 128.0), (128.0, 128.0, 128.0)),
}

#: Input conventions of the weight files this project knows by file name
#: (shared/data/weights/README, see shared/data/README.md).
KNOWN_WEIGHT_FILES: dict[str, str] = {
    "squeezenet1_0-imagenet-deepcompression.pth": "caffe-bgr",
    "mobilenet_v2-imagenet1001-coral.pth": "tf-rgb",
}


class ZF5(nn.Module):
    """The paper's ZF-5 (SPP-net, TPAMI Table 1; Zeiler & Fergus 2014, "fast" model).

    conv1 96 7x7/2 -> ReLU -> LRN -> max 3x3/2 -> conv2 256 5x5/2 -> ReLU -> LRN ->
    max 3x3/2 -> conv3 384 3x3 -> conv4 384 3x3 -> conv5 256 3x3 (ReLU after each).

    Every layer pads ``floor(k/2)``, the padding the paper's window-mapping appendix
    assumes, so cell ``j`` of conv5 is centred at pixel ``16 j`` (offset 0). The released
    Caffe model padded conv1 by 1 and conv2 by 0 instead, which is why its code carries the
    offsets 21 / 6.5 (docs/sources.md 1.4). LRN uses Caffe's AlexNet defaults
    (local_size 5, alpha 1e-4, beta 0.75). Random init unless a state_dict is loaded;
    torchvision publishes no ZF-5 weights.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 7, stride=2, padding=3), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(96, 256, 5, stride=2, padding=2), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        )
        # The SPP-net classifier on conv5: 4-level pyramid {1,2,3,6} (50 bins) -> fc6 -> fc7 -> fc8.
        self.classifier = nn.Sequential(
            nn.Linear(256 * 50, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits ``Tensor[B, num_classes]`` of images ``Tensor[B, 3, H, W]`` of any size."""
        from spp_detect.spp import spatial_pyramid_pool

        maps = self.features(x)  # [B, 256, h, w]
        h, w = maps.shape[-2:]
        whole = torch.tensor([[0, 0, w - 1, h - 1]], device=x.device)
        pooled = torch.cat([spatial_pyramid_pool(m, whole) for m in maps])  # [B, 12800]
        return self.classifier(pooled)


def _resnet_trunk(model: nn.Module) -> nn.Module:
    return nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3
    )


@dataclass(frozen=True)
class BackboneSpec:
    """A conv trunk and its geometry. See the module docstring for ``stride``/``offset``."""

    name: str
    channels: int
    stride: int
    offset: float
    norm: str  # key of NORMALIZATIONS that torchvision's ImageNet weights expect
    make_model: Callable[[int], nn.Module]  # num_classes -> full (classifier) model
    trunk_of: Callable[[nn.Module], nn.Module]  # full model -> conv trunk
    torchvision_weights: str | None  # e.g. "SqueezeNet1_0_Weights.IMAGENET1K_V1"
    num_classes: int = 1000


BACKBONES: dict[str, BackboneSpec] = {
    "zf5": BackboneSpec(
        "zf5", 256, 16, 0.0, "torchvision", lambda n: ZF5(n), lambda m: m.features, None
    ),
    "squeezenet1_0": BackboneSpec(
        "squeezenet1_0", 512, 16, 17.0, "torchvision",
        lambda n: torchvision.models.squeezenet1_0(weights=None, num_classes=n),
        lambda m: m.features, "SqueezeNet1_0_Weights.IMAGENET1K_V1",
    ),
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2", 96, 16, 0.0, "torchvision",
        lambda n: torchvision.models.mobilenet_v2(weights=None, num_classes=n),
        lambda m: m.features[:14], "MobileNet_V2_Weights.IMAGENET1K_V1",
    ),
    "alexnet": BackboneSpec(
        "alexnet", 256, 16, 15.0, "torchvision",
        lambda n: torchvision.models.alexnet(weights=None, num_classes=n),
        lambda m: m.features[:12], "AlexNet_Weights.IMAGENET1K_V1",  # through relu5, no pool5
    ),
    "vgg16": BackboneSpec(
        "vgg16", 512, 16, 7.5, "torchvision",
        lambda n: torchvision.models.vgg16(weights=None, num_classes=n),
        lambda m: m.features[:30], "VGG16_Weights.IMAGENET1K_V1",  # through relu5_3
    ),
    "resnet50": BackboneSpec(
        "resnet50", 1024, 16, 0.0, "torchvision",
        lambda n: torchvision.models.resnet50(weights=None, num_classes=n),
        _resnet_trunk, "ResNet50_Weights.IMAGENET1K_V2",  # through layer3 (conv4_x)
    ),
}


def get_backbone(name: str) -> BackboneSpec:
    """The registered spec called ``name``.

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None


def build_model(name: str, weights: str | Path | None) -> nn.Module:
    """The full classification model of backbone ``name`` with ``weights`` loaded, in eval mode.

    Args:
        name: a key of :data:`BACKBONES`.
        weights: ``"imagenet"`` (torchvision's weight enum; downloads on first use),
            ``"none"``/``None`` (random init), or a path to a ``state_dict`` of the full
            torchvision model, loaded strictly. The classifier width is taken from the
            file (the MobileNetV2 file in shared/data has 1001 outputs).

    Raises:
        KeyError: unknown backbone. ValueError: ``imagenet`` for ``zf5``. FileNotFoundError:
        missing file. RuntimeError: the state_dict does not fit the architecture.
    """
    spec = get_backbone(name)
    if weights is None or str(weights) == "none":
        return spec.make_model(spec.num_classes).eval()
    if str(weights) == "imagenet":
        if spec.torchvision_weights is None:
            raise ValueError(f"torchvision has no ImageNet weights for {name!r}; pass a state_dict file or 'none'")
        enum_name, member = spec.torchvision_weights.split(".")
        weight_enum = getattr(getattr(torchvision.models, enum_name), member)
        model = spec.make_model(spec.num_classes)
        model.load_state_dict(weight_enum.get_state_dict(progress=True))
        return model.eval()
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: expected a state_dict, got {type(state).__name__}")
    model = spec.make_model(_num_classes_in(state, spec.num_classes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{path} does not fit backbone {name!r}: {exc}") from exc
    return model.eval()


def build_trunk(name: str, weights: str | Path | None) -> nn.Module:
    """The conv trunk (up to the pooled map) of :func:`build_model`, in eval mode."""
    spec = get_backbone(name)
    return spec.trunk_of(build_model(name, weights)).eval()


def resolve_normalization(name: str, weights: str | Path | None, input_norm: str = "auto") -> Normalization:
    """The input normalisation to use with these weights.

    ``input_norm="auto"`` picks the convention of a known weight file
    (:data:`KNOWN_WEIGHT_FILES`, by file name), else torchvision's, which is also what
    ``imagenet`` and random weights use. Any other value is a key of :data:`NORMALIZATIONS`.
    """
    get_backbone(name)
    if input_norm != "auto":
        if input_norm not in NORMALIZATIONS:
            raise KeyError(f"unknown input normalisation {input_norm!r}; choose from {sorted(NORMALIZATIONS)}")
        return NORMALIZATIONS[input_norm]
    if weights is not None and str(weights) not in ("imagenet", "none"):
        known = KNOWN_WEIGHT_FILES.get(Path(weights).name)
        if known is not None:
            return NORMALIZATIONS[known]
        log.warning("unknown weights file %s: assuming torchvision's input normalisation", weights)
    return NORMALIZATIONS[get_backbone(name).norm]


def normalization_name(name: str, weights: str | Path | None, input_norm: str = "auto") -> str:
    """The key in :data:`NORMALIZATIONS` that :func:`resolve_normalization` picks: what a
    stage's settings record, so that ``auto`` keys a folder by the convention it resolved to."""
    norm = resolve_normalization(name, weights, input_norm)
    return next(k for k, v in NORMALIZATIONS.items() if v == norm)


def _num_classes_in(state: dict[str, Tensor], default: int) -> int:
    """Output width of the last classifier layer in a state_dict (its last 'weight')."""
    weight_keys = [k for k in state if k.endswith("weight") and state[k].ndim in (2, 4)]
    if not weight_keys:
        return default
    return int(state[weight_keys[-1]].shape[0])
