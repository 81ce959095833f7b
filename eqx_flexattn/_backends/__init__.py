"""Executors of the one flex-attention semantics, and the `auto` choice among them."""

from __future__ import annotations

import logging

from ._base import AbstractBackend, AttentionProblem
from .reference import ReferenceBackend
from .xla import XlaBackend


logger = logging.getLogger("eqx_flexattn")

BACKENDS: dict[str, AbstractBackend] = {
    b.name: b for b in (ReferenceBackend(), XlaBackend())
}
try:
    from .mosaic import MosaicBackend

    BACKENDS["mosaic"] = MosaicBackend()
except ImportError:  # pragma: no cover
    pass
# Fastest first; `auto` takes the first that accepts the problem.
AUTO_ORDER: tuple[str, ...] = tuple(n for n in ("mosaic", "xla") if n in BACKENDS)


def select_backend(
    name: str, problem: AttentionProblem
) -> tuple[AbstractBackend, list[str]]:
    """The backend that will run `problem`, and why each faster one declined."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(
                f"Unknown backend {name!r}; choose 'auto' or one of {sorted(BACKENDS)}."
            )
        backend = BACKENDS[name]
        backend.check(problem)
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
        return backend, reasons
    raise NotImplementedError(
        "No backend can run this flex_attention call: " + "; ".join(reasons)
    )


__all__ = ["AbstractBackend", "AttentionProblem", "BACKENDS", "select_backend"]
