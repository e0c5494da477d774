"""The header of a ShaResNet file: its keys, and the one schema every reader checks them against.

A file is input: its header may have been written by someone else. The safetensors library checks the format
itself (a header of at most 100 MB, valid UTF-8 JSON, metadata that maps strings to strings, known dtypes,
shapes whose bytes tile the data after the header exactly, with overflow checks). What it cannot know is what
share_transform's own entries mean. :func:`parse_header` checks them here, in plain code, before anything
uses them:

* **types, ranges and depth**: every number of the build record, the share plan, the aliases and the input
  size has its type (an integer is never a string, a float or a boolean) and its range; JSON nested deeper
  than the interpreter parses is refused, and the schema's exact types refuse any nesting it does not
  describe (the deepest value used is four levels down: ``plan.stages[i].spatial_convs[j].signature``);
* **against the tensors**: each share group's shared weight (or template bank) is stored once, under one of
  its members' names, with the shape the plan says (a plan claiming 7 templates over a bank of 2 is
  refused), each member's coefficients too, and every other member's name is an alias of it; no alias names
  another group's weight;
* **bounds**: a group holds at most as many templates as the plan's largest group has members
  (:func:`share_transform.planning.check_templates`), an input size at most
  :data:`share_transform.modelinfo.MAX_INPUT_PIXELS` pixels, no tensor dimension past :data:`MAX_DIM`.

So a header-only file of a few hundred bytes claiming 10^9 templates is refused before any allocation.
``load`` then checks what needs the model (names, shapes, dtype kinds, counts and that each alias is a tie the
rebuilt model has), still on the meta device.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from .build import SOURCES, check_model_kwargs
from .errors import FileFormatError
from .modelinfo import check_input_size
from .planning import SharePlan, check_templates
from .policies import SCOPES

__all__: list[str] = []

#: Version of the metadata layout below; bumped when a reader would misread a newer file.
FILE_VERSION = "1"
KEY_PREFIX = "sharetx."
KEY_FILE_VERSION = KEY_PREFIX + "file_version"
KEY_VERSION = KEY_PREFIX + "version"
KEY_BUILD = KEY_PREFIX + "build"
KEY_POLICY = KEY_PREFIX + "policy"
KEY_PLAN = KEY_PREFIX + "plan"
KEY_ALIASES = KEY_PREFIX + "aliases"
KEY_INPUT_SIZE = KEY_PREFIX + "input_size"

#: Largest tensor dimension, channel count, kernel size or resolution a header may give (torch indexes with int64;
#: a stride computed from larger dimensions overflows even for a tensor without elements).
MAX_DIM = 2**31 - 1
#: Largest parameter or conv count a plan may record (about 9 * 10^15: past any model that fits a machine).
MAX_COUNT = 2**53
#: Where a soft member's parametrization keeps the bank and its coefficients (``torch.nn.utils.parametrize``).
BANK_SUFFIX = ".parametrizations.weight.0.bank.templates"
COEFFICIENTS_SUFFIX = ".parametrizations.weight.original"
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# A build record names a registered architecture, never a hub or local-directory reference (hf-hub:, local-dir:).
_ARCH_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class Header:
    """share_transform's entries of a file's header, checked."""

    version: str | None  # share_transform version that wrote it; None for a foreign safetensors file
    build: dict[str, Any] | None
    policy: str | None
    plan: SharePlan | None
    aliases: dict[str, str]
    input_size: tuple[int, int, int] | None  # recorded by save(input_size=...), else None
    user: dict[str, str] = field(default_factory=dict)


class SchemaError(Exception):
    """A header value that breaks the schema; :func:`parse_header` words it as a FileFormatError."""


# ---------------------------------------------------------------------------------------------- plain validators


def _fail(where: str, expected: str, value: object) -> NoReturn:
    text = repr(value)
    raise SchemaError(f"{where} must be {expected}, got {text if len(text) <= 60 else text[:57] + '...'}")


def _int(value: object, where: str, lo: int = 0, hi: int = MAX_DIM) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        _fail(where, f"an integer in [{lo}, {hi}]", value)
    return value


def _optional_int(value: object, where: str, lo: int = 0, hi: int = MAX_DIM) -> int | None:
    return None if value is None else _int(value, where, lo, hi)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        _fail(where, "a string", value)
    return value


def _optional_str(value: object, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        _fail(where, "true or false", value)
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(where, "a list", value)
    return value


def _pair(value: object, where: str, lo: int) -> list[int]:
    items = _list(value, where)
    if len(items) != 2:
        _fail(where, "two integers", value)
    return [_int(v, f"{where}[{i}]", lo) for i, v in enumerate(items)]


def _sizes(value: object, where: str) -> list[int]:
    """An input size's three integers (:func:`check_input_size` bounds them)."""
    items = _list(value, where)
    if len(items) != 3:
        _fail(where, "three integers C, H, W", value)
    return [_int(v, f"{where}[{i}]", 1, 2**62) for i, v in enumerate(items)]


