"""A warning for the retrace that PyTorch habits cause: a fresh closure per call.

A plain-function score mod or mask mod is a static argument of `jax.jit` (and
`eqx.filter_jit`): its identity is part of the cache key. Written the PyTorch way, a
closure built anew before every call (`score_mod=lambda s, b, h, q, kv: s +
bias[h]`) is a new key each time, so every call traces and compiles again, silently
(most of a second for a small problem on a CPU). An `eqx.Module` holding the arrays,
or a closure built inside the jitted function, compiles once.

`note_traced_mods` watches for that: the same call site tracing `flex_attention` again
and again, each time with a new function object of the same code, and the same
input shapes. It warns once per process, at the third such trace.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import warnings
import weakref
from typing import Any

import jax


RETRACES_TO_WARN = 3  # traces, each with a new function object, before the warning

_warned = False


@dataclasses.dataclass
class _Site:
    last: weakref.ref  # the function object of the latest trace
    trace: Any  # that trace (JAX's opaque, weakly referencing trace state)
    traces: int = 1


_SITES: dict[tuple, _Site] = {}


def _trace_state() -> Any:
    try:
        from jax.extend.core import get_opaque_trace_state
    except ImportError:  # pragma: no cover - other JAX versions: no warning
        return None
    return get_opaque_trace_state(convention="eqx_flexattn")


def _holds_tracer(fn: types.FunctionType) -> bool:
    """Whether `fn` closes over traced values: then it was built inside the trace,
    the right way, and is new with every trace by necessity."""
    for cell in fn.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        leaves = jax.tree_util.tree_leaves(contents)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return True
    return False


def _user_frame(frame: types.FrameType | None) -> tuple[types.FrameType | None, int]:
    """The first frame from `frame` (the caller of the function that warns) outward
    that is outside eqx_flexattn, JAX, Equinox and type checking, and the
    `stacklevel` that points that function's warning at it."""
    from ._attention import _internal_dirs

    internal = _internal_dirs()
    stacklevel = 2
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, stacklevel = frame.f_back, stacklevel + 1
    return frame, stacklevel


def note_traced_mods(mods: dict[str, Any], shapes: tuple) -> None:
    """Called by `flex_attention` with its plain-function mods (`{"score_mod": fn}`)
    and its inputs' shapes and dtypes; warns once per process when one call site
    keeps being traced for new function objects of the same code."""
    global _warned
    if _warned or not isinstance(jax.numpy.zeros(()), jax.core.Tracer):
        return  # warned already, or eager (the eager warning covers that)
    functions = {
        what: fn
        for what, fn in mods.items()
        if isinstance(fn, types.FunctionType) and not _holds_tracer(fn)
    }
    if not functions:
        return
    trace = _trace_state()
    if trace is None:
        return
    frame, stacklevel = _user_frame(sys._getframe(1))
    if frame is None:
        return
    for what, fn in functions.items():
        key = (what, fn.__code__, frame.f_code, frame.f_lineno, shapes)
        site = _SITES.get(key)
        if site is None:
            _SITES[key] = _Site(weakref.ref(fn), trace)
            continue
        if site.last() is fn or site.trace == trace:
            continue  # the same function (a retrace for another reason), or
            # several calls from one trace (the layers of a model)
        site.last, site.trace, site.traces = weakref.ref(fn), trace, site.traces + 1
        if site.traces < RETRACES_TO_WARN:
            continue
        _warned = True
        code = fn.__code__
        warnings.warn(
            f"flex_attention was traced {site.traces} times from this line, each "
            f"time for a new `{what}` function `{fn.__qualname__}` (defined at "
            f"{code.co_filename}:{code.co_firstlineno}) with the same inputs' "
            "shapes: a plain function is a static argument of `jit`, so a new "
            "closure per call retraces and recompiles every call. Make it an "
            "`eqx.Module` with its arrays as fields (data: new values never "
            "recompile; e.g. `fa.score_mods.Alibi(slopes)`, "
            "`fa.score_mods.HeadBias(bias)`), or build the closure inside the "
            "function you jit, closing over that function's traced arguments. (This "
            "warning is shown once per process.)",
            UserWarning,
            stacklevel=stacklevel,
        )
        return
