"""Executors of the one flex-attention semantics, and the `auto` choice among them."""

from __future__ import annotations

import importlib
import logging
from typing import ClassVar

from jaxtyping import Array

from ._base import AbstractBackend, AttentionProblem
from ._config import AbstractConfig, check_options, note_ignored
from .xla import XlaBackend as XlaBackend


logger = logging.getLogger("eqx_flexattn")


class UnavailableBackend(AbstractBackend):
    """Stands in for a backend whose module failed to import (a Pallas submodule
    this jax lacks): it declines every problem, giving the import error as reason."""

    name: str
    reason: str
    config_class: ClassVar[type[AbstractConfig] | None] = None  # unknown options

    def check(self, problem: AttentionProblem) -> None:
        raise NotImplementedError(
            f"the {self.name!r} backend is unavailable: {self.reason}"
        )

    def forward(self, problem: AttentionProblem) -> tuple[Array, Array]:
        self.check(problem)
        raise AssertionError("unreachable")


BACKENDS: dict[str, AbstractBackend] = {}
# Fastest first; `auto` takes the first that accepts the problem.
AUTO_ORDER: tuple[str, ...] = ()


def register(name: str, module: str, attr: str, *, auto: bool = True) -> None:
    """Registers backend `name`, the class `attr` of `module` (relative to this
    package, or absolute). Backends registered with `auto=True` are tried by `auto`
    in registration order, so register the fastest first.

    A module that fails to import (ImportError, or an AttributeError from a jax that
    moved a Pallas submodule) registers an `UnavailableBackend` instead: importing
    eqx_flexattn never fails, and `explain_backend` says why the backend is missing.
    """
    global AUTO_ORDER
    try:
        backend = getattr(importlib.import_module(module, __name__), attr)()
    except (ImportError, AttributeError) as e:
        logger.debug("eqx_flexattn: backend %r unavailable: %r", name, e)
        backend = UnavailableBackend(name, f"{type(e).__name__}: {e}")
    if backend.name != name:
        raise AssertionError(f"backend {attr} is named {backend.name!r}, not {name!r}")
    BACKENDS[name] = backend
    if auto and name not in AUTO_ORDER:
        AUTO_ORDER = (*AUTO_ORDER, name)


# One line per backend, fastest first.
register("mosaic", ".mosaic", "MosaicBackend")  # NVIDIA sm90+
register("triton", ".triton", "TritonBackend")  # NVIDIA sm80+; sm90+ float32
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
        backend.check(problem)
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


__all__ = [
    "AbstractBackend",
    "AttentionProblem",
    "AUTO_ORDER",
    "BACKENDS",
    "register",
    "select_backend",
    "UnavailableBackend",
]
