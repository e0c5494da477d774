"""Unit tests of the training engine (share_transform.train): in-process, small tensors, CPU."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import share_transform
from share_transform.errors import UnknownInitError
from share_transform.train import (
    METRIC_KEYS,
    DistInfo,
    NonFiniteLossError,
    Normalize,
    build_optimizer,
    build_scheduler,
    evaluate,
    init_weights,
    load_run_checkpoint,
    make_loader,
    plot_curves,
    read_metrics,
    save_checkpoint,
    scaled_lr,
    train_one_epoch,
    unique_parameters,
)
from share_transform.train.data.imagenet import (
    MEAN,
    PCA_EIGVAL,
    PCA_EIGVEC,
    STD,
    Lighting,
    eval_resize,
    eval_transform,
    train_transform,
)
from share_transform.train.data.sampling import SeededDataset, sample_seed
from share_transform.train.metrics import METRICS_FILE, ProgressBar, curves_figure
from share_transform.train.trainer import alias_groups, init_classifier, keep_ties

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = {"channels": [8, 16, 32, 64], "stem_width": 8, "layers": [2, 2, 2, 2]}


@pytest.fixture(scope="module")
def shared_model() -> nn.Module:
    torch.manual_seed(0)
    model = share_transform.build_model("resnet18", num_classes=3, **TINY)
    return share_transform.apply(model)


def test_optimizer_sees_each_shared_weight_once(shared_model: nn.Module) -> None:
    params = unique_parameters(shared_model)
    assert len({id(p) for p in params}) == len(params)
    assert sum(p.numel() for p in params) == share_transform.count_parameters(shared_model)
    opt = build_optimizer(shared_model, lr=0.1)
    group = opt.param_groups[0]
    assert len(opt.param_groups) == 1 and len(group["params"]) == len(params)
    # docs/design.md, Training protocols: SGD Nesterov, momentum 0.9, dampening 0, weight decay 1e-4 on all parameters.
    assert (group["nesterov"], group["momentum"], group["dampening"], group["weight_decay"]) == (True, 0.9, 0.0, 1e-4)


def test_shared_weight_gets_summed_gradient_and_one_update() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.Conv2d(2, 2, 3, padding=1, bias=False))
    model[1].weight = conv.weight  # tied as share_transform.apply ties
    opt = build_optimizer(model, lr=0.5, momentum=0.0, weight_decay=0.0)
    x = torch.randn(1, 2, 4, 4)
    model(x).sum().backward()
    grad = conv.weight.grad.clone()
    before = conv.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(conv.weight.detach(), before - 0.5 * grad)  # one step, not two


def test_multistep_schedule_matches_fb_resnet() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=scaled_lr(0.1, 256))
    sched = build_scheduler(opt, milestones=[30, 60], gamma=0.1)
    lrs = []
    for _ in range(90):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == lrs[29] == 0.1
    assert math.isclose(lrs[30], 0.01) and math.isclose(lrs[59], 0.01)
    assert math.isclose(lrs[60], 0.001) and math.isclose(lrs[89], 0.001)
    assert scaled_lr(0.1, 1024) == pytest.approx(0.4)


def test_init_weights_refuses_an_unknown_mode() -> None:
    model = nn.Conv2d(3, 4, 3)
    before = model.weight.detach().clone()
    with pytest.raises(UnknownInitError, match="^unknown init mode 'xavier'; choose one of fan_out, fan_in$"):
        init_weights(model, "xavier")
    assert torch.equal(model.weight, before)


@pytest.mark.parametrize("mode", ["fan_out", "fan_in"])
def test_init_weights_he_normal(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 128, 3, bias=True), nn.BatchNorm2d(128), nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    init_weights(model, mode)
    fan = 9 * (128 if mode == "fan_out" else 64)
    assert model[0].weight.std().item() == pytest.approx(math.sqrt(2 / fan), rel=0.02)
    assert model[0].weight.mean().abs().item() < 1e-3
    assert torch.count_nonzero(model[0].bias) == 0
    assert torch.all(model[1].weight == 1) and torch.count_nonzero(model[1].bias) == 0
    assert torch.count_nonzero(model[3].bias) == 0


def test_lighting_adds_the_pca_offset() -> None:
    img = torch.full((3, 4, 4), 0.5)
    torch.manual_seed(3)
    out = Lighting(0.1)(img)
    torch.manual_seed(3)
    alpha = torch.empty(3).normal_(0.0, 0.1)
    expected = torch.tensor(PCA_EIGVEC) @ (alpha * torch.tensor(PCA_EIGVAL))
    torch.testing.assert_close(out[:, 0, 0], 0.5 + expected)
    assert torch.equal(Lighting(0.0)(img), img)
    u8 = Lighting(0.1)(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    assert u8.dtype == torch.uint8  # clamped and rounded back to bytes


def test_transforms_shapes_and_protocol_constants() -> None:
    from PIL import Image

    img = Image.new("RGB", (50, 40), (200, 10, 10))
    assert train_transform(32)(img).shape == (3, 32, 32)
    assert train_transform(32)(img).dtype == torch.uint8
    assert eval_resize(224) == 256
    val = eval_transform(32)(img)
    assert val.shape == (3, 32, 32) and val.dtype == torch.uint8
    assert eval_transform(32, ten_crop=True)(img).shape == (10, 3, 32, 32)
    t = train_transform(224).transforms
    crop, jitter = t[0], t[1]
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4),
        (0.6, 1.4),
        (0.6, 1.4),
        None,
    )
    assert t[-1].p == 0.5


def test_normalize_on_device_matches_torchvision() -> None:
    from torchvision.transforms import functional as TF

    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    out = Normalize(MEAN, STD, channels_last=True)(x)
    torch.testing.assert_close(out, TF.normalize(x.float() / 255, MEAN, STD))
    assert out.is_contiguous(memory_format=torch.channels_last)


class _RandomNoise(torch.utils.data.Dataset):
    """Returns a draw from torch's global generator: shows which generator a loader seeds."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3), i


