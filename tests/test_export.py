"""ONNX export: one initializer per shared weight, outputs equal to PyTorch's, files that shrink with the
parameter count, and nothing written when the export fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import share_transform as st
from share_transform.errors import ExportError, InputSizeError
from share_transform.export import export_onnx

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install -e '.[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install -e '.[onnx]'")

SIZE = (3, 96, 96)  # shape propagation is done at 224; a smaller check input keeps the CPU test fast


def conv_weight_initializers(path: Path) -> tuple[int, int]:
    """(Conv nodes, distinct initializers holding their weights), counted with the onnx package."""
    graph = onnx.load(str(path)).graph
    initializers = {i.name for i in graph.initializer}
    weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    assert set(weights) <= initializers
    return len(weights), len(set(weights))


@pytest.fixture(scope="module")
def sharesnet50(tmp_path_factory: pytest.TempPathFactory):
    """ShaResNet-50 exported, then the same weights untied and exported again."""
    out = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = st.apply(st.build_model("resnet50"))
    shared = export_onnx(model, out / "shared.onnx", input_size=SIZE)
    unshared = export_onnx(st.untie(model), out / "unshared.onnx", input_size=SIZE)
    return model, shared, unshared


def test_shared_weights_are_one_initializer_each(sharesnet50) -> None:
    model, shared, unshared = sharesnet50
    assert conv_weight_initializers(shared.path) == (53, 44)  # ResNet-50: 53 convs, 9 spatial convs fewer
    assert conv_weight_initializers(unshared.path) == (53, 53)
    assert (shared.conv_weight_initializers, shared.distinct_conv_weights) == (44, 44)
    assert (unshared.conv_weight_initializers, unshared.distinct_conv_weights) == (53, 53)


def test_onnxruntime_matches_pytorch(sharesnet50) -> None:
    model, shared, _ = sharesnet50
    assert shared.max_abs_diff <= 1e-4
    # Checked here again, independently of export_onnx's own check, on another input and batch size.
    model.eval()
    x = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(7))
    session = ort.InferenceSession(str(shared.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == (4, 1000)
    assert np.abs(got - ref).max() <= 1e-4


def test_file_shrinks_with_the_parameter_count(sharesnet50) -> None:
    _, shared, unshared = sharesnet50
    param_ratio = 20_469_800 / 25_557_032  # Table 1: ShaResNet-50 over ResNet-50
    size_ratio = shared.file_bytes / unshared.file_bytes
    assert shared.file_bytes == shared.path.stat().st_size
    # BatchNorm statistics and the graph itself add the same few bytes to both files.
    assert size_ratio == pytest.approx(param_ratio, abs=0.003)


class Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("this forward cannot be traced")


def test_failed_export_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="torch.onnx.export failed"):
        export_onnx(Fails(), target, input_size=(3, 8, 8))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputSizeError):
        export_onnx(Fails(), target, input_size=(3, 0, 8))
    assert list(tmp_path.iterdir()) == []


def test_export_restores_each_submodules_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = st.apply(st.build_model("resnet18", layers=[2, 2, 2, 2], channels=[8, 16, 32, 64], num_classes=5))
    model.train()
    model.bn1.eval()  # a frozen BatchNorm must stay frozen
    modes = [m.training for m in model.modules()]
    export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32))
    assert [m.training for m in model.modules()] == modes


def test_the_check_scales_with_the_outputs(tmp_path: Path) -> None:
    """float32 rounding grows with the values: logits in the thousands differ by more than 1e-4 between runtimes
    and still match (a randomly initialised WRN-40-4's logits failed the absolute check)."""
    torch.manual_seed(0)
    model = st.apply(st.build_model("resnet18", num_classes=10, layers=[1, 1, 1, 1], channels=[8, 16, 32, 64]))
    with torch.no_grad():
        model.fc.weight.mul_(1e4)
    result = export_onnx(model, tmp_path / "loud.onnx", input_size=(3, 32, 32))
    with torch.no_grad():
        loudest = float(model.eval()(torch.randn(3, 3, 32, 32)).abs().max())
    assert loudest > 100 and result.max_abs_diff <= 1e-4 * loudest * 10
