"""The fully connected head on top of pooled SPP features: fc6 -> fc7 -> fc8.

SPP-net detection fine-tunes only the fc layers, on pooled conv5 features (paper 4.1,
docs/sources.md 1.6): ``fc6 -> ReLU -> dropout 0.5 -> fc7 -> ReLU -> dropout 0.5 -> fc8``, fc8 a
21-way classifier (20 VOC classes + background, label 0). The backbones on disk have no
fc layers trained on SPP features, so fc6 and fc7 start from random init (PyTorch's
default ``nn.Linear`` init); fc8 as the release's new layer (gaussian std 0.01, bias 1:
``model-defs/pascal_finetune_fc_spm_train.prototxt``).

Because fc6 is random rather than ImageNet-trained, the pooled input is multiplied by a
fixed ``input_scale`` that brings the training features to a mean L2 norm of 20: the
release's rule for SVM features (``spp_feature_stats.m``, docs/sources.md 1.7), used here so that
one learning rate suits every backbone. It is a buffer of the head, saved with it.

Layers whose activations serve as SVM features (:data:`FEATURE_LAYERS`): ``pool`` (the
pooled SPP vector itself), ``fc6`` and ``fc7`` (after their ReLU, as ``spp_poolX_to_fcX.m``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from spp_detect.stage_dir import atomic_write
from spp_detect.tensor_io import load_tensors, save_tensors

__all__ = ["FEATURE_LAYERS", "PRECISIONS", "SPPHead", "at_precision", "save_head", "load_head", "check_head_reads",
           "truncate_fc"]

#: SVM feature layers, in network order (paper Table 6 rows "pool5", "fc6", "fc7").
FEATURE_LAYERS: tuple[str, ...] = ("pool", "fc6", "fc7")
#: Dropout ratio after fc6 and fc7 (pascal_finetune_fc_spm_train.prototxt).
DROPOUT: float = 0.5
#: Arithmetic of a trained head's fc6 and fc7 when it computes features (``detect`` and
#: ``train-svm --precision``): ``fp32``, or ``bf16`` (weights and input rounded to bfloat16,
#: float32 sums: several times faster where the hardware has bf16 matrix instructions, e.g.
#: AVX512-BF16 and AMX CPUs, GPU tensor cores; the mAP cost is measured in bench.redetect).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


class SPPHead(nn.Module):
    """fc6 -> fc7 -> fc8 over pooled features ``Tensor[B, in_dim]``.

    Args:
        in_dim: pooled feature length ``C * sum(n * n)`` (25,600 for SqueezeNet, {1,2,3,6}).
        fc_dim: width of fc6 and fc7 (paper: 4096; 1,024 is the practical choice on a CPU).
        num_classes: fc8 outputs, background included (21 for VOC).
        input_scale: fixed factor applied to the input (see the module docstring).
    """

    def __init__(self, in_dim: int, fc_dim: int = 4096, num_classes: int = 21, input_scale: float = 1.0) -> None:
        super().__init__()
        self.in_dim, self.fc_dim, self.num_classes = int(in_dim), int(fc_dim), int(num_classes)
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.fc6 = nn.Linear(in_dim, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.fc8 = nn.Linear(fc_dim, num_classes)
        self.dropout = nn.Dropout(DROPOUT)
        nn.init.normal_(self.fc8.weight, std=0.01)  # release: gaussian std 0.01
        nn.init.constant_(self.fc8.bias, 1.0)  # release: bias_filler constant 1

    def forward(self, pooled: Tensor, dropout_masks: Tensor | None = None) -> Tensor:
        """Class logits ``Tensor[B, num_classes]`` of ``Tensor[B, in_dim]`` pooled features.

        ``dropout_masks`` (``Tensor[2, B, fc_dim]``, entries 0 or ``1 / (1 - p)``), when
        given, replace the dropout after fc6 and fc7: fine-tuning draws them from its own
        seeded generator, so that a minibatch split over several processes gets the masks
        one process would (:func:`spp_detect.finetune.run_finetune`).
        """
        x = torch.relu(self.fc6(pooled * self.input_scale))
        x = self.dropout(x) if dropout_masks is None else x * dropout_masks[0]
        x = torch.relu(self.fc7(x))
        x = self.dropout(x) if dropout_masks is None else x * dropout_masks[1]
        return self.fc8(x)

    def features(self, pooled: Tensor, layer: str, overwrite_input: bool = False) -> Tensor:
        """Activations of ``layer`` (:data:`FEATURE_LAYERS`) without dropout:
        ``Tensor[B, in_dim]`` for ``pool`` (the input as given), ``Tensor[B, fc_dim]`` after
        the ReLU of ``fc6``/``fc7``. ``overwrite_input``: ``pooled`` may be scaled in place
        (same values; spares a copy of the whole batch, ~100 MB per 1,000 windows)."""
        if layer == "pool":
            return pooled
        if layer not in FEATURE_LAYERS:
            raise ValueError(f"unknown feature layer {layer!r}; choose from {FEATURE_LAYERS}")
        scaled = pooled.mul_(self.input_scale) if overwrite_input else pooled * self.input_scale
        x = torch.relu(self.fc6(scaled))
        return x if layer == "fc6" else torch.relu(self.fc7(x))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the fc weights (float32, or bfloat16 for ``detect --precision bf16``),
        read from fc8, which :func:`truncate_fc` never replaces (fc6 may be an
        ``nn.Sequential`` of two ``nn.Linear`` there)."""
        return self.fc8.weight.dtype

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, fc_dim={self.fc_dim}, num_classes={self.num_classes}"


