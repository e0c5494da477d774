"""``sharetx import-swrn``: a soft-sharing WRN of the reference code (lolemacs/soft-sharing) as a ShaResNet file.

The reference network is written out below in the reference's own terms (``models/layers.py``, ``models/swrn.py``:
``TemplateBank``, ``SConv2d``, ``Block``, ``SWRN``, Python 3 spelling), so its state dict has the reference's names
and shapes; the imported model must compute what explicitly mixing the reference's weights computes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import share_transform
from share_transform.cli import main as sharetx
from share_transform.errors import CheckpointError
from share_transform.swrn import import_swrn, swrn_layout


class TemplateBank(nn.Module):
    def __init__(self, num_templates: int, in_planes: int, out_planes: int, kernel_size: int) -> None:
        super().__init__()
        self.coefficient_shape = (num_templates, 1, 1, 1, 1)
        templates = [torch.empty(out_planes, in_planes, kernel_size, kernel_size) for _ in range(num_templates)]
        for t in templates:
            nn.init.kaiming_normal_(t)
        self.templates = nn.Parameter(torch.stack(templates))

    def forward(self, coefficients: torch.Tensor) -> torch.Tensor:
        return (self.templates * coefficients).sum(0)


class SConv2d(nn.Module):
    def __init__(self, bank: TemplateBank, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.stride, self.padding, self.bank = stride, padding, bank
        self.coefficients = nn.Parameter(torch.zeros(bank.coefficient_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.bank(self.coefficients), stride=self.stride, padding=self.padding)


class Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, bank: TemplateBank | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = SConv2d(bank) if bank else nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = SConv2d(bank) if bank else nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.relu(self.bn1(x))
        if not self.equalInOut:
            residual = out
        out = self.conv2(self.relu(self.bn2(self.conv1(out))))
        if self.convShortcut is not None:
            residual = self.convShortcut(residual)
        return out + residual


class SWRN(nn.Module):
    def __init__(self, depth: int, width: int, num_templates: int, num_classes: int) -> None:
        super().__init__()
        n_channels = [16, 16 * width, 32 * width, 64 * width]
        num_blocks = (depth - 4) // 6
        self.conv_3x3 = nn.Conv2d(3, n_channels[0], 3, 1, 1, bias=False)
        self.bank_1 = TemplateBank(num_templates, n_channels[1], n_channels[1], 3)
        self.stage_1 = self._make_layer(n_channels[0], n_channels[1], num_blocks, self.bank_1, 1)
        self.bank_2 = TemplateBank(num_templates, n_channels[2], n_channels[2], 3)
        self.stage_2 = self._make_layer(n_channels[1], n_channels[2], num_blocks, self.bank_2, 2)
        self.bank_3 = TemplateBank(num_templates, n_channels[3], n_channels[3], 3)
        self.stage_3 = self._make_layer(n_channels[2], n_channels[3], num_blocks, self.bank_3, 2)
        self.lastact = nn.Sequential(nn.BatchNorm2d(n_channels[3]), nn.ReLU(inplace=True))
        self.avgpool = nn.AvgPool2d(8)
        self.classifier = nn.Linear(n_channels[3], num_classes)
        for i in range(1, 4):
            inits = torch.zeros((2 * (num_blocks - 1), num_templates, 1, 1, 1, 1))
            nn.init.orthogonal_(inits)
            group = [m for name, m in self.named_modules() if isinstance(m, SConv2d) and f"stage_{i}" in name]
            for j, module in enumerate(group):
                module.coefficients.data = inits[j]

    def _make_layer(self, in_planes: int, out_planes: int, n: int, bank: TemplateBank, stride: int) -> nn.Sequential:
        blocks = [Block(in_planes, out_planes, stride)]
        blocks += [Block(out_planes, out_planes, 1, bank) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage_3(self.stage_2(self.stage_1(self.conv_3x3(x))))
        x = self.avgpool(self.lastact(x))
        return self.classifier(x.view(x.size(0), -1))


def reference(depth: int = 22, width: int = 1, k: int = 3, classes: int = 7) -> SWRN:
    """A reference SWRN with every BatchNorm's statistics and affine parameters away from their defaults."""
    torch.manual_seed(0)
    net = SWRN(depth, width, k, classes)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_imported_model_computes_the_reference_mix() -> None:
    net = reference()
    state = net.state_dict()
    # The reference's layout: a bank per stage, its alias in every SConv2d, coefficients (k, 1, 1, 1, 1).
    assert state["bank_2.templates"].shape == (3, 32, 32, 3, 3)
    assert state["stage_2.1.conv2.coefficients"].shape == (3, 1, 1, 1, 1)
    assert torch.equal(state["stage_2.2.conv1.bank.templates"], state["bank_2.templates"])
    assert swrn_layout(state).arch == "wrn_22_1" and swrn_layout(state).templates == 3

    model = import_swrn(state).eval()
    plan = share_transform.get_plan(model)
    assert plan is not None and plan.policy == "swrn" and plan.templates == 3
    # Each stage: blocks 2-3 mix the bank with both 3x3s, in the order the reference numbers its SConv2ds.
    assert [len(g.members) for g in plan.groups] == [4, 4, 4]
    assert share_transform.count_parameters(model) == sum(p.numel() for p in net.parameters())

    # Every member's weight is the explicit mix of the reference's bank with its coefficients.
    modules = dict(model.named_modules())
    for s, group in enumerate(plan.groups, start=1):
        bank = state[f"bank_{s}.templates"]
        theirs = [n for n in state if n.startswith(f"stage_{s}.") and n.endswith(".coefficients")]
        assert [m.replace(f"stages.{s - 1}.", f"stage_{s}.") + ".coefficients" for m in group.members] == theirs
        for member, name in zip(group.members, theirs):
            mixed = sum(c * t for c, t in zip(state[name].flatten(), bank))
            torch.testing.assert_close(modules[member].weight, mixed, rtol=1e-6, atol=1e-6)

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)


