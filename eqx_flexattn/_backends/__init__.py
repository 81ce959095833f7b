"""Executors of the one flex-attention semantics, and the `auto` choice among them."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import ClassVar

import jax
from jaxtyping import Array

from ._base import AbstractBackend, AttentionProblem
from ._config import AbstractConfig, check_options, note_ignored
from .xla import XlaBackend as XlaBackend


logger = logging.getLogger("eqx_flexattn")


class UnavailableBackend(AbstractBackend):
    """Stands in for a backend whose module failed to import (a Pallas submodule
    this jax lacks): it declines every problem, giving the import error as reason,
    the versions it failed with, and what the backend needs (`needs`, from
    `register`)."""

    name: str
    reason: str
    needs: str = ""
    config_class: ClassVar[type[AbstractConfig] | None] = None  # unknown options

    def check(self, problem: AttentionProblem) -> None:
        python = ".".join(map(str, sys.version_info[:2]))
        raise NotImplementedError(
            f"the {self.name!r} backend is unavailable with jax {jax.__version__} on "
            f"Python {python} ({self.reason})"
            + (f"; it needs {self.needs}" if self.needs else "")
        )

    def forward(self, problem: AttentionProblem) -> tuple[Array, Array]:
        self.check(problem)
        raise AssertionError("unreachable")


BACKENDS: dict[str, AbstractBackend] = {}
# Fastest first; `auto` takes the first that accepts the problem.
AUTO_ORDER: tuple[str, ...] = ()
# What each backend needs to run, as registered: said when it can't.
NEEDS: dict[str, str] = {}


def register(
    name: str, module: str, attr: str, *, auto: bool = True, needs: str = ""
) -> None:
    """Registers backend `name`, the class `attr` of `module` (relative to this
    package, or absolute). Backends registered with `auto=True` are tried by `auto`
    in registration order, so register the fastest first. `needs` says, as a phrase
    after "it needs", what the backend runs with (hardware, jax version): it
    completes the reason whenever the backend can't be imported or can't run a call
    it was asked for by name.

    A module that fails to import (ImportError, or an AttributeError from a jax that
    moved a Pallas submodule) registers an `UnavailableBackend` instead: importing
    eqx_flexattn never fails, and `explain_backend` says why the backend is missing.
    """
    global AUTO_ORDER
    try:
        backend = getattr(importlib.import_module(module, __name__), attr)()
    except (ImportError, AttributeError) as e:
        logger.debug("eqx_flexattn: backend %r unavailable: %r", name, e)
        backend = UnavailableBackend(name, f"{type(e).__name__}: {e}", needs)
    if backend.name != name:
        raise AssertionError(f"backend {attr} is named {backend.name!r}, not {name!r}")
    BACKENDS[name] = backend
    NEEDS[name] = needs
    if auto and name not in AUTO_ORDER:
        AUTO_ORDER = (*AUTO_ORDER, name)


# One line per backend, fastest first.
register(
    "mosaic",
    ".mosaic",
    "MosaicBackend",
    needs="an NVIDIA Hopper (sm90) or newer GPU, bfloat16 or float16 inputs, and "
    "jax >= 0.11 with CUDA (`pip install -U 'jax[cuda12]'`; jax 0.11 needs Python "
    ">= 3.12)",
)
register(
    "triton",
    ".triton",
    "TritonBackend",
    needs="an NVIDIA GPU of compute capability 8.0 (Ampere) or newer and jax "
    "with CUDA (`pip install -U 'jax[cuda12]'`)",
)
register("xla", ".xla", "XlaBackend")
register("reference", ".reference", "ReferenceBackend", auto=False)


def select_backend(
    name: str, problem: AttentionProblem
) -> tuple[AbstractBackend, list[str]]:
    """The backend that will run `problem`, and why each faster one declined.

    Checks `kernel_options` against every registered backend first, so a typo or a
    bad value raises the same `ValueError` on every platform.
    """
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"Unknown backend {name!r}; choose 'auto' or one of {sorted(BACKENDS)}."
        )
    check_options(problem.kernel_options)
    if name != "auto":
        backend = BACKENDS[name]
        try:
            backend.check(problem)
        except NotImplementedError as e:
            reason = str(e).rstrip(".")
            raise NotImplementedError(
                f"backend={name!r} can't run this call: {reason}"
                + _needs_note(name, reason)
                + " `fa.explain_backend(...)` says what each backend would do with "
                "these inputs; backend='auto' runs the fastest one that can."
            ) from e
        note_ignored(name, problem.kernel_options)
        return backend, []
    reasons = []
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        try:
            backend.check(problem)
        except NotImplementedError as e:
            reasons.append(f"{candidate}: {e}")
            continue
        logger.debug(
            "flex_attention: backend %r%s",
            candidate,
            "".join(f"; {r}" for r in reasons),
        )
        note_ignored(candidate, problem.kernel_options)
        return backend, reasons
    raise NotImplementedError(
        "No backend can run this flex_attention call: " + "; ".join(reasons)
    )


def _needs_note(name: str, reason: str) -> str:
    needs = NEEDS.get(name)
    if not needs or needs in reason:
        return "."
    return f". The {name!r} backend needs {needs}."


__all__ = [
    "AbstractBackend",
    "AttentionProblem",
    "AUTO_ORDER",
    "BACKENDS",
    "NEEDS",
    "register",
    "select_backend",
    "UnavailableBackend",
]