def at_precision(head: SPPHead, precision: str) -> SPPHead:
    """``head`` computing in ``precision`` (:data:`PRECISIONS`): itself for ``fp32``, a
    bfloat16 copy for ``bf16`` (the caller's head is left as it is)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return head if precision == "fp32" else copy.deepcopy(head).to(torch.bfloat16)


def save_head(folder: Path | str, head: SPPHead, name: str = "head", features_from: str | None = None) -> Path:
    """Write ``<folder>/<name>.npz`` (the state_dict) and ``<name>.json`` (its shape and
    ``features_from``: the identity of the trunk weights whose pooled features it reads,
    as an extract cache records them, :func:`spp_detect.stage_dir.weights_identity`)."""
    folder = Path(folder)
    meta = {"in_dim": head.in_dim, "fc_dim": head.fc_dim, "num_classes": head.num_classes, "features_from": features_from}
    atomic_write(folder / f"{name}.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    return save_tensors(folder / f"{name}.npz", head.state_dict())


def load_head(folder: Path | str, name: str = "head") -> SPPHead:
    """Read a head written by :func:`save_head`, in eval mode.

    Raises:
        FileNotFoundError: no such head in ``folder``.
    """
    folder = Path(folder)
    meta_path = folder / f"{name}.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} holds no fine-tuned head ({meta_path.name} missing); run finetune first")
    meta = json.loads(meta_path.read_text())
    head = SPPHead(meta["in_dim"], meta["fc_dim"], meta["num_classes"])
    head.load_state_dict(load_tensors(folder / f"{name}.npz"))
    head.features_from = meta.get("features_from")
    head.folder = folder
    return head.eval()


def check_head_reads(head: SPPHead, cache_folder: Path | str, cache_weights: str) -> None:
    """Refuse a cache whose trunk weights are not those the head was trained on.

    A head trained with its trunk (``finetune --train-from``) reads features of that
    fine-tuned trunk only (``extract --head``); an fc-only head those of the trunk its
    caches were made with. Heads written before this was recorded are not checked.

    Raises:
        ValueError: naming the cache's weights, the head's, and the command that fits.
    """
    wanted = getattr(head, "features_from", None)
    if wanted is None or wanted == cache_weights:
        return
    folder = getattr(head, "folder", "the head")
    trunk = (folder / "trunk.json").is_file() if isinstance(folder, Path) else False
    hint = (f"extract the cache with the head's fine-tuned trunk (spp-detect extract --head {folder})" if trunk
            else "use caches extracted with the weights the head was trained on")
    raise ValueError(f"{cache_folder} was extracted with trunk weights {cache_weights}, but the head in {folder} "
                     f"reads features of {wanted}{' (its fine-tuned trunk)' if trunk else ''}: {hint}")


def truncate_fc(head: SPPHead, rank: int, layers: tuple[str, ...] = ("fc6",)) -> SPPHead:
    """A copy of ``head`` whose ``layers`` are replaced by their rank-``rank`` truncated SVD.

    Fast R-CNN's compression (Girshick, ICCV 2015, section 3.1): ``W ~ U_t S_t V_t'`` turns
    one ``fc_dim x in_dim`` product into ``rank x in_dim`` then ``fc_dim x rank``; for fc6
    over a 25,600-d pooled vector and ``fc_dim`` 1,024, rank 256 cuts its work ~3.8x. The
    result is approximate: measure its mAP (``bench/detect_speed.py``).
    """
    import copy

    out = copy.deepcopy(head)
    for name in layers:
        layer: nn.Linear = getattr(out, name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is already truncated")
        if not 0 < rank < min(layer.weight.shape):
            raise ValueError(f"rank must be in 1..{min(layer.weight.shape) - 1} for {name}, got {rank}")
        u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
        first = nn.Linear(layer.in_features, rank, bias=False)
        second = nn.Linear(rank, layer.out_features)
        with torch.no_grad():
            first.weight.copy_((s[:rank, None] * vh[:rank]).float())  # [rank, in]
            second.weight.copy_(u[:, :rank].float())  # [out, rank]
            second.bias.copy_(layer.bias.detach())
        setattr(out, name, nn.Sequential(first, second))
    return out.eval()
