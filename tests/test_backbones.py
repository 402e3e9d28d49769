"""Backbone registry, geometry (stride/offset) and the real ImageNet weights on disk."""

from __future__ import annotations

import copy

import cv2
import pytest
import torch
from torch import nn

from spp_detect.backbones import (
    BACKBONES,
    NORMALIZATIONS,
    build_model,
    build_trunk,
    get_backbone,
    resolve_normalization,
)
from tests.conftest import MOBILENET_FILE, SQUEEZENET_FILE


def test_unknown_backbone_names_the_choices():
    with pytest.raises(KeyError, match="unknown backbone 'zf6'; choose from"):
        get_backbone("zf6")


def _linearised(trunk: nn.Module) -> nn.Module:
    """Same geometry, but linear with positive weights: max-pool -> avg-pool, no ReLU/LRN,
    so the input gradient of one output cell is non-zero on exactly its receptive field."""
    net = copy.deepcopy(trunk)
    for name, module in list(net.named_modules()):
        if not name:
            continue
        parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.MaxPool2d):
            setattr(parent, leaf, nn.AvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode))
        elif isinstance(module, (nn.ReLU, nn.ReLU6, nn.LocalResponseNorm)):
            setattr(parent, leaf, nn.Identity())
        elif isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            with torch.no_grad():
                module.weight.abs_()
                if module.bias is not None:
                    module.bias.zero_()
    return net.eval()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_declared_stride_offset_and_channels_match_the_network(name):
    spec = BACKBONES[name]
    torch.manual_seed(0)
    trunk = build_trunk(name, "none")
    assert trunk(torch.zeros(1, 3, 64, 64)).shape[1] == spec.channels
    net = _linearised(trunk)
    x = torch.zeros(1, 3, 48, 704, requires_grad=True)  # wide enough for ResNet-50's 400+ px field
    out = net(x)
    centres = []
    for j in (20, 21):  # interior cells, far from the padded borders
        (grad,) = torch.autograd.grad(out[0, :, :, j].sum(), x, retain_graph=True)
        cols = torch.nonzero(grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
        centres.append((cols.min().item() + cols.max().item()) / 2)
    assert centres[1] - centres[0] == spec.stride
    assert centres[0] == spec.offset + 20 * spec.stride


def _dog_crop():
    image = cv2.imread(str(_voc_image("000001")))[:, :, ::-1]  # RGB
    x1, y1, x2, y2 = 47, 239, 195, 371  # the dog, VOC box (48, 240, 195, 371) made 0-based
    crop = cv2.resize(image[y1:y2, x1:x2], (227, 227), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(crop.copy()).permute(2, 0, 1)


def _voc_image(image_id):
    from tests.conftest import VOC_ROOT

    return VOC_ROOT / "VOC2007" / "JPEGImages" / f"{image_id}.jpg"


def test_squeezenet_file_classifies_the_dog_of_000001(weights_dir):
    model = build_model("squeezenet1_0", SQUEEZENET_FILE)
    model.classifier[1].padding = (1, 1)  # as the Caffe prototxt (shared/data/README.md)
    norm = resolve_normalization("squeezenet1_0", SQUEEZENET_FILE)
    assert norm == NORMALIZATIONS["caffe-bgr"]
    with torch.no_grad():
        logits = model(norm(_dog_crop()).unsqueeze(0))[0]
    top5 = logits.topk(5).indices.tolist()
    labels = (weights_dir / "imagenet_labels_1001.txt").read_text().splitlines()[1:]  # line 0: background
    assert any(151 <= k <= 268 for k in top5), [labels[k] for k in top5]  # ImageNet's dog breeds


def test_squeezenet_trunk_uses_the_file_weights():
    trunk = build_trunk("squeezenet1_0", SQUEEZENET_FILE)
    state = torch.load(SQUEEZENET_FILE, weights_only=True)
    assert torch.equal(trunk[0].weight, state["features.0.weight"])


def test_mobilenet_file_loads_strictly_with_1001_classes():
    model = build_model("mobilenet_v2", MOBILENET_FILE)
    assert model.classifier[1].out_features == 1001
    assert resolve_normalization("mobilenet_v2", MOBILENET_FILE) == NORMALIZATIONS["tf-rgb"]
    assert build_trunk("mobilenet_v2", MOBILENET_FILE)(torch.zeros(1, 3, 64, 64)).shape == (1, 96, 4, 4)


def test_wrong_file_for_a_backbone_is_refused():
    with pytest.raises(RuntimeError, match="does not fit backbone 'alexnet'"):
        build_model("alexnet", SQUEEZENET_FILE)
    with pytest.raises(FileNotFoundError):
        build_model("alexnet", "/nonexistent/weights.pth")
    with pytest.raises(ValueError, match="no ImageNet weights for 'zf5'"):
        build_model("zf5", "imagenet")


def test_normalization_orders_channels_and_scales():
    rgb = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)
    assert NORMALIZATIONS["caffe-bgr"](rgb).flatten().tolist() == [30 - 104, 20 - 117, 10 - 123]
    assert NORMALIZATIONS["tf-rgb"](rgb).flatten().tolist() == [(10 - 128) / 128, (20 - 128) / 128, (30 - 128) / 128]


def test_zf5_classifies_any_input_size_through_spp():
    model = build_model("zf5", "none")
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 150, 230)).shape == (2, 1000)
