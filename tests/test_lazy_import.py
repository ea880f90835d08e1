"""`import fusedmtl` then fusedmtl.weighting / fusedmtl.multi_tensor work without importing them
(like torch.nn.functional after `import torch`), and importing fusedmtl does not load them."""

from __future__ import annotations

import subprocess
import sys


def run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_submodules_are_not_imported_by_import_fusedmtl():
    loaded = run(
        "import sys, fusedmtl; print(sorted(m for m in sys.modules "
        "if m.split('.')[:2] in (['fusedmtl', 'weighting'], ['fusedmtl', 'multi_tensor'],"
        " ['fusedmtl', 'demo'], ['fusedmtl', 'linalg'])))"
    )
    assert loaded == "[]"


def test_submodules_load_on_first_attribute_access():
    out = run(
        "import fusedmtl; print(fusedmtl.weighting.MGDA.__name__, "
        "fusedmtl.multi_tensor.gramian.__name__, fusedmtl.linalg.eigh.__name__, "
        "'weighting' in dir(fusedmtl))"
    )
    assert out == "MGDA gramian eigh True"


def test_unknown_attribute_is_still_an_attribute_error():
    out = run("import fusedmtl\ntry:\n    fusedmtl.nope\nexcept AttributeError as e:\n    print(e)")
    assert "nope" in out
