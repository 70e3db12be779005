"""The user's options, checked once where they are given.

Every option of ``fxpar.compile`` and ``fxpar.parallelize`` is validated here, before anything
is captured or planned, so that a misspelled name or an impossible value fails at the user's call
with a message that says what is accepted, not deep inside a pass. ``PlanOptions`` is what the
passes are planned with; ``timeout`` and ``default_timeout`` read the time every collective waits.
"""

from __future__ import annotations

import datetime
import difflib
import math
import os
from dataclasses import dataclass, field, fields

from .errors import OptionError

TIMEOUT_ENV = "FXPAR_TIMEOUT"
DEFAULT_SECONDS = 300.0

SCHEDULES = ("1f1b", "gpipe", "interleaved", "zbh1", "zbv")
RNG_MODES = ("megatron", "exact")
STYLES = ("colwise", "rowwise", "replicate", "vocab")
CHECK_INPUTS = ("first", "always", "never")
ZERO_STAGES = (0, 1, 2, 3)
RECOMPUTE = ("none", "selective", "full", "auto")
CONTEXT_PARALLEL = ("auto", "ring", "ulysses")
OFFLOAD = (None, "optimizer")
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}  # name -> the torch dtype layers compute in


def compute_dtype(precision: str):
    """The dtype layers compute in under ``precision`` (None: the model's own)."""
    import torch

    name = PRECISIONS[precision]
    return None if name is None else getattr(torch, name)


def default_timeout() -> datetime.timedelta:
    """How long a collective waits for its peers: ``$FXPAR_TIMEOUT`` seconds, 300 when unset.

    Read when a program binds to processes, never at import, so that a bad value is an error of
    the call that needs it (naming the variable) and ``import fxpar`` always works.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return datetime.timedelta(seconds=DEFAULT_SECONDS)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise OptionError(
            f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds: set it to how long a collective may "
            f"wait for the other ranks (e.g. {TIMEOUT_ENV}=300), or unset it for the default of {DEFAULT_SECONDS:.0f}s"
        )
    return datetime.timedelta(seconds=seconds)


def timeout(value, fallback: bool = False) -> datetime.timedelta:
    """``value`` (a ``datetime.timedelta``, a number of seconds or None for ``default_timeout``)
    as a positive ``timedelta``. ``fallback``: a bad ``$FXPAR_TIMEOUT`` gives the default
    instead of an error (for waiting on the ranks that report it)."""
    if value is None:
        try:
            return default_timeout()
        except OptionError:
            if fallback:
                return datetime.timedelta(seconds=DEFAULT_SECONDS)
            raise
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise OptionError(f"timeout={value!r}: give a datetime.timedelta or a number of seconds")
    if not math.isfinite(seconds) or seconds <= 0:
        raise OptionError(f"timeout={value!r}: a collective needs a positive, finite time to wait")
    return datetime.timedelta(seconds=seconds)


def unknown_option(name: str, known, where: str) -> OptionError:
    """The error for an option ``where`` does not take, naming the closest ones it does."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return OptionError(f"{where} got an unknown option {name!r}: {hint}its options are {', '.join(sorted(known))}")