def _object(
    value: object, where: str, required: tuple[str, ...], optional: tuple[str, ...] = (), *, closed: bool
) -> dict[str, Any]:
    """``value`` as a dict holding ``required`` (and maybe ``optional``); ``closed``: no other key either."""
    if not isinstance(value, dict):
        _fail(where, "an object", value)
    missing = [k for k in required if k not in value]
    if missing:
        raise SchemaError(f"{where} lacks {', '.join(missing)}")
    if closed:
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown:
            raise SchemaError(f"{where} has unknown entries {', '.join(map(repr, unknown[:3]))}")
    return value


def _json(text: str, key: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise SchemaError(f"metadata {key!r} is nested too deeply to be a share_transform header") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
        raise SchemaError(f"metadata {key!r} is not valid JSON ({e})") from None


# ------------------------------------------------------------------------------------------------------- the plan


def _signature(value: object, where: str) -> tuple[int, ...]:
    """Check a conv's or (tagged ``"kind": "linear"``, scope "block") a linear layer's signature; its weight shape."""
    if isinstance(value, dict) and "kind" in value:
        if value["kind"] != "linear":
            _fail(f"{where}.kind", "'linear' (a conv's signature has no kind)", value["kind"])
        sig = _object(value, where, ("kind", "layer_class", "in_features", "out_features", "bias"), closed=True)
        _str(sig["layer_class"], f"{where}.layer_class")
        _bool(sig["bias"], f"{where}.bias")
        return (
            _int(sig["out_features"], f"{where}.out_features", 1),
            _int(sig["in_features"], f"{where}.in_features", 1),
        )
    keys = ("conv_class", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
            "bias", "padding_mode")  # fmt: skip
    sig = _object(value, where, keys, closed=True)
    _str(sig["conv_class"], f"{where}.conv_class")
    cin = _int(sig["in_channels"], f"{where}.in_channels", 1)
    cout = _int(sig["out_channels"], f"{where}.out_channels", 1)
    _pair(sig["kernel_size"], f"{where}.kernel_size", 1)
    _pair(sig["stride"], f"{where}.stride", 1)
    _pair(sig["dilation"], f"{where}.dilation", 1)
    if isinstance(sig["padding"], str):
        if sig["padding"] not in ("same", "valid"):
            _fail(f"{where}.padding", "'same', 'valid' or two integers", sig["padding"])
    else:
        _pair(sig["padding"], f"{where}.padding", 0)
    groups = _int(sig["groups"], f"{where}.groups", 1)
    if cin % groups or cout % groups:
        raise SchemaError(f"{where}.groups ({groups}) must divide in_channels ({cin}) and out_channels ({cout})")
    _bool(sig["bias"], f"{where}.bias")
    if sig["padding_mode"] not in PADDING_MODES:
        _fail(f"{where}.padding_mode", f"one of {', '.join(PADDING_MODES)}", sig["padding_mode"])
    return (cout, cin // groups, *sig["kernel_size"])


def _options(plan: dict[str, Any]) -> None:
    _optional_int(plan.get("group_size"), "plan.group_size", 1)
    _optional_int(plan.get("templates"), "plan.templates", 1)
    scope = plan.get("scope")
    if scope is not None and scope not in SCOPES:
        _fail("plan.scope", f"one of {', '.join(SCOPES)}", scope)
    budget = plan.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1):
        _fail("plan.budget", "a fraction in (0, 1]", budget)
    exclude = plan.get("exclude")
    if exclude is not None and not all(isinstance(p, str) and p for p in _list(exclude, "plan.exclude")):
        _fail("plan.exclude", "a list of module paths or glob patterns", exclude)


def check_plan(value: object) -> SharePlan:
    """A share plan from its JSON (``SharePlan.to_dict``), after checking every field's type and range and the
    fields against each other.

    Unknown keys at the plan's top level are ignored (``SharePlan.from_dict`` does not read them; a key it
    reads must be checked here); inside a stage, spatial conv, group or signature they are refused.

    Raises:
        SchemaError naming the first field that breaks the schema.
    """
    top = ("model_name", "policy", "input_size", "stages", "groups", "params_before", "params_after",
           "convs_before", "convs_after")  # fmt: skip
    plan = _object(value, "plan", top, closed=False)
    _str(plan["model_name"], "plan.model_name")
    _str(plan["policy"], "plan.policy")
    _options(plan)
    for key in top[5:]:
        _int(plan[key], f"plan.{key}", 0, MAX_COUNT)
    stages = _list(plan["stages"], "plan.stages")
    groups = _list(plan["groups"], "plan.groups")
    conv_keys = ("path", "block", "stage", "position", "resolution", "signature", "group", "kept_because")
    for i, s in enumerate(stages):
        where = f"plan.stages[{i}]"
        stage = _object(s, where, ("index", "resolution", "blocks", "spatial_convs"), closed=True)
        if _int(stage["index"], f"{where}.index", 1) != i + 1:
            raise SchemaError(f"{where}.index must be {i + 1} (stages are numbered in order), got {stage['index']}")
        _pair(stage["resolution"], f"{where}.resolution", 1)
        for j, b in enumerate(_list(stage["blocks"], f"{where}.blocks")):
            _str(b, f"{where}.blocks[{j}]")
        for j, c in enumerate(_list(stage["spatial_convs"], f"{where}.spatial_convs")):
            cwhere = f"{where}.spatial_convs[{j}]"
            conv = _object(c, cwhere, conv_keys, closed=True)
            _str(conv["path"], f"{cwhere}.path")
            _str(conv["block"], f"{cwhere}.block")
            if _int(conv["stage"], f"{cwhere}.stage", 1) != i + 1:
                raise SchemaError(f"{cwhere}.stage must be {i + 1}, got {conv['stage']}")
            _int(conv["position"], f"{cwhere}.position")
            _pair(conv["resolution"], f"{cwhere}.resolution", 1)
            _signature(conv["signature"], f"{cwhere}.signature")
            index = _optional_int(conv["group"], f"{cwhere}.group", 0, max(len(groups) - 1, 0))
            if index is not None and not groups:
                _fail(f"{cwhere}.group", "null (the plan has no groups)", index)
            if (index is None) == (conv["kept_because"] is None):
                raise SchemaError(f"{cwhere} must give either its group or why it keeps its own weight")
            _optional_str(conv["kept_because"], f"{cwhere}.kept_because")
    members_seen: set[str] = set()
    for i, g in enumerate(groups):
        where = f"plan.groups[{i}]"
        group = _object(
            g,
            where,
            ("stage", "resolution", "signature", "members", "numel"),
            ("templates", "shares_bias"),
            closed=True,
        )
        _int(group["stage"], f"{where}.stage", 1, max(len(stages), 1))
        _pair(group["resolution"], f"{where}.resolution", 1)
        shape = _signature(group["signature"], f"{where}.signature")
        members = [_str(m, f"{where}.members[{j}]") for j, m in enumerate(_list(group["members"], f"{where}.members"))]
        if len(members) < 2 or len(set(members)) != len(members) or members_seen & set(members):
            raise SchemaError(f"{where}.members must be two or more convs of no other group, got {members[:4]}")
        members_seen |= set(members)
        if _int(group["numel"], f"{where}.numel", 1, MAX_COUNT) != math.prod(shape):
            raise SchemaError(f"{where}.numel must be {math.prod(shape)} (its weight is {shape}), got {group['numel']}")
        templates = _optional_int(group.get("templates"), f"{where}.templates", 1)
        if templates != plan.get("templates"):
            raise SchemaError(f"{where}.templates ({templates}) differs from the plan's ({plan.get('templates')})")
        # Only hard sharing at scope "block" ties a bias, and only a layer that has one.
        if "shares_bias" in group and _bool(group["shares_bias"], f"{where}.shares_bias") != (
            plan.get("scope") == "block" and templates is None and group["signature"]["bias"]
        ):
            raise SchemaError(f"{where}.shares_bias must be true exactly for a hard group at scope block with a bias")
    for i, s in enumerate(stages):
        for j, c in enumerate(s["spatial_convs"]):
            if c["group"] is not None and c["path"] not in groups[c["group"]]["members"]:
                raise SchemaError(f"plan.stages[{i}].spatial_convs[{j}] is not a member of the group it names")
    try:
        size = check_input_size(_sizes(plan["input_size"], "plan.input_size"), "plan")
        result = SharePlan.from_dict({**plan, "input_size": list(size)})
        check_templates(result)
    except (FileFormatError, ValueError) as e:  # InputSizeError, ShareOptionError: both ValueErrors
        raise SchemaError(str(e)) from None
    return result


def check_plan_tensors(
    plan: SharePlan, tensors: Mapping[str, tuple[str, tuple[int, ...]]], aliases: Mapping[str, str]
) -> None:
    """Raise SchemaError unless every share group's tensors are in the file as the plan says (see the module)."""
    shared_names: dict[str, set[str]] = {}
    for i, g in enumerate(plan.groups):
        where = f"group {i} of the plan (stage {g.stage}, which it claims holds {g.describe()})"
        shape = g.signature.weight_shape
        suffix, want = (".weight", shape) if g.templates is None else (BANK_SUFFIX, (g.templates, *shape))
        names = [m + suffix for m in g.members]
        stored = [n for n in names if n in tensors]
        if len(stored) != 1:
            raise SchemaError(
                f"{where} must be stored once, under one of its members' names; the file has it {len(stored)} times"
            )
        got = tuple(tensors[stored[0]][1])
        if got != want:
            raise SchemaError(f"{where}: the file stores {stored[0]} as {'x'.join(map(str, got)) or 'a scalar'}")
        for name in names:
            if name != stored[0] and aliases.get(name) != stored[0]:
                raise SchemaError(f"{where}: {name} must be an alias of {stored[0]}, got {aliases.get(name)!r}")
        shared_names[stored[0]] = set(names)
        if g.shares_bias:  # the bias is one tensor too, stored the same way
            biases = [m + ".bias" for m in g.members]
            kept = [n for n in biases if n in tensors]
            if len(kept) != 1 or tuple(tensors[kept[0]][1]) != (g.signature.bias_numel,):
                raise SchemaError(f"{where}: its shared bias must be stored once, of {g.signature.bias_numel} elements")
            for name in biases:
                if name != kept[0] and aliases.get(name) != kept[0]:
                    raise SchemaError(f"{where}: {name} must be an alias of {kept[0]}, got {aliases.get(name)!r}")
            shared_names[kept[0]] = set(biases)
        if g.templates is not None:
            for m in g.members:
                coefficients = tensors.get(m + COEFFICIENTS_SUFFIX)
                if coefficients is None or tuple(coefficients[1]) != (g.templates,):
                    raise SchemaError(f"{where}: {m} must store its {g.templates} coefficients")
    for alias, target in aliases.items():
        if target in shared_names and alias not in shared_names[target]:
            raise SchemaError(f"alias {alias} names {target}, the shared weight of a group it is not a member of")


# ------------------------------------------------------------------------------------------------ the other keys


def check_build(value: object) -> dict[str, Any]:
    """A build record that names a registered architecture and passes only allowed constructor arguments."""
    if not isinstance(value, dict) or set(value) - {"source", "name", "kwargs"}:
        raise SchemaError(f"the recorded build must be an object with source, name and kwargs, got {value!r:.80}")
    source, name, kwargs = value.get("source"), value.get("name"), value.get("kwargs", {})
    if source not in SOURCES:
        raise SchemaError(f"the recorded build names source {source!r:.40}; expected one of {', '.join(SOURCES)}")
    if not isinstance(name, str) or not _ARCH_NAME.fullmatch(name):
        raise SchemaError(f"the recorded build names model {name!r:.60}, which is not an architecture name")
    try:
        check_model_kwargs(kwargs, where="the recorded build", error=FileFormatError)
    except FileFormatError as e:
        raise SchemaError(str(e)) from None
    return {"source": source, "name": name, "kwargs": kwargs}


def _aliases(value: object, tensors: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise SchemaError(f"metadata {KEY_ALIASES!r} must map names to stored tensors, got {value!r:.80}")
    for alias, stored in value.items():
        if stored not in tensors or alias in tensors:
            raise SchemaError(
                f"metadata {KEY_ALIASES!r} must map names to stored tensors: {alias!r:.80} -> {stored!r:.80}"
            )
    return value


def _tensor_shapes(tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    for name, (_, shape) in tensors.items():
        # With no 0 dimension the file's bytes bound the shape (the library checks them); with one, nothing does,
        # and a large dimension overflows torch's strides.
        if 0 in shape and (max(shape) > MAX_DIM or math.prod(max(d, 1) for d in shape) > 2**62):
            raise SchemaError(f"tensor {name!r:.80} has shape {list(shape)}, past what torch can index")


def parse_header(metadata: Mapping[str, str] | None, tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> Header:
    """share_transform's entries of a safetensors header (``metadata`` as ``safe_open(...).metadata()`` returns it,
    ``tensors`` as ``{name: (dtype, shape)}``), checked by the schema and against the tensors.

    Raises:
        SchemaError naming the entry that breaks the schema.
    """
    meta = dict(metadata or {})
    _tensor_shapes(tensors)
    written = meta.get(KEY_FILE_VERSION)
    if written is not None and written != FILE_VERSION:
        raise SchemaError(
            f"the file's layout is version {written!r:.20} and this share_transform reads {FILE_VERSION}; upgrade"
        )
    aliases = _aliases(_json(meta[KEY_ALIASES], KEY_ALIASES), tensors) if KEY_ALIASES in meta else {}
    plan = None
    if KEY_PLAN in meta:
        try:
            plan = check_plan(_json(meta[KEY_PLAN], KEY_PLAN))
        except SchemaError as e:
            raise SchemaError(f"the recorded share plan is malformed ({e})") from None
        try:
            check_plan_tensors(plan, tensors, aliases)
        except SchemaError as e:
            raise SchemaError(f"the recorded share plan does not match the stored tensors: {e}") from None
    policy = meta.get(KEY_POLICY)
    if plan is not None and policy != plan.policy:
        raise SchemaError(f"metadata {KEY_POLICY!r} ({policy!r:.40}) differs from the plan's ({plan.policy!r})")
    input_size = None
    if KEY_INPUT_SIZE in meta:
        size = _json(meta[KEY_INPUT_SIZE], KEY_INPUT_SIZE)
        try:
            input_size = check_input_size(_sizes(size, "the recorded input size"), "the recorded input size")
        except ValueError as e:
            raise SchemaError(str(e)) from None
    return Header(
        version=meta.get(KEY_VERSION),
        build=check_build(_json(meta[KEY_BUILD], KEY_BUILD)) if KEY_BUILD in meta else None,
        policy=policy,
        plan=plan,
        aliases=aliases,
        input_size=input_size,
        user={k: v for k, v in meta.items() if k != "format" and not k.startswith(KEY_PREFIX)},
    )
