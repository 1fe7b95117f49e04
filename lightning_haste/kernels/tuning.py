"""Typed, validated overrides of the kernels' automatic tile choices (for benchmarks and tests).

Every kernel picks its variant (warps, pipeline depth, tile rows...) from the problem shape and the
device; these settings force one instead. Each field belongs to exactly one kernel, ``None`` means
"choose automatically", and a value is checked when the settings object is built, before anything
compiles. The settings in force are part of every plan-cache key, so switching them never reuses a
plan built under other settings.

    from lightning_haste.kernels import tuning

    with tuning.use(tuning.GradInputTuning(rows=64), tuning.ForwardTuning(kernel="mma")):
        layer(x).backward(dz)

Settings apply to the current thread and nest: an inner :func:`use` replaces the kinds it names and
keeps the outer ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Literal, Optional, Union

__all__ = [
    "ForwardTuning",
    "GradInputTuning",
    "GradWeightTuning",
    "TopkTuning",
    "Tuning",
    "current",
    "parse",
    "use",
]


def _check_choice(owner: str, name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


def _check_int(owner: str, name: str, value: Optional[int], low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int or None, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{owner}.{name} must be in [{low}, {high}] or None, got {value}")


def _check_bool(owner: str, name: str, value: Optional[bool]) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be a bool or None, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class ForwardTuning:
    """Forward kernel overrides.

    Attributes:
        kernel: ``"auto"``, ``"mma"`` (the mma.sync kernel, every GPU) or ``"wgmma"`` (the Hopper kernel;
            only on sm_90, elsewhere the mma.sync kernel runs).
        mma_warps: warps per CTA of the mma.sync kernel (1-16).
        mma_stages: depth of its per-warp weight ring (2-8).
        mma_resident: keep the input in shared memory (``True``) or gather it per chunk (``False``).
        wgmma_warpgroups: warpgroups per CTA of the Hopper kernel (1-6).
        wgmma_stages: depth of its per-warpgroup weight ring (2-8).
    """

    kernel: Literal["auto", "mma", "wgmma"] = "auto"
    mma_warps: Optional[int] = None
    mma_stages: Optional[int] = None
    mma_resident: Optional[bool] = None
    wgmma_warpgroups: Optional[int] = None
    wgmma_stages: Optional[int] = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_choice(owner, "kernel", self.kernel, ("auto", "mma", "wgmma"))
        _check_int(owner, "mma_warps", self.mma_warps, 1, 16)
        _check_int(owner, "mma_stages", self.mma_stages, 2, 8)
        _check_bool(owner, "mma_resident", self.mma_resident)
        _check_int(owner, "wgmma_warpgroups", self.wgmma_warpgroups, 1, 6)
        _check_int(owner, "wgmma_stages", self.wgmma_stages, 2, 8)


@dataclasses.dataclass(frozen=True)
class GradInputTuning:
    """Grad-input kernel overrides.

    Attributes:
        rows: batch rows per CTA (32, 64 or 128).
        groups: groups per pipeline step (1, 2 or 4; used where warps own whole batch tiles of 64 or 128
            rows and groups are not padded, else 1; halved while a step does not fit in shared memory).
        row_owned: each warp owns whole batch tiles (``True``) or a feature tile (``False``).
        stages: pipeline depth (2-8).
    """

    rows: Optional[int] = None
    groups: Optional[int] = None
    row_owned: Optional[bool] = None
    stages: Optional[int] = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.rows is not None:
            _check_int(owner, "rows", self.rows, 32, 128)
            _check_choice(owner, "rows", self.rows, (32, 64, 128))
        if self.groups is not None:
            _check_int(owner, "groups", self.groups, 1, 4)
            _check_choice(owner, "groups", self.groups, (1, 2, 4))
        _check_bool(owner, "row_owned", self.row_owned)
        _check_int(owner, "stages", self.stages, 2, 8)


@dataclasses.dataclass(frozen=True)
class GradWeightTuning:
    """Grad-weight kernel overrides.

    Attributes:
        kernel: ``"auto"``, ``"warp"`` (a warp per group, input resident; used only where it applies) or
            ``"tile"`` (a CTA per gradient tile).
        warp_warps: warps per CTA of the warp kernel (1-32).
        warp_stages: depth of its per-warp dZ ring (2-8); with ``warp_warps`` unset the warps default to 8.
        tile_stages: pipeline depth of the tile kernel (2-8).
    """

    kernel: Literal["auto", "warp", "tile"] = "auto"
    warp_warps: Optional[int] = None
    warp_stages: Optional[int] = None
    tile_stages: Optional[int] = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_choice(owner, "kernel", self.kernel, ("auto", "warp", "tile"))
        _check_int(owner, "warp_warps", self.warp_warps, 1, 32)
        _check_int(owner, "warp_stages", self.warp_stages, 2, 8)
        _check_int(owner, "tile_stages", self.tile_stages, 2, 8)


@dataclasses.dataclass(frozen=True)
class TopkTuning:
    """Top-k candidate kernel overrides (its main loop is the forward's, tuned by :class:`ForwardTuning`).

    Attributes:
        min_ctas: CTAs per multiprocessor its registers must leave room for (``__launch_bounds__``' minimum,
            1-8; by default the ones the shared memory allows where the registers would leave fewer and that
            does not spill, else 1).
        chunk_columns: the longest chunk of the head's logits whose first-round work (bound, candidates, bound
            from the lists) one launch of ``gsfi_topk_chunk`` does, one CTA a row; longer chunks take three
            launches, the candidates' spread over many CTAs a row (0: always three; by default
            :data:`lightning_haste.topk.CHUNK_COLUMNS`).
    """

    min_ctas: Optional[int] = None
    chunk_columns: Optional[int] = None

    def __post_init__(self) -> None:
        _check_int(type(self).__name__, "min_ctas", self.min_ctas, 1, 8)
        _check_int(type(self).__name__, "chunk_columns", self.chunk_columns, 0, 2**31 - 1)


KernelTuning = Union[ForwardTuning, GradInputTuning, GradWeightTuning, TopkTuning]


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The settings of all kernels together (the defaults choose everything automatically)."""

    forward: ForwardTuning = ForwardTuning()
    grad_input: GradInputTuning = GradInputTuning()
    grad_weight: GradWeightTuning = GradWeightTuning()
    topk: TopkTuning = TopkTuning()

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, _KINDS[field.name]):
                raise TypeError(f"Tuning.{field.name} must be a {_KINDS[field.name].__name__}, got {value!r}")

    def replace(self, *settings: KernelTuning) -> Tuning:
        """A copy with the given per-kernel settings in place of the current ones."""
        changes: dict[str, KernelTuning] = {}
        for item in settings:
            name = _FIELD_OF.get(type(item))
            if name is None:
                raise TypeError(
                    f"expected ForwardTuning, GradInputTuning, GradWeightTuning, TopkTuning or Tuning, got {item!r}"
                )
            if name in changes:
                raise ValueError(f"two {type(item).__name__} settings given; pass one per kernel")
            changes[name] = item
        return dataclasses.replace(self, **changes)