def test_augmentation_depends_on_seed_epoch_index_only() -> None:
    ds = SeededDataset(_RandomNoise(), seed=5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = ds[(1, 3)][0]
    assert torch.equal(torch.get_rng_state(), state)  # the training stream is untouched
    assert torch.equal(a, ds[(1, 3)][0])
    assert not torch.equal(a, ds[(2, 3)][0]) and not torch.equal(a, ds[(1, 4)][0])
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)

    def epoch_batches(workers: int, epoch: int) -> list[torch.Tensor]:
        loader = make_loader(_RandomNoise(), batch_size=4, train=True, seed=5, dist_info=CPU, workers=workers)
        loader.sampler.set_epoch(epoch)
        return [torch.cat([x, y[:, None].float()], 1) for x, y in loader]

    in_process = epoch_batches(0, 1)
    with_workers = epoch_batches(2, 1)
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))
    assert not torch.equal(torch.cat(in_process), torch.cat(epoch_batches(0, 2)))


def test_eval_shards_cover_every_sample_once() -> None:
    ds = TensorDataset(torch.arange(11), torch.arange(11))
    seen = []
    for rank in range(3):
        info = DistInfo(rank=rank, world_size=3, local_rank=rank, device=torch.device("cpu"))
        loader = make_loader(ds, batch_size=2, train=False, seed=0, dist_info=info, workers=0)
        seen += [int(v) for x, _ in loader for v in x]
    assert sorted(seen) == list(range(11))


def _linear_loader(n_batches: int, nan_at: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n_batches):
        x = torch.randn(4, 6, generator=g)
        if i == nan_at:
            x[0, 0] = float("nan")
        batches.append((x, torch.randint(0, 3, (4,), generator=g)))
    return batches


def test_train_one_epoch_reports_errors_in_percent() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = build_optimizer(model, lr=0.1)
    stats = train_one_epoch(model, _linear_loader(5), opt, epoch=0, device=torch.device("cpu"), log_every=2)
    assert stats.images == 20 and 0 <= stats.top1_err <= 100 and stats.top5_err == 0.0  # 3 classes: top-5 = all
    assert stats.loss > 0 and stats.images_per_s > 0