@dataclass(frozen=True)
class PlanOptions:
    """How to plan: every option of the pass pipeline, validated when built.

    ``schedule`` is one of ``SCHEDULES`` (any case: ``"1F1B"`` is ``"1f1b"``), ``microbatches``
    a positive int, ``virtual`` the stages per rank of an interleaved schedule (``zbv`` runs two,
    in a V), ``split_points``
    module names to cut pipeline stages before, ``memory_limit`` bytes per device,
    ``optimizer``/``optimizer_dtype`` the states the memory estimate counts, ``sizes`` values of
    symbolic sizes to plan for, ``overrides`` glob patterns over module or parameter names mapped
    to one of ``STYLES``, ``rng`` one of ``RNG_MODES``, ``zero`` the ZeRO stage over the data-parallel
    ranks (one of ``ZERO_STAGES``; ``fxpar/ops/params.py``), ``precision`` what layers compute in
    (``"bf16"``: bfloat16 weights and activations from fp32 master weights; ``"fp16"`` the same in
    float16, with dynamic loss scaling in ``train_step``; ``PRECISIONS``) and
    ``reduce_dtype`` what gradients are averaged over dp in, ``context_parallel`` how attention
    runs over a sequence split over cp (one of ``CONTEXT_PARALLEL``;
    ``passes/context_parallel.py``), ``overlap`` whether communication runs beside computation:
    data-parallel gradient all-reduces (``fxpar/runtime/overlap.py``) and zero's reduce-scatters
    (``fxpar/ops/params.py``) begun during backward, sequence parallelism's collective matmuls
    (``passes/collective_matmuls.py``), collectives begun early and waited for late
    (``passes/overlap_collectives.py``), ``recompute`` which activations backward
    recomputes (one of ``RECOMPUTE``; ``passes/plan_recompute.py``), ``offload="optimizer"`` keeps
    the master weights, their gradients and the optimizer state on the host, where the optimizer
    steps them (ZeRO-Offload; ``fxpar/ops/params.py``). ``device_type``, ``param_stages`` and
    ``fixed_weights`` are set by fxpar itself (where programs run; what a recapture must keep).

    >>> PlanOptions(schedule="1F1B", microbatches=4).schedule
    '1f1b'
    """

    schedule: str = "1f1b"
    microbatches: int = 1
    virtual: int | None = None
    split_points: tuple = ()
    memory_limit: float | None = None
    optimizer: str = "adamw"
    optimizer_dtype: object = None
    sizes: dict = field(default_factory=dict)
    sequence_parallel: bool = False
    recompute_gathers: bool = False
    overrides: dict = field(default_factory=dict)
    rng: str = "megatron"
    zero: int = 0
    recompute: str = "none"
    offload: str | None = None
    context_parallel: str = "auto"
    overlap: bool = True
    precision: str = "fp32"
    reduce_dtype: str = "fp32"
    device_type: str = "cpu"
    param_stages: dict = field(default_factory=dict)
    fixed_weights: dict = field(default_factory=dict)

    def __post_init__(self):
        from .memory import OPTIMIZER_STATES

        schedule = self.schedule.lower() if isinstance(self.schedule, str) else self.schedule
        if schedule not in SCHEDULES:
            raise OptionError(f"schedule={self.schedule!r} is not one of {SCHEDULES} (names are case-insensitive)")
        object.__setattr__(self, "schedule", schedule)
        _positive_int("microbatches", self.microbatches)
        if self.virtual is not None:
            _positive_int("virtual", self.virtual)
        if schedule == "interleaved":
            virtual = 2 if self.virtual is None else self.virtual
            if virtual < 2:
                raise OptionError(
                    f"the interleaved schedule runs several stages per rank: virtual={virtual} must be 2 or more")
            object.__setattr__(self, "virtual", virtual)
        elif schedule == "zbv":
            if self.virtual not in (None, 2):
                raise OptionError(f"the zbv schedule runs exactly two stages per rank (a V): virtual={self.virtual} "
                                  "must be 2 or left out")
            object.__setattr__(self, "virtual", 2)
        elif self.virtual not in (None, 1):
            raise OptionError(
                f"schedule {schedule!r} runs one stage per rank; virtual={self.virtual} needs schedule='interleaved'")
        else:
            object.__setattr__(self, "virtual", 1)
        points = self.split_points
        if points is None:
            points = ()
        if isinstance(points, str):
            points = (points,)
        if isinstance(points, (set, frozenset)):  # a set's order differs from process to process
            points = sorted(points)
        if not all(isinstance(p, str) for p in points):
            raise OptionError(f"split_points={self.split_points!r}: give module names, e.g. ['transformer.h.2']")
        object.__setattr__(self, "split_points", tuple(points))
        limit = self.memory_limit
        if limit is not None and not (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0):
            raise OptionError(f"memory_limit={self.memory_limit!r}: give a positive number of bytes per device")
        if self.optimizer not in OPTIMIZER_STATES:
            raise OptionError(f"optimizer={self.optimizer!r} is not one of {tuple(OPTIMIZER_STATES)}")
        for name in ("sequence_parallel", "recompute_gathers", "overlap"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name}={getattr(self, name)!r}: give True or False")
        if self.zero not in ZERO_STAGES or isinstance(self.zero, bool):
            raise OptionError(
                f"zero={self.zero!r} is not one of {ZERO_STAGES}: 0 keeps every weight, gradient and optimizer state "
                "whole on every data-parallel rank, 1 splits the optimizer state over them, 2 the gradients too, "
                "3 the weights too (gathered for each layer as it runs)")
        if self.context_parallel not in CONTEXT_PARALLEL:
            raise OptionError(f"context_parallel={self.context_parallel!r} is not one of {CONTEXT_PARALLEL}: 'ulysses' "
                              "switches the sequence split to a head split for attention (heads divisible by cp x tp), "
                              "'ring' passes key/value blocks around the cp ranks, 'auto' takes Ulysses where the "
                              "heads divide and ring otherwise")
        if self.recompute not in RECOMPUTE:
            raise OptionError(f"recompute={self.recompute!r} is not one of {RECOMPUTE}: 'selective' recomputes "
                              "attention cores, 'full' every layer from its input, 'auto' what fits memory_limit "
                              "with the fewest recomputed FLOPs")
        if self.recompute == "auto" and self.memory_limit is None:
            raise OptionError("recompute='auto' recomputes what it takes to fit memory_limit: give memory_limit "
                              "(bytes per device), or choose recompute='selective' or 'full'")
        if self.offload not in OFFLOAD:
            raise OptionError(f"offload={self.offload!r} is not one of {OFFLOAD}: 'optimizer' keeps the master weights, "
                              "their gradients and the optimizer state in host memory and steps them there")
        if self.precision not in PRECISIONS:
            raise OptionError(f"precision={self.precision!r} is not one of {tuple(PRECISIONS)}: 'bf16' computes in "
                              "bfloat16 from fp32 master weights that the optimizer steps, 'fp16' in float16 with "
                              "dynamic loss scaling")
        if self.reduce_dtype not in ("fp32", self.precision):
            raise OptionError(f"reduce_dtype={self.reduce_dtype!r}: gradients are reduced over the data-parallel ranks "
                              f"in 'fp32' (the default) or in the compute precision {self.precision!r}")
        if self.rng not in RNG_MODES:
            raise OptionError(f"rng={self.rng!r} is not one of {RNG_MODES}")
        overrides = dict(self.overrides or {})
        for pattern, style in overrides.items():
            if not isinstance(pattern, str):
                raise OptionError(f"overrides: the key {pattern!r} is not a module or parameter name")
            if style not in STYLES:
                raise OptionError(f"override {pattern!r}: {style!r} is not one of {STYLES}")
        object.__setattr__(self, "overrides", overrides)
        object.__setattr__(self, "sizes", dict(self.sizes or {}))

    @classmethod
    def from_user(cls, where: str, **options) -> "PlanOptions":
        """``PlanOptions`` from keyword options, an unknown name being an error that names the
        closest known ones (``where`` is the user's call, e.g. ``"fxpar.parallelize()"``)."""
        known = {f.name for f in fields(cls)} - INTERNAL
        for name in options:
            if name in RUNTIME_OPTIONS:
                raise OptionError(f"{where} does not take the option {name!r} (fxpar.parallelize does: it runs the "
                                  "programs on processes; fxpar.compile only plans them)")
            if name in FRONT_END_OPTIONS:
                raise OptionError(f"{where} does not take the option {name!r}: pass it to fxpar.compile or "
                                  "fxpar.parallelize")
            if name not in known and name not in INTERNAL:
                raise unknown_option(name, known | set(FRONT_END_OPTIONS), where)
        return cls(**options)

    def replace(self, **changes) -> "PlanOptions":
        """A copy with ``changes`` (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return PlanOptions(**values)

    def summary(self) -> dict:
        """The options as plain values, for comparing ranks and for printing."""
        return {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.name not in INTERNAL}


INTERNAL = frozenset({"device_type", "param_stages", "fixed_weights"})
# taken by the front ends themselves, not by the pass pipeline; the runtime's by parallelize alone
RUNTIME_OPTIONS = ("device", "timeout", "compile", "check_inputs")
FRONT_END_OPTIONS = ("dynamic_shapes", "seed", "init_fn", "loss_fn", "example_target") + RUNTIME_OPTIONS


def check_inputs_mode(value) -> str:
    """Validate ``check_inputs`` of ``fxpar.parallelize``."""
    if value not in CHECK_INPUTS:
        raise OptionError(
            f"check_inputs={value!r} is not one of {CHECK_INPUTS}: 'first' compares the ranks' inputs at the first "
            "call of every input signature, 'always' at every call, 'never' not at all"
        )
    return value


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OptionError(f"{name}={value!r}: give a positive int")


def plain(value):
    """``value`` as JSON-able data that is the same in every process for equal values: dict
    keys and sets sorted, functions by their qualified names, other objects by their ``repr``
    unless it is ``object``'s (which shows an address), then by their type."""
    import functools

    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, functools.partial):
        return {"partial": plain(value.func), "args": plain(value.args), "keywords": plain(value.keywords)}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if type(value).__repr__ is object.__repr__:
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    return repr(value)
