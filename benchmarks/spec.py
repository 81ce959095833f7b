"""What is measured: shape configs, attention cases, presets and the exact FLOP count.

A `Config` is a problem shape; a `Case` names a mask (`Case.mask`) and a score mod
(`Case.score`) by kind, so that every implementation builds the same semantics from
one description (see `benchmarks/mods.py`). Decode configs (`Lq < Lkv`) place the
queries at the end of the key sequence: query row `i` sits at absolute position
`i + Lkv - Lq`, which is what every mask and score mod sees (`Config.q_offset`).

FLOPs count only the attended (query, key) pairs: `fwd = 4 B Hq Lq Lkv D density`,
`fwd+bwd = 3.5 fwd` (backward = 2.5 forward). `density` is exact: the number of
attended keys of every query row has a closed form for each mask (`attended_per_row`),
summed over rows; `tests/test_benchmarks_quick.py` checks it against
`eqx_flexattn.create_mask` on small shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


# Parameters of the cases, shared by every implementation.
WINDOW = 1024  # sliding window (capped at Lkv // 4 for tiny shapes)
DOCUMENTS = 8  # documents packed into one sequence (document case, causal)
SOFTCAP = 30.0


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lkv: int
    D: int
    dtype: str
    backward: bool = True  # decode configs time the forward pass only

    @property
    def q_offset(self) -> int:
        """Absolute position of query row 0 (decoding: queries are the last tokens)."""
        return self.Lkv - self.Lq

    @property
    def gqa(self) -> bool:
        return self.Hq != self.Hkv

    @property
    def window(self) -> int:
        return min(WINDOW, max(1, self.Lkv // 4))

    @property
    def prefix(self) -> int:
        return max(1, self.Lkv // 4)

    def shape_fields(self) -> dict:
        return dict(
            B=self.B,
            Hq=self.Hq,
            Hkv=self.Hkv,
            Lq=self.Lq,
            Lkv=self.Lkv,
            D=self.D,
            dtype=self.dtype,
        )


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mask: str | None = None  # None | causal | sliding_window | document | prefix_lm
    score: str | None = None  # None | checkerboard | alibi | softcap | relative_bias
    learnable: bool = False  # fwd+bwd also returns the score mod's parameter gradients


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("seed", 8, 8, 8, 2048, 2048, 64, "float16"),
        Config("L8k", 4, 16, 16, 8192, 8192, 128, "bfloat16"),
        Config("long", 1, 16, 16, 32768, 32768, 128, "bfloat16"),
        Config("gqa", 2, 32, 8, 8192, 8192, 128, "bfloat16"),
        Config("decode1", 8, 16, 16, 1, 32768, 128, "bfloat16", backward=False),
        Config("decode16", 8, 16, 16, 16, 32768, 128, "bfloat16", backward=False),
        # float32 inputs (TF32 matmuls by default on GPUs): the seed's own example.
        Config("seed-f32", 8, 8, 8, 2048, 2048, 64, "float32"),
        Config("L8k-f32", 4, 16, 16, 8192, 8192, 128, "float32"),
        # Tiny shapes for --quick on a CPU.
        Config("tiny", 1, 2, 2, 256, 256, 32, "float32"),
        Config("tiny-gqa", 1, 4, 2, 256, 256, 32, "float32"),
        Config("tiny-decode", 1, 2, 2, 4, 512, 32, "float32", backward=False),
    )
}

CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("none"),
        Case("checkerboard", score="checkerboard"),
        Case("causal", mask="causal"),
        Case("alibi+causal", mask="causal", score="alibi"),
        Case("softcap+causal", mask="causal", score="softcap"),
        Case("sliding_window", mask="sliding_window"),
        Case("document", mask="document"),
        Case("prefix_lm", mask="prefix_lm"),
        Case("alibi+causal:learnable", mask="causal", score="alibi", learnable=True),
        Case("relative_bias", score="relative_bias"),
        Case("relative_bias:learnable", score="relative_bias", learnable=True),
    )
}

ALL_CASES = tuple(CASES)
FORWARD_CASES = tuple(n for n, c in CASES.items() if not c.learnable)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One step of a plan: a config, its cases, and the implementations to run
    (name globs; None: all)."""

    config: str
    cases: tuple[str, ...]
    impls: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Preset:
    """A prioritised plan (entries run in order) and its settings.

    `shares` splits `max_seconds` between the entries and, last, the
    create_block_mask timings; time an entry leaves unused passes to the next.
    Within an entry, implementations run in registry order (eqx_flexattn, torch,
    then the other peers), each over every case, so a spent budget cuts peers first.
    """

    plan: tuple[Entry, ...]
    iters: int = 20
    warmup: int = 3
    timed_seconds: float = 2.0  # stop timing a measurement after this (>= 3 iters)
    time_limit: float = 120.0  # per measurement, compilation included
    max_seconds: float | None = None
    shares: tuple[float, ...] | None = None
    mask_lengths: tuple[int, ...] = (8192, 131072)


