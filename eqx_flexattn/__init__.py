"""eqx_flexattn: FlexAttention for JAX, built the Equinox way.

Set the environment variable `EQX_FLEXATTN_TYPECHECK=1` before importing to check the
jaxtyping annotations of every public function at runtime with beartype.
"""

import contextlib as _contextlib
import os as _os

import jaxtyping as _jaxtyping


if _os.environ.get("EQX_FLEXATTN_TYPECHECK", "0").lower() not in ("", "0", "false"):
    _hook = _jaxtyping.install_import_hook("eqx_flexattn", "beartype.beartype")
else:
    _hook = _contextlib.nullcontext()

with _hook:
    from . import (
        context_parallel as context_parallel,
        masks as masks,
        nn as nn,
        score_mods as score_mods,
    )
    from ._attention import (
        AuxOutput as AuxOutput,
        AuxRequest as AuxRequest,
        explain_backend as explain_backend,
        flex_attention as flex_attention,
    )
    from ._block_mask import (
        and_masks as and_masks,
        BlockMask as BlockMask,
        create_block_mask as create_block_mask,
        create_mask as create_mask,
        noop_mask as noop_mask,
        or_masks as or_masks,
    )
    from ._merge import merge_attention as merge_attention

del _contextlib, _os, _jaxtyping, _hook

__version__ = "0.1.0"
