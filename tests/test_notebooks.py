"""The notebooks are stored executed, so GitHub shows their pictures; the test suite
re-executes them (`--nbmake`) without overwriting the stored outputs."""

import base64
import json
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_with_small_pictures(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(c["execution_count"] for c in code), "re-execute and store outputs"
    outputs = [o for c in code for o in c["outputs"]]
    data = [o.get("data", {}) for o in outputs]
    pictures = [d["image/png"] for d in data if "image/png" in d]
    assert pictures, f"{path.name} stores no picture"
    for png in pictures:
        assert len(base64.b64decode(png)) < 150_000
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"], "warnings stored"
