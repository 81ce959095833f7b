"""examples/from_pytorch.py: PyTorch's FlexAttention tutorial, ported by changing the
imports, runs and matches a dense computation in every variant."""

import importlib.util
import pathlib
import re
import warnings

import jax
import pytest

import eqx_flexattn as fa
from eqx_flexattn import _attention, masks


EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "from_pytorch.py"
QUICKSTART = EXAMPLE.parent / "quickstart.py"


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The tutorial passes `device="cuda"`: eqx_flexattn notes once per process that it
# ignores it (whether this test sees the note depends on what ran before).
@pytest.mark.filterwarnings("ignore:eqx_flexattn ignores `device=:UserWarning")
def test_from_pytorch_every_variant_matches(capsys):
    example = load(EXAMPLE)
    errors = example.main()
    assert len(errors) == 15
    bad = {name: e for name, e in errors.items() if not e < example.TOLERANCE}
    assert not bad
    out = capsys.readouterr().out
    assert "15 of 15 variants match" in out
    assert "sliding_window_32 (attn-gym)" in out  # attention-gym's __name__ kept


def test_combined_masks_take_a_name_as_attention_gym_gives_them():
    mask = fa.and_masks(masks.causal_mask, fa.noop_mask)
    assert mask.__name__ == repr(mask) == "and_masks(causal_mask, noop_mask)"
    mask.__name__ = "sliding_window_64"
    assert mask.__name__ == repr(mask) == "sliding_window_64"
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    assert repr(jax.tree_util.tree_unflatten(treedef, leaves)) == "sliding_window_64"
    assert (
        repr(fa.or_masks(mask, fa.noop_mask))
        == "or_masks(sliding_window_64, noop_mask)"
    )
    with pytest.raises(AttributeError):  # other fields stay frozen
        mask.op = "or"
    block_mask = fa.create_block_mask(mask, None, None, 8, 8, block_size=4)
    assert repr(block_mask.mask_mod) == "sliding_window_64"


def test_quickstart_shows_the_compiled_way_and_matches_the_reference(
    capsys, monkeypatch
):
    # A first run must not trigger the library's own "ran eagerly" warning (nor any
    # other): the quickstart compiles every flex_attention call it makes.
    monkeypatch.setattr(_attention, "_warned_eager", False)
    with warnings.catch_warnings(), jax.enable_x64(False):  # a user's defaults
        warnings.simplefilter("error")
        load(QUICKSTART).main(1, 2, 96, 80, 16)
    assert not _attention._warned_eager
    out = capsys.readouterr().out
    diffs = re.findall(r"max \|(?:output|grad) - reference\|: (\S+)", out)
    assert len(diffs) == 2 and all(float(d) < 1e-5 for d in diffs), out
    assert "d loss / d slopes:" in out and "backend: xla" in out