def test_nan_loss_names_the_first_bad_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = build_optimizer(model, lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 4/6 \(step 10 of the run\)") as e:
        loader = _linear_loader(6, nan_at=3)
        train_one_epoch(model, loader, opt, epoch=1, device=torch.device("cpu"), log_every=4, start_step=6)
    assert (e.value.epoch, e.value.step) == (1, 9)
    assert isinstance(e.value, share_transform.ShareError)


def test_evaluate_averages_ten_crop_logits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    crops = torch.randn(3, 10, 3, 2, 2)
    targets = torch.tensor([0, 1, 2])
    stats = evaluate(model, [(crops, targets)], device=torch.device("cpu"))
    with torch.no_grad():
        logits = model(crops.flatten(0, 1)).view(3, 10, 4).mean(1)
    assert stats.loss == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    hits = (logits.argmax(1) == targets).sum().item()
    assert stats.top1_err == pytest.approx(100 * (1 - hits / 3))


def test_channels_last_keeps_ties_and_an_untied_model_is_retied() -> None:
    model = share_transform.build_model("resnet18", num_classes=3, **TINY)
    share_transform.apply(model)
    groups = alias_groups(model)
    assert groups and all(len(g) >= 2 for g in groups)
    model.to(memory_format=torch.channels_last)
    assert alias_groups(model) == groups and share_transform.is_tied(model)
    # The to_empty trap (docs/design.md, Tie traps): one new Parameter per module.
    model.to("meta").to_empty(device="cpu")
    assert alias_groups(model) != groups
    keep_ties(model, groups, "a test")
    assert alias_groups(model) == groups and share_transform.is_tied(model)


def test_checkpoint_round_trip_keeps_ties(tmp_path, shared_model: nn.Module) -> None:
    opt = build_optimizer(shared_model, lr=0.1)
    shared_model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"epoch": 4, "optimizer": opt.state_dict(), "history": [{"epoch": 4}]}
    save_checkpoint(tmp_path, "last", shared_model, state)
    other = share_transform.apply(share_transform.build_model("resnet18", num_classes=3, **TINY))
    got = load_run_checkpoint(tmp_path, "last", other)
    assert got["epoch"] == 4 and got["history"] == [{"epoch": 4}]
    assert share_transform.is_tied(other)
    for (name, a), b in zip(shared_model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    loaded = share_transform.load(tmp_path / "checkpoint-last.safetensors")
    assert share_transform.is_tied(loaded)
    # Files of different epochs that save_checkpoint did not write as a pair: resuming must refuse.
    save_checkpoint(tmp_path, "mixed", shared_model, {"epoch": 5})
    (tmp_path / "checkpoint-mixed.state.pt").write_bytes((tmp_path / "checkpoint-last.state.pt").read_bytes())
    with pytest.raises(share_transform.errors.CheckpointError, match="epoch 5 .* epoch 4"):
        load_run_checkpoint(tmp_path, "mixed", other)


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (BaseException: no ``except Exception`` catches it)."""


def _kill(*args: object) -> None:
    raise Killed


@pytest.mark.parametrize(
    ("killed_in", "resumed_epoch"),
    [("_write_weights", 1), ("_commit_state", 2)],
    ids=["before-the-weights", "before-the-state-rename"],
)
def test_a_kill_while_checkpointing_leaves_a_pair_to_resume_from(
    tmp_path, monkeypatch: pytest.MonkeyPatch, killed_in: str, resumed_epoch: int
) -> None:
    from share_transform.train import checkpoint

    model = nn.Linear(3, 2)
    weights = {1: torch.full((2, 3), 1.0), 2: torch.full((2, 3), 2.0)}
    with torch.no_grad():
        model.weight.copy_(weights[1])
    save_checkpoint(tmp_path, "last", model, {"epoch": 1, "history": [1]})
    with torch.no_grad():
        model.weight.copy_(weights[2])
    with monkeypatch.context() as m:
        m.setattr(checkpoint, killed_in, _kill)
        with pytest.raises(Killed):
            save_checkpoint(tmp_path, "last", model, {"epoch": 2, "history": [1, 2]})

    resumed = nn.Linear(3, 2)
    state = load_run_checkpoint(tmp_path, "last", resumed)
    assert state["epoch"] == resumed_epoch and state["history"] == [1, 2][:resumed_epoch]
    assert torch.equal(resumed.weight, weights[resumed_epoch])
    # The next save completes the pair under the usual names and leaves no epoch-stamped state behind.
    save_checkpoint(tmp_path, "last", model, {"epoch": 3, "history": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.safetensors", "checkpoint-last.state.pt"]
    assert load_run_checkpoint(tmp_path, "last", resumed)["epoch"] == 3


def test_read_metrics_is_one_record_per_epoch_and_names_a_bad_line(tmp_path) -> None:
    path = tmp_path / METRICS_FILE
    # Epoch 2 logged, then logged again after a resume: the later line wins, in epoch order.
    path.write_text('{"epoch": 1, "x": 1}\n{"epoch": 2, "x": 2}\n\n{"epoch": 2, "x": 3}\n')
    assert read_metrics(path) == [{"epoch": 1, "x": 1}, {"epoch": 2, "x": 3}]
    for bad in ("not json", '{"x": 1}', "[1]"):
        path.write_text('{"epoch": 1}\n' + bad + "\n")
        with pytest.raises(share_transform.errors.FileFormatError, match=f"{METRICS_FILE}:2 is not a metrics line"):
            read_metrics(path)


def _series(ax) -> dict[str, tuple[list[float], list[float], str]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()), ln.get_marker()) for ln in ax.lines}


def test_curves_after_one_epoch_draw_every_series_as_a_point_on_integer_epochs(tmp_path) -> None:
    record = {k: 1.0 for k in METRIC_KEYS} | {"epoch": 1, "train_loss": 2.5, "train_top1_err": 80.0}
    fig = curves_figure([record | {"val_top1_err": 70.0, "val_top5_err": 30.0}], title="t")
    loss, err = fig.axes
    assert _series(loss) == {"train": ([1], [2.5], ".")}
    assert _series(err) == {
        "test top-1": ([1], [70.0], "."),
        "test top-5": ([1], [30.0], "."),
        "train top-1": ([1], [80.0], "."),  # drawn: one point, with its marker
    }
    fig.canvas.draw()
    for ax in (loss, err):  # no fractional epochs on the axis
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert err.get_title() == "test error" and {t.get_text() for t in err.get_legend().get_texts()} == set(_series(err))

    # A run with a held-out split: val_* is the split, the test set a point on the epochs it was evaluated at.
    history = [
        {k: float(i) for k in METRIC_KEYS} | {"epoch": i, "shared": True}
        | ({"test_top1_err": 10.0 * i} if i in (2, 3) else {})
        for i in range(1, 4)
    ]  # fmt: skip
    err = curves_figure(history, held_out="val").axes[1]
    series = _series(err)
    assert series["val top-1"][:2] == ([1, 2, 3], [1.0, 2.0, 3.0]) and err.get_title() == "validation error"
    assert series["test top-1 (final, best)"][:2] == ([2, 3], [20.0, 30.0])
    plot_curves(tmp_path / "curves.png", history, title="t", held_out="val")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_he_classifier_init_draws_the_reference_distribution() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(640, 100))
    default = model[1].weight.detach().clone()
    init_classifier(model, "uniform")
    assert torch.equal(model[1].weight, default)
    init_classifier(model, "he")  # kaiming_normal_'s N(0, sqrt(2 / fan_in)), as the soft-sharing reference's
    assert model[1].weight.std().item() == pytest.approx(math.sqrt(2 / 640), rel=0.02)
    assert model[1].weight.mean().abs().item() < 2e-3
    reference = torch.empty(100, 640)
    nn.init.kaiming_normal_(reference)
    assert model[1].weight.std().item() == pytest.approx(reference.std().item(), rel=0.03)
    with pytest.raises(share_transform.train.ConfigError, match="unknown classifier init 'xavier'"):
        init_classifier(model, "xavier")


def test_progress_bar(tmp_path) -> None:
    out = io.StringIO()
    bar = ProgressBar(10, "epoch 1/1", stream=out)
    for i in range(1, 11):
        bar.update(i, loss=1.0 / i, img_s=100.0)
    bar.close("done")
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1] == "done"
    # One precision per figure, whatever its size: loss 1/1 and 1/10 both with 4 decimals.
    assert "1/10  loss 1.0000  img/s 100.0  eta " in lines[0]
    assert "10/10  loss 0.1000  img/s 100.0  eta " in lines[-2]