def test_cli_writes_a_file_that_loads_with_the_reference_forward(tmp_path: Path) -> None:
    net = reference(depth=16, width=2, k=2, classes=10)
    checkpoint = tmp_path / "checkpoint.pth.tar"
    # As the reference's main.py saves it under DataParallel, less the pickled RecorderMeter.
    wrapped = nn.DataParallel(net)
    torch.save({"epoch": 200, "arch": "swrn", "state_dict": wrapped.state_dict()}, checkpoint)
    out = tmp_path / "swrn16-2-2.safetensors"
    result = CliRunner().invoke(sharetx, ["import-swrn", str(checkpoint), "-o", str(out)], standalone_mode=False)
    assert result.exit_code == 0, result.output
    assert "wrn_16_2" in result.output and "2 templates" in result.output

    model = share_transform.load(out).eval()
    assert share_transform.is_tied(model)
    assert share_transform.count_parameters(model) == sum(p.numel() for p in net.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)

    # An existing output is refused without --force, in one line and exit 2, before anything is read.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    again = subprocess.run(
        [sys.executable, "-m", "share_transform", "import-swrn", str(checkpoint), "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr, again.stderr


def test_a_foreign_or_inconsistent_checkpoint_is_refused() -> None:
    state = reference(depth=16, width=1, k=2, classes=10).state_dict()
    tampered = {**state, "stage_1.1.conv2.bank.templates": state["bank_1.templates"] + 1}
    with pytest.raises(CheckpointError, match=r"^stage_1\.1\.conv2\.bank\.templates differs from bank_1\.templates"):
        import_swrn(tampered)
    with pytest.raises(CheckpointError, match=r"'stage_1\.1\.conv3\.weight' is not a name of the reference's SWRN"):
        import_swrn({**state, "stage_1.1.conv3.weight": torch.zeros(1)})
    no_bank = {k: v for k, v in state.items() if not k.startswith("bank_3")}
    with pytest.raises(CheckpointError, match="expected bank_1.templates, bank_2.templates, bank_3.templates"):
        import_swrn(no_bank)
    resnet = share_transform.build_model("resnet18", num_classes=3, layers=[1, 1, 1, 1]).state_dict()
    with pytest.raises(CheckpointError, match="not a soft-sharing WRN checkpoint of the reference code"):
        import_swrn(resnet)
