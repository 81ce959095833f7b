"""Per-backend configuration: one frozen, validated config per backend, built from
`kernel_options` here and nowhere else.

`kernel_options` are hints. A key may be

- an option of some registered backend (a field of its config class): the backends
  that declare it use it, the others ignore it (debug log);
- a *section*, a registered backend's name mapping to a dict of that backend's
  options: `{"xla": {"row_groups": 4}, "mosaic": {"block_q": 64}}`. Only that backend
  reads it, and its keys win over the flat ones;
- a common key (`interpret`): read by the backends that declare it, ignored by the
  others;
- a PyTorch FlexAttention kernel option (`BLOCK_M`, `PRESCALE_QK`, `fwd_BLOCK_M`, ...):
  a backend whose config maps it (`torch_names`) uses it; a backend that runs without
  using it says so once per process (a `UserWarning`).

Any other key is a typo: `ValueError` naming it and listing the accepted keys. A bad
value is a `ValueError` from the config class that owns the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import warnings
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

import equinox as eqx


logger = logging.getLogger("eqx_flexattn")

Options = tuple[tuple[str, Any], ...]

# Keys every backend accepts; those whose config has the field use them.
COMMON_KEYS: tuple[str, ...] = ("interpret",)

# PyTorch's `FlexKernelOptions` and the internal keys `_apply_kernel_options` sets
# (torch/nn/attention/flex_attention.py). Any of them may carry a `fwd_`/`bwd_` prefix.
TORCH_KEYS: frozenset[str] = frozenset(
    {
        "num_warps",
        "num_stages",
        "BLOCK_M",
        "BLOCK_N",
        "BLOCK_M1",
        "BLOCK_N1",
        "BLOCK_M2",
        "BLOCK_N2",
        "PRESCALE_QK",
        "ROWS_GUARANTEED_SAFE",
        "BLOCKS_ARE_CONTIGUOUS",
        "WRITE_DQ",
        "FORCE_USE_FLEX_ATTENTION",
        "USE_TMA",
        "BACKEND",
        "force_flash",
        "kpack",
        "matrix_instr_nonkdim",
        "waves_per_eu",
        "OUTPUT_LOGSUMEXP",
        "OUTPUT_MAX",
        "SPARSE_Q_BLOCK_SIZE",
        "SPARSE_KV_BLOCK_SIZE",
    }
)


def is_torch_key(key: str) -> bool:
    for prefix in ("fwd_", "bwd_"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key in TORCH_KEYS


class AbstractConfig(eqx.Module):
    """A backend's tuning configuration: frozen, hashable, validated on creation.

    A backend declares `config_class = MyConfig`, a subclass whose fields are its
    option names, each `eqx.field(static=True, default=...)`, and validates them in
    `__check_init__` (raise `ValueError` naming the key, e.g. with
    [`check_positive_int`][]). `torch_names` maps PyTorch kernel option names to
    fields that mean the same thing (`{"BLOCK_M": "block_q"}`).

    Build one with [`config_for`][], never directly from `kernel_options`.
    """

    torch_names: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


class EmptyConfig(AbstractConfig):
    """The configuration of a backend without options."""


def check_positive_int(backend: str, key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{backend} backend: kernel_options[{key!r}] must be a positive int, "
            f"got {value!r}."
        )


def check_bool(backend: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"{backend} backend: kernel_options[{key!r}] must be True or False, "
            f"got {value!r}."
        )


def normalise_options(options: Mapping[str, Any] | None) -> Options:
    """`kernel_options` as a sorted, hashable tuple of pairs (sections nested)."""
    if options is None:
        return ()
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise TypeError(
            "`kernel_options` must be a dict with str keys, got "
            f"{type(options).__name__}."
        )
    items = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            value = Section(normalise_options(value))
        elif not isinstance(value, Hashable):
            raise TypeError(
                f"kernel_options[{key!r}] must be hashable (options are static), got "
                f"{type(value).__name__}."
            )
        items.append((key, value))
    return tuple(sorted(items))


def expand_options(options: Options) -> dict[str, Any] | None:
    """The inverse of `normalise_options` (None for no options)."""
    out = {k: expand_options(v) if _is_section(v) else v for k, v in options}
    return out or None


class Section(tuple):
    """A nested dict of `kernel_options`, normalised (sorted pairs)."""


def _is_section(value: Any) -> bool:
    return isinstance(value, Section)


def _registry() -> dict[str, type[AbstractConfig] | None]:
    """Registered backend name -> its config class (None: unknown, import failed)."""
    from . import BACKENDS  # the registry imports the backends, which import us

    return {name: b.config_class for name, b in BACKENDS.items()}


def _did_you_mean(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _typo(key: str, registry, section: str | None = None) -> ValueError:
    if section is not None:
        own = registry[section].option_names()
        hint = _did_you_mean(key, [*own, *COMMON_KEYS, *TORCH_KEYS])
        return ValueError(
            f"kernel_options[{section!r}] key {key!r} is not an option of the "
            f"{section!r} backend.{hint} It takes {list(own)}, the common keys "
            f"{list(COMMON_KEYS)} and PyTorch's kernel options."
        )
    own = sorted({n for c in registry.values() if c for n in c.option_names()})
    accepted = sorted(set(own) | set(COMMON_KEYS))
    hint = _did_you_mean(key, [*accepted, *registry, *TORCH_KEYS])
    return ValueError(
        f"kernel_options key {key!r} is not an option of any backend nor a "
        f"PyTorch FlexAttention kernel option.{hint} Accepted: backend options "
        f"{accepted}; per-backend sections {sorted(registry)} "
        "(`kernel_options={'xla': {...}}`); PyTorch's kernel options "
        f"{sorted(TORCH_KEYS)} (with or without a fwd_/bwd_ prefix)."
    )


def _resolve(
    name: str,
    options: Options,
    registry: Mapping[str, type[AbstractConfig] | None],
    use_torch: bool = True,
) -> tuple[AbstractConfig, tuple[str, ...], tuple[str, ...]]:
    """(config, torch keys it ignores, other backends' keys it ignores). With
    `use_torch=False`, PyTorch keys are left out (they are hints: only the backend
    that runs reads, and validates, them)."""
    config_class = registry.get(name) or EmptyConfig
    fields = set(config_class.option_names())
    others = {n for c in registry.values() if c for n in c.option_names()}
    # (from torch names, explicit) for flat keys, then for this backend's section.
    flat, sect = ({}, {}), ({}, {})
    ignored_torch, foreign = [], []

    def take(key, value, into, section=None):
        if key in fields:
            into[1][key] = value
        elif key in config_class.torch_names:
            if use_torch:
                into[0][config_class.torch_names[key]] = value
        elif is_torch_key(key):
            ignored_torch.append(key)
        elif key in COMMON_KEYS or (section is None and key in others):
            foreign.append(key)
        else:
            raise _typo(key, registry, section)

    for key, value in options:
        if key in registry:
            if not _is_section(value):
                raise ValueError(
                    f"kernel_options[{key!r}] must be a dict of the {key!r} "
                    f"backend's options, got {value!r}."
                )
            if key != name:
                foreign.append(key)
                continue
            if registry[key] is None:  # unavailable backend: nothing to check
                continue
            for k, v in value:
                if k in registry:
                    raise ValueError(
                        f"kernel_options[{key!r}] holds a section {k!r}: sections "
                        "do not nest."
                    )
                take(k, v, sect, key)
        else:
            take(key, value, flat)
    # Explicit fields win over torch names they map from, and sections over flat keys.
    config = config_class(**{**flat[0], **flat[1], **sect[0], **sect[1]})
    return config, tuple(ignored_torch), tuple(foreign)


def config_for(name: str, options: Options) -> AbstractConfig:
    """The validated config of backend `name` for normalised `options`.

    Raises `ValueError` for a key no backend or PyTorch knows, or for a bad value of
    one of this backend's options.
    """
    return _resolve(name, options, _registry())[0]


def check_options(options: Options) -> None:
    """Builds every registered backend's config: typos and bad values raise the same
    `ValueError` whichever backend will run and on whichever platform. (PyTorch's
    keys are validated only by the backend that runs.)"""
    registry = _registry()
    for name in registry:
        _resolve(name, options, registry, use_torch=False)


_NOTED: set[tuple[str, str]] = set()


def note_ignored(name: str, options: Options) -> None:
    """Says, once per process and key, which PyTorch options backend `name` ignores;
    logs (debug) the other backends' options it ignores."""
    _, ignored_torch, foreign = _resolve(name, options, _registry())
    for key in ignored_torch:
        if (name, key) not in _NOTED:
            _NOTED.add((name, key))
            warnings.warn(
                f"kernel_options[{key!r}] (a PyTorch FlexAttention option) has no "
                f"equivalent in the {name!r} backend and is ignored.",
                UserWarning,
                stacklevel=2,
            )
    if foreign:
        logger.debug(
            "flex_attention: backend %r ignores kernel_options %s",
            name,
            list(foreign),
        )