HEADLINE = ("eqx_flexattn.*", "torch.*", "jax.nn.cudnn")
TRITON_IMPLS = ("eqx_flexattn.triton*", "torch.flex_attention*")
TRITON_CASES = (  # the goal's cases, the most telling first
    "causal",
    "checkerboard",
    "alibi+causal",
    "softcap+causal",
    "sliding_window",
    "document",
    "prefix_lm",
    "alibi+causal:learnable",
    "relative_bias",
    "relative_bias:learnable",
)
FLOAT32_CASES = (
    "causal",
    "alibi+causal",
    "softcap+causal",
    "sliding_window",
    "document",
)

PRESETS: dict[str, Preset] = {
    "full": Preset(
        plan=(
            Entry("seed", ALL_CASES),
            Entry("L8k", ALL_CASES),
            Entry("long", ALL_CASES),
            Entry("gqa", ALL_CASES),
            Entry("decode1", FORWARD_CASES),
            Entry("decode16", FORWARD_CASES),
        ),
    ),
    # One H100 in about 8 minutes of wall time (6.5 of them measuring): seed and L8k
    # with every case and implementation; long, GQA and decode with the headline
    # cases and implementations.
    "gpu-session": Preset(
        plan=(
            Entry("seed", ALL_CASES),
            Entry("L8k", ALL_CASES),
            Entry("long", ("causal", "sliding_window", "document"), HEADLINE),
            Entry("gqa", ("causal", "alibi+causal"), HEADLINE),
            Entry("decode1", ("none", "causal"), HEADLINE),
            Entry("decode16", ("none", "causal"), HEADLINE),
        ),
        iters=20,
        warmup=2,
        timed_seconds=1.0,
        time_limit=60.0,
        max_seconds=390.0,
        shares=(0.32, 0.36, 0.09, 0.07, 0.04, 0.04, 0.08),
    ),
    # The `triton` backend's goal on one H100/H200 (about 5 minutes of measuring):
    # beside torch flex, the seed and L8k cases in half precision with learnable
    # parameters, and float32 at TF32, 3xTF32 and IEEE beside torch's IEEE default
    # and its TF32 variant.
    "triton": Preset(
        plan=(
            Entry("seed", TRITON_CASES, TRITON_IMPLS),
            Entry("L8k", TRITON_CASES, TRITON_IMPLS),
            Entry("seed-f32", FLOAT32_CASES, TRITON_IMPLS),
            Entry("L8k-f32", FLOAT32_CASES, TRITON_IMPLS),
        ),
        iters=10,
        warmup=1,
        timed_seconds=0.5,
        time_limit=45.0,
        max_seconds=300.0,
        shares=(0.36, 0.36, 0.12, 0.16, 0.0),
        mask_lengths=(),
    ),
    "quick": Preset(
        plan=(
            Entry("tiny", ("none", "causal", "document", "alibi+causal:learnable")),
            Entry("tiny-gqa", ("causal",)),
            Entry("tiny-decode", ("none", "causal")),
        ),
        iters=5,
        warmup=1,
        timed_seconds=0.5,
        time_limit=60.0,
        mask_lengths=(256, 1024),
    ),
}


def case_problem(case: Case, config: Config) -> str | None:
    """Why `case` makes no sense on `config`, or None."""
    if case.learnable and not config.backward:
        return "learnable case needs a backward pass; decode configs time forward only"
    return None


def _document_starts(config: Config) -> np.ndarray:
    """First position of the document of every key position."""
    ids = document_ids(config.Lkv)
    return np.searchsorted(ids, ids, side="left")


def document_ids(length: int) -> np.ndarray:
    """`DOCUMENTS` consecutive documents of (nearly) equal length."""
    return (np.arange(length, dtype=np.int64) * DOCUMENTS // length).astype(np.int32)


def attended_per_row(case: Case, config: Config) -> np.ndarray:
    """Exact number of keys each query row attends to (closed form per mask)."""
    p = np.arange(config.Lq, dtype=np.int64) + config.q_offset  # absolute positions
    lkv = config.Lkv
    if case.mask is None:
        return np.full_like(p, lkv)
    if case.mask == "causal":
        return np.minimum(p + 1, lkv)
    if case.mask == "sliding_window":
        return np.minimum(p, lkv - 1) - np.maximum(0, p - config.window) + 1
    if case.mask == "document":  # same document and causal
        return p - _document_starts(config)[p] + 1
    if case.mask == "prefix_lm":
        return np.minimum(np.maximum(config.prefix, p + 1), lkv)
    raise ValueError(f"unknown mask {case.mask!r}")


def density(case: Case, config: Config) -> float:
    """Fraction of the Lq x Lkv (query, key) pairs that are attended."""
    return float(attended_per_row(case, config).sum()) / (config.Lq * config.Lkv)


def flops(case: Case, config: Config) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of the attended pairs only."""
    fwd = 4.0 * config.B * config.Hq * config.Lq * config.Lkv * config.D
    fwd *= density(case, config)
    return fwd, 3.5 * fwd


def select(names: Sequence[str] | None, known: dict, what: str) -> list[str]:
    """Validated names (in the given order), or every known one for None."""
    if names is None:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(known)}")
    return list(names)
