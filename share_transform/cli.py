"""``sharetx``: the command line of share_transform, thin over the API.

Commands: ``convert`` (build, share, report, write a file), ``plan`` (the report, no file), ``sweep``
(the parameter counts over the sharing dial), ``inspect``
(what a file holds), ``table`` (the paper's Table 1, measured), ``export`` (ONNX), ``import-swrn`` (a soft-sharing
WRN of the reference code into a file) and ``models`` (names it can build). Reporting commands take ``--json``.

Errors are one line on stderr: exit code 2 for bad input (a :class:`ShareError`, a bad option, a file
that cannot be read or written), 1 for an internal failure (including an ONNX export that fails its own
check); no traceback, unless ``sharetx --debug`` or ``SHARETX_DEBUG=1`` asks for one, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .build import SOURCES, build_model, list_model_names, split_name
from .errors import ExportError, MissingFileError, ShareError, ShareOptionError, debug_requested
from .fs import check_writable, existing_file
from .policies import ALLOCATIONS, INITS, POLICIES, SCOPES, SharingOptions
from .text import format_columns
from .version import __version__

if TYPE_CHECKING:
    from torch import nn

    from .planning import SharePlan

# torch, timm and the pass are imported inside the commands that use them, after the paths and options are
# checked: `sharetx --help`, `--version`, a usage error, a missing input or an existing output answer without
# paying seconds for them.

#: The init ``convert --checkpoint`` uses for hard groups unless told otherwise (docs/design.md, Warm starts).
WARM_START = "mean"

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_NO_MATCH = 1

F = TypeVar("F", bound=Callable[..., Any])


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _report(e: Exception, debug: bool) -> int:
    """Say what went wrong in one line on stderr (after the traceback, with ``debug``); the exit code."""
    if debug:
        click.echo("".join(traceback.format_exception(e)).rstrip(), err=True)
    if isinstance(e, ExportError):  # the exporter, not the user, got it wrong
        return _fail(str(e), EXIT_INTERNAL)
    if isinstance(e, ShareError):
        return _fail(str(e), EXIT_USAGE)
    if isinstance(e, OSError):  # a path the user gave cannot be read or written
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}", EXIT_USAGE)
    # A bug: one line, unless asked for the traceback.
    hint = "" if debug else " (rerun with sharetx --debug for the traceback)"
    return _fail(f"internal error ({type(e).__name__}: {e}); please report it{hint}", EXIT_INTERNAL)


class SharetxGroup(click.Group):
    """A click group whose errors are one line on stderr, with sharetx's exit codes, and no traceback unless
    ``--debug`` (a group option) or the environment's ``SHARETX_DEBUG=1`` asks for one."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # a command failed: here the group's --debug is known
            raise click.exceptions.Exit(_report(e, bool(ctx.params.get("debug")) or debug_requested())) from e

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = 0
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.ClickException as e:
            hint = f" (see '{e.ctx.command_path} --help')" if isinstance(e, click.UsageError) and e.ctx else ""
            code = _fail(e.format_message() + hint, e.exit_code)
        except click.Abort:
            code = _fail("aborted", EXIT_INTERNAL)
        except Exception as e:  # before a command ran (a parameter's callback): the environment decides
            code = _report(e, debug_requested())
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int) -> int:
    click.echo(f"sharetx: error: {_one_line(message)}", err=True)
    return code


def _emit(data: Any, text: str, as_json: bool) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of text.")(f)


class PolicyChoice(click.Choice):  # type: ignore[type-arg]
    """``--policy``'s choices: the policies registered when the command runs, not when this module was imported
    (the built-in ones, plus any :func:`share_transform.policies.register_policy` added before ``main()``)."""

    def __init__(self) -> None:
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return tuple(sorted(POLICIES))

    @choices.setter
    def choices(self, value: object) -> None:  # click.Choice.__init__ assigns; the registry is the source
        pass


