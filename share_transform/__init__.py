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
    CheckpointError,
    ConfigError,
    DataError,
    ExportError,
    FileFormatError,
    InputSizeError,
    MissingFileError,
    ModelArgumentError,
    NonFiniteLossError,
    NoSpatialConvError,
    NotAModuleError,
    OutputExistsError,
    PlanMismatchError,
    ReportError,
    ShareError,
    TraceError,
    UnknownInitError,
    UnknownModelError,
    UnknownPolicyError,
)
from .export import OnnxExport, export_onnx
from .io import FileInfo, load, load_checkpoint, read_checkpoint, read_info, save
from .models import preact_resnet, wide_resnet
from .plan import POLICIES, ShareGroup, SharePlan, SpatialConv, StagePlan, plan
from .signature import ConvSignature
from .summary import ShareSummary, summarize

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConvSignature",
    "DataError",
    "ExportError",
    "FileFormatError",
    "FileInfo",
    "InputSizeError",
    "MissingFileError",
    "ModelArgumentError",
    "NonFiniteLossError",
    "NoSpatialConvError",
    "NotAModuleError",
    "OnnxExport",
    "OutputExistsError",
    "POLICIES",
    "PlanMismatchError",
    "ReportError",
    "ShareError",
    "ShareGroup",
    "SharePlan",
    "ShareSummary",
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
    "export_onnx",
    "get_plan",
    "is_tied",
    "load",
    "load_checkpoint",
    "models",
    "paper",
    "plan",
    "preact_resnet",
    "read_checkpoint",
    "read_info",
    "retie",
    "save",
    "summarize",
    "untie",
    "wide_resnet",
]
