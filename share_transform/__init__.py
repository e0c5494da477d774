"""share_transform: turn residual networks into ShaResNets.

A ShaResNet (Boulch, "ShaResNet: reducing residual network parameter number by sharing weights",
arXiv 1702.08782) shares one spatial conv weight among the residual blocks of each stage. A torch.fx pass
finds the stages and blocks of any timm or torchvision ResNet / Wide-ResNet / ResNeXt and ties them:

    >>> import timm, share_transform
    >>> model = share_transform.apply(timm.create_model("resnet152"))
    >>> share_transform.count_parameters(model)  # 60,192,808 before
    36821032
"""

from . import models, paper  # models registers the paper's CIFAR networks with timm
from .apply import apply, count_parameters, get_plan, is_tied, retie, untie
from .build import build_model, build_spec
from .errors import (
    InputSizeError,
    NoSpatialConvError,
    NotAModuleError,
    PlanMismatchError,
    ShareError,
    TraceError,
    UnknownInitError,
    UnknownModelError,
    UnknownPolicyError,
)
from .models import preact_resnet, wide_resnet
from .plan import POLICIES, ShareGroup, SharePlan, SpatialConv, StagePlan, plan
from .signature import ConvSignature

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "ConvSignature",
    "InputSizeError",
    "NoSpatialConvError",
    "NotAModuleError",
    "PlanMismatchError",
    "ShareError",
    "ShareGroup",
    "SharePlan",
    "SpatialConv",
    "StagePlan",
    "TraceError",
    "UnknownInitError",
    "UnknownModelError",
    "UnknownPolicyError",
    "apply",
    "build_model",
    "build_spec",
    "count_parameters",
    "get_plan",
    "is_tied",
    "models",
    "paper",
    "plan",
    "preact_resnet",
    "retie",
    "untie",
    "wide_resnet",
]