def _model_options(f: F) -> F:
    """--model, --source, --policy, --num-classes: what to build and how to share it."""
    options = [
        click.option(
            "--model",
            "-m",
            "name",
            required=True,
            metavar="NAME",
            help="timm name (resnet152, wrn_40_4, ...) or torchvision:NAME; see 'sharetx models'.",
        ),
        click.option("--source", type=click.Choice(SOURCES), default=None, help="Model library [default: timm]."),
        click.option(
            "--policy",
            type=PolicyChoice(),
            default="imagenet",
            show_default=True,
            help="imagenet: every stride-1 spatial conv of a stage shares; cifar: the first block keeps its own; "
            "swrn: soft sharing (needs --templates); and any registered with share_transform.register_policy.",
        ),
        click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classifier outputs."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _exclude_option(f: F) -> F:
    """--exclude, repeatable: layers whose spatial convs keep their own weights."""
    return click.option(
        "--exclude",
        multiple=True,
        metavar="PATTERN",
        help="Module path or glob (layer4.*, layer3.2) whose spatial convs keep their own weights; repeatable. "
        "A pattern that matches no module is an error.",
    )(f)


def _sharing_options(f: F) -> F:
    """--group-size, --scope, --templates, --budget, --exclude: where on the dial between ResNet and ShaResNet."""
    options = [
        click.option(
            "--group-size",
            type=int,
            default=None,
            help="Spatial convs per shared weight, in runs along each stage [default: the whole stage].",
        ),
        click.option(
            "--scope",
            default=None,
            help="last: each block's last spatial conv (the paper); all: every spatial conv of the residual "
            "branch; block: every conv and linear layer of it (1x1, depthwise, SE, MLP), weight and bias "
            "[default: the policy's].",
        ),
        click.option(
            "--templates",
            type=int,
            default=None,
            help="Soft sharing: a bank of K templates per group, mixed by per-conv coefficients [default: hard].",
        ),
        click.option(
            "--budget",
            type=float,
            default=None,
            help="At most this fraction of the original parameters: the least sharing that fits.",
        ),
        _exclude_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _check_sharing(name: str, policy: str, **options: Any) -> SharingOptions:
    """The sharing options, checked before the (slow) build; raises ShareOptionError."""
    sharing = SharingOptions(**options)
    sharing.check(name, POLICIES[policy])
    return sharing


def _check_init(name: str, init: str | None, templates: int | None, checkpoint: Path | None, allocate: str) -> str:
    """The init to use (the default depends on --checkpoint and --templates), refusing what cannot work before
    the (slow) build; raises ShareOptionError."""
    if allocate == "weights" and checkpoint is None:
        raise ShareOptionError(
            f"{name}: --allocate weights chooses the runs from trained weights, and freshly initialised ones say "
            "nothing about where to share; give --checkpoint FILE"
        )
    if init == "svd" and templates is None:
        raise ShareOptionError(
            f"{name}: --init svd warm-starts soft groups; give --templates K (or --init mean / mean-scaled)"
        )
    if init in ("mean", "mean-scaled") and templates is not None:
        raise ShareOptionError(f"{name}: --init {init} makes one hard-shared weight; with --templates use --init svd")
    if init is not None:
        return init
    if checkpoint is None:
        return "first"
    return "svd" if templates is not None else WARM_START


def _build(name: str, source: str | None, num_classes: int | None) -> nn.Module:
    return build_model(name, source=source, num_classes=num_classes)


def _check_output(out: Path, force: bool) -> None:
    """An output may be new, or a regular file with --force; never a symlink (even dangling), FIFO or device."""
    check_writable(out, force=force)
    if not out.parent.is_dir():
        raise MissingFileError(f"{out}: the directory {out.parent} does not exist")


def _warn_nothing_shared(name: str, share_plan: SharePlan) -> None:
    """Say on stderr, plainly, when the plan shares nothing (the command still succeeds: an unshared model is a
    valid result, e.g. of --group-size 1), and why."""
    if share_plan.groups:
        return
    convs = share_plan.spatial_convs
    if share_plan.stages and all(len(s.blocks) == 1 for s in share_plan.stages):
        why = "every stage has a single block, so no two spatial convs are in one stage"
    else:
        counts: dict[str, int] = {}
        for c in convs:
            counts[c.kept_because or "?"] = counts.get(c.kept_because or "?", 0) + 1
        why = "; ".join(f"{n}: {reason}" for reason, n in counts.items())
    click.echo(
        f"sharetx: warning: nothing is shared: all {len(convs)} spatial convs of {name} keep their own weight "
        f"({why}); the result is the unshared model",
        err=True,
    )


def _warn_non_finite(model: nn.Module, checkpoint: Path) -> None:
    """Say on stderr when the checkpoint holds NaN/inf: the file is written as given (bit-exact), but warned of."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        click.echo(
            f"sharetx: warning: {checkpoint} holds non-finite values (NaN or inf) in {', '.join(bad[:3])}{more}",
            err=True,
        )


@click.group(cls=SharetxGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sharetx")
@click.option(
    "--debug",
    is_flag=True,
    help="On an error, print the full traceback before the one-line message (or set SHARETX_DEBUG=1).",
)
def main(debug: bool) -> None:
    """Turn residual networks into ShaResNets: one shared spatial conv weight per stage.

    Boulch, "ShaResNet: reducing residual network parameter number by sharing weights" (arXiv 1702.08782).

    \b
    Example:
      sharetx convert --model resnet152      # writes resnet152-share.safetensors (148 MB, not 241 MB)
    """


@main.command()
@_model_options
@_sharing_options
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Trained weights to start from: .safetensors, or .pth/.pt/.pth.tar (timm train.py) read with "
    "torch.load(weights_only=True).",
)
@click.option(
    "--init",
    type=click.Choice(INITS),
    default=None,
    help="How a shared weight starts: first (the first member's, to train from scratch), mean, mean-scaled "
    "(compared up to a per-channel scale, folded into the following BatchNorm) or svd (soft groups: the best "
    f"rank-k approximation) [default: first; with --checkpoint, {WARM_START} for hard groups, svd for soft].",
)
@click.option(
    "--allocate",
    type=click.Choice(ALLOCATIONS),
    default="uniform",
    show_default=True,
    help="How --budget is spread over a stage: runs of one length, or the runs whose trained weights lose least "
    "(needs --checkpoint).",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Output file [default: MODEL-share.safetensors].",
)
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists (a regular file only).")
@_json_option
def convert(
    name: str,
    source: str | None,
    policy: str,
    num_classes: int | None,
    group_size: int | None,
    scope: str | None,
    templates: int | None,
    budget: float | None,
    exclude: tuple[str, ...],
    checkpoint: Path | None,
    init: str | None,
    allocate: str,
    out: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Build a model, share it, print the report, and write a ShaResNet file.

    Each shared weight is stored once, so the file shrinks with the parameter count; the file records how
    to rebuild and re-tie the model (share_transform.load reads it back). With --checkpoint (trained weights)
    the shared weights are warm-started from them and the report gives each group's relative reconstruction
    error ||W - W_shared|| / ||W||.

    \b
    Examples:
      sharetx convert --model resnet152
      sharetx convert --model torchvision:resnet50 --checkpoint resnet50.pth --init mean -o r50-share.safetensors
      sharetx convert --model resnet50 --checkpoint model_best.pth.tar --scope block --budget 0.6 --allocate weights
      sharetx convert --model resnet50 --checkpoint resnet50.safetensors --templates 2 --init svd
      sharetx convert --model wrn_40_4 --policy cifar --num-classes 10 --json
      sharetx convert --model resnet101 --budget 0.75
      sharetx convert --model wrn_28_10 --policy swrn --templates 2
      sharetx convert --model resnet50 --scope block
      sharetx convert --model resnet50 --exclude 'layer4.*'
    """
    arch = split_name(name, source)[1]
    out = out if out is not None else Path(f"{arch}-share.safetensors")
    # Refuse before importing torch and building, so an error costs nothing and writes nothing.
    options = _check_sharing(
        name,
        policy,
        group_size=group_size,
        scope=scope,
        templates=templates,
        budget=budget,
        exclude=exclude,
        allocate=allocate,
    )
    init = _check_init(name, init, templates, checkpoint, allocate)
    _check_output(out, force)
    if checkpoint is not None:
        existing_file(checkpoint, "checkpoint")

    from .checkpoints import load_checkpoint
    from .files import save
    from .summary import summarize
    from .tie import apply, get_plan

    model = _build(name, source, num_classes)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        _warn_non_finite(model, checkpoint)
    # A model shared by construction (sharesnet18) keeps its own plan; another one is refused (the re-apply rule).
    share_plan = get_plan(apply(model, policy, options=options, init=init))
    assert share_plan is not None
    _warn_nothing_shared(name, share_plan)
    save(model, out)
    summary = summarize(model, share_plan, file=out)
    _emit(summary.to_dict(), str(summary), as_json)


@main.command("plan")
@_model_options
@_sharing_options
@_json_option
def plan_command(
    name: str,
    source: str | None,
    policy: str,
    num_classes: int | None,
    group_size: int | None,
    scope: str | None,
    templates: int | None,
    budget: float | None,
    exclude: tuple[str, ...],
    as_json: bool,
) -> None:
    """Print what sharing would change (the convert report), writing nothing.

    \b
    Examples:
      sharetx plan --model resnet50
      sharetx plan --model wrn_28_10 --policy cifar --num-classes 100 --json
      sharetx plan --model resnet34 --scope all --group-size 2
      sharetx plan --model convnext_tiny --scope block
      sharetx plan --model resnet50 --exclude 'layer4.*' --exclude layer3.5
    """
    from .planning import plan
    from .summary import summarize
    from .tie import apply, get_plan

    options = _check_sharing(
        name, policy, group_size=group_size, scope=scope, templates=templates, budget=budget, exclude=exclude
    )
    model = _build(name, source, num_classes)
    # Shared by construction (sharesnet18): its own plan, or convert's refusal (apply changes nothing here).
    share_plan = (
        plan(model, policy, options=options)
        if get_plan(model) is None
        else get_plan(apply(model, policy, options=options))
    )
    assert share_plan is not None
    _warn_nothing_shared(name, share_plan)
    summary = summarize(model, share_plan)
    _emit(summary.to_dict(), str(summary), as_json)


@main.command("sweep")
@_model_options
@click.option(
    "--scope",
    "scopes",
    type=click.Choice(SCOPES),
    multiple=True,
    help="Only this scope (repeatable) [default: last, all and block].",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw unique parameters against the setting to this PNG (needs matplotlib: the [train] extra).",
)
@click.option("--force", is_flag=True, help="Overwrite the plot if it exists (a regular file only).")
@_exclude_option
@_json_option
def sweep_command(
    name: str,
    source: str | None,
    policy: str,
    num_classes: int | None,
    scopes: tuple[str, ...],
    plot: Path | None,
    force: bool,
    exclude: tuple[str, ...],
    as_json: bool,
) -> None:
    """The sharing dial of one model: unique parameters for each scope x group size x templates.

    Group sizes 1, 2, 4, ... and the whole stage; templates: hard sharing, then soft with 1, 2 and 4.

    \b
    Examples:
      sharetx sweep --model resnet50
      sharetx sweep --model convnext_tiny --scope block
      sharetx sweep --model wrn_28_10 --policy cifar --json
      sharetx sweep --model resnet101 --plot resnet101-sweep.png
      sharetx sweep --model resnet50 --exclude 'layer4.*'
    """
    from .planning import sweep

    if plot is not None:
        _check_output(plot, force)
        from .figure import require_matplotlib

        require_matplotlib()  # before the build: a missing [train] extra costs nothing
    model = _build(name, source, num_classes)
    plans = sweep(model, policy, scopes=scopes or SCOPES, exclude=exclude)
    rows: list[dict[str, Any]] = [
        {
            "scope": p.scope,
            "group_size": p.group_size,
            "templates": p.templates,
            "unique_params": p.params_after,
            "decrease": round(p.decrease, 6),
            "distinct_conv_weights": p.convs_after,
        }
        for p in plans
    ]
    table = [("scope", "group size", "templates", "unique params", "decrease", "distinct weights")]
    table += [
        (
            r["scope"],
            "stage" if r["group_size"] is None else str(r["group_size"]),
            "-" if r["templates"] is None else str(r["templates"]),
            f"{r['unique_params']:,}",
            f"{100 * r['decrease']:.1f}%",
            str(r["distinct_conv_weights"]),
        )
        for r in rows
    ]
    original = plans[0].params_before
    excluding = f", exclude {' '.join(exclude)}" if exclude else ""
    text = "\n".join(
        [
            f"sharing dial of {name}, policy {policy}{excluding}: {original:,} parameters unshared",
            *format_columns(table, left={0}),
        ]
    )
    if plot is not None:
        _plot_sweep(rows, plot, f"{name}, policy {policy}")
        text += f"\nplot: {plot}"
    _emit(rows, text, as_json)


def _plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One line per (scope, templates): unique parameters (millions) against the group size."""
    from .figure import new_figure
    from .fs import atomic_write

    sizes = sorted({r["group_size"] for r in rows}, key=lambda g: (g is None, g or 0))
    labels = ["stage" if g is None else str(g) for g in sizes]
    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    for scope in dict.fromkeys(r["scope"] for r in rows):
        for k in dict.fromkeys(r["templates"] for r in rows):
            line = {r["group_size"]: r["unique_params"] for r in rows if (r["scope"], r["templates"]) == (scope, k)}
            xs = [i for i, g in enumerate(sizes) if g in line]
            if len(xs) > 1:
                kind = "hard" if k is None else f"{k} templates"
                ax.plot(xs, [line[sizes[i]] / 1e6 for i in xs], "o-", label=f"scope {scope}, {kind}")
    ax.set_xticks(range(len(sizes)), labels)
    ax.set(xlabel="group size", ylabel="unique parameters (millions)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@_json_option
def inspect(file: Path, as_json: bool) -> None:
    """Show what a ShaResNet file holds: architecture, policy, shared groups, parameters, size.

    The model is rebuilt and loaded, so a file that inspects cleanly also loads.

    \b
    Example:
      sharetx inspect resnet152-share.safetensors
    """
    existing_file(file, "file")  # before torch is imported: a typo costs nothing

    from .files import load, read_info
    from .summary import summarize
    from .tie import count_parameters

    info = read_info(file)
    data: dict[str, Any] = {
        "file": str(file),
        "bytes": info.file_bytes,
        "share_transform_version": info.version,
        "build": info.build,
        "policy": info.policy,
        "sharing": info.plan.options.to_dict() if info.plan is not None else None,
        "stored_tensors": len(info.tensors),
        "stored_elements": info.stored_numel,
        "aliases": len(info.aliases),
        "input_size": list(info.input_size) if info.input_size is not None else None,
        "metadata": info.user,
        "parameters": None,
        "summary": None,
    }
    lines = [f"{file}: {info.file_bytes:,} bytes, {len(info.tensors)} tensors, {len(info.aliases)} aliases"]
    if info.build is None:
        lines.append("not a share_transform file: it does not record how to build its model")
    else:
        model = load(file)
        data["parameters"] = count_parameters(model)
        build = info.build
        kwargs = ", ".join(f"{k}={v!r}" for k, v in build.get("kwargs", {}).items())
        lines.append(
            f"model {build['source']}:{build['name']}({kwargs}), written by share_transform {info.version}, "
            f"{data['parameters']:,} unique parameters"
        )
        if info.plan is not None:
            summary = summarize(model, info.plan, file=file)
            if info.input_size is not None:  # what the model was trained at, when save recorded it
                summary = dataclasses.replace(summary, input_size=info.input_size)
            data["summary"] = summary.to_dict()
            lines.append(str(summary))
        else:
            size = f" (input {'x'.join(map(str, info.input_size))})" if info.input_size is not None else ""
            lines.append(f"not shared: no share plan is recorded{size}")
    if info.user:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(info.user.items())))
    _emit(data, "\n".join(lines), as_json)


@main.command()
@_json_option
def table(as_json: bool) -> None:
    """Measure the paper's Table 1 (parameters before and after sharing) beside the printed figures.

    Builds the seven Table 1 networks, ResNet-152 and WRN-28-10 included (a few seconds, about 1 GB).

    \b
    Example:
      sharetx table > table1.md
    """
    from .paper import format_table1, measure_table1

    measured = measure_table1()
    data = [
        {
            "model": m.row.model,
            "dataset": m.row.dataset,
            "arch": m.row.arch,
            "policy": m.row.policy,
            "params_before": m.params_before,
            "params_after": m.params_after,
            "decrease_pct": round(m.decrease_pct, 4),
            "paper_params_original_m": m.row.params_original,
            "paper_params_shared_m": m.row.params_shared,
            "paper_decrease_pct": m.row.decrease_pct,
            "agrees": m.agrees,
            "conv_weights_before": m.conv_weights_before,
            "conv_weights_after": m.conv_weights_after,
            "paper_conv_number": [m.row.convs_original, m.row.convs_shared],
        }
        for m in measured
    ]
    _emit(data, format_table1(measured), as_json)


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--onnx", "onnx_out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="ONNX file to write."
)
@click.option(
    "--input-size",
    type=click.IntRange(min=1),
    nargs=3,
    default=None,
    metavar="C H W",
    help="Input size [default: the one the file records: save(input_size=...), else its plan's].",
)
@click.option("--force", is_flag=True, help="Overwrite the ONNX file if it exists (a regular file only).")
@_json_option
def export(file: Path, onnx_out: Path, input_size: tuple[int, int, int] | None, force: bool, as_json: bool) -> None:
    """Export a ShaResNet file to ONNX, each shared weight one initializer, checked with onnxruntime.

    The file appears only after its Conv weight initializers were counted against the model's distinct
    conv weights and onnxruntime matched PyTorch within 1e-4 on a random batch.

    \b
    Example:
      sharetx export resnet50-share.safetensors --onnx resnet50-share.onnx --input-size 3 224 224
    """
    existing_file(file, "file")
    _check_output(onnx_out, force)

    from .export import export_onnx
    from .files import load, read_info

    info = read_info(file)
    result = export_onnx(load(file), onnx_out, input_size=input_size or info.input_size)
    _emit(result.to_dict(), str(result), as_json)


@main.command("import-swrn")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Output file [default: FILE's name up to its first dot, .safetensors].",
)
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists (a regular file only).")
@_json_option
def import_swrn_command(file: Path, out: Path | None, force: bool, as_json: bool) -> None:
    """Convert a soft-sharing WRN of the reference code (lolemacs/soft-sharing) into a ShaResNet file.

    FILE holds the reference SWRN's state dict (bank_i.templates, each SConv2d's coefficients of shape
    (k,1,1,1,1)): safetensors, or a torch.save file read with torch.load(weights_only=True), optionally under a
    state_dict key and with DataParallel's module. prefix. The result is wrn_<depth>_<width> under policy swrn
    with k templates, and loads with share_transform.load.

    \b
    Example:
      sharetx import-swrn swrn28-10-2.pth -o swrn28-10-2.safetensors
    """
    out = out if out is not None else Path(file.name.split(".")[0] + ".safetensors")
    _check_output(out, force)
    if not file.is_file():
        raise MissingFileError(f"{file}: no such file")
    from .checkpoints import read_checkpoint
    from .files import save
    from .summary import summarize
    from .swrn import import_swrn
    from .tie import get_plan

    model = import_swrn(read_checkpoint(file))
    share_plan = get_plan(model)
    assert share_plan is not None  # import_swrn shares the model
    save(model, out)
    summary = summarize(model, share_plan, file=out)
    _emit(summary.to_dict(), str(summary), as_json)


@main.command()
@click.argument("pattern", required=False)
@click.option("--source", type=click.Choice(SOURCES), default=None, help="Only this library [default: both].")
@_json_option
def models(pattern: str | None, source: str | None, as_json: bool) -> int:
    """List the model names convert and plan accept; PATTERN is a glob or a substring.

    torchvision names carry their prefix, as --model takes them. Any residual network among them can be
    shared (ResNet, Wide-ResNet, ResNeXt and their timm variants); 'sharetx plan' says for one model.

    \b
    Examples:
      sharetx models 'resnet*'     # quoted, or the shell expands the glob first
      sharetx models wrn --json
    """
    names = []
    for src in [source] if source else list(SOURCES):
        prefix = "" if src == "timm" else f"{src}:"
        names += [prefix + n for n in list_model_names(src)]
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        # Match the bare name too, so "resnet*" finds torchvision:resnet50.
        names = [n for n in names if fnmatch.fnmatchcase(n, glob) or fnmatch.fnmatchcase(n.split(":")[-1], glob)]
    if not names:  # like grep: a search that finds nothing fails, so scripts can tell
        if as_json:
            _emit(names, "", as_json)
        return _fail(f"no model name matches {pattern!r}", EXIT_NO_MATCH)
    _emit(names, "\n".join(names), as_json)
    return 0