_KINDS = {"forward": ForwardTuning, "grad_input": GradInputTuning, "grad_weight": GradWeightTuning,
          "topk": TopkTuning}
_FIELD_OF = {kind: name for name, kind in _KINDS.items()}
_DEFAULT = Tuning()
_state = threading.local()


def current() -> Tuning:
    """The settings in force on this thread."""
    return getattr(_state, "tuning", _DEFAULT)


@contextlib.contextmanager
def use(*settings: Union[KernelTuning, Tuning]) -> Iterator[Tuning]:
    """Run the block with these kernel settings (a :class:`Tuning`, or per-kernel settings that replace
    the current ones of their kernel); restores the previous settings on exit, also after an error."""
    previous = current()
    if len(settings) == 1 and isinstance(settings[0], Tuning):
        new = settings[0]
    else:
        if any(isinstance(s, Tuning) for s in settings):
            raise TypeError("pass either one Tuning or per-kernel settings, not both")
        new = previous.replace(*settings)  # type: ignore[arg-type]
    _state.tuning = new
    try:
        yield new
    finally:
        _state.tuning = previous


def _parse_value(text: str, annotation: str) -> object:
    lowered = text.strip().lower()
    if lowered in ("none", "auto") and "Literal" not in annotation:
        return None
    if "bool" in annotation:
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if "int" in annotation:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    return text.strip()


def parse(items: Union[str, list[str], tuple[str, ...]]) -> Tuning:
    """Settings from ``"kernel.field=value"`` items (a list, or one string separated by spaces or commas),
    e.g. ``"forward.kernel=mma grad_input.rows=64"``; unknown kernels or fields raise."""
    if isinstance(items, str):
        items = [part for part in items.replace(",", " ").split() if part]
    fields: dict[str, dict[str, object]] = {name: {} for name in _KINDS}
    for item in items:
        key, sep, value = item.partition("=")
        kind, dot, field = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"tuning item {item!r} is not of the form kernel.field=value")
        if kind not in _KINDS:
            raise ValueError(f"unknown kernel {kind!r} in {item!r}; expected one of {tuple(_KINDS)}")
        known = {f.name: str(f.type) for f in dataclasses.fields(_KINDS[kind])}
        if field not in known:
            raise ValueError(f"unknown field {field!r} of {kind} in {item!r}; expected one of {tuple(known)}")
        fields[kind][field] = _parse_value(value, known[field])
    return Tuning(**{name: _KINDS[name](**values) for name, values in fields.items()})  # type: ignore[arg-type]
