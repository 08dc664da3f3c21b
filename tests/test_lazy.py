"""``ierf._lazy``: the PEP 562 ``__getattr__`` that keeps ``import ierf`` torch-free."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def test_a_submodule_missing_a_dependency_says_which_not_no_attribute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ierf.srd`` without torch installed must fail naming torch: reported as "module has no attribute
    'srd'", the missing dependency was hidden behind what looks like a typo. A name that is no submodule
    is still an AttributeError (so ``hasattr`` works)."""
    package = tmp_path / "lazypkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from ierf._lazy import lazy_getattr\n__getattr__ = lazy_getattr(__name__, {'answer': 'lazypkg.values'})\n"
    )
    (package / "values.py").write_text("answer = 42\n")
    (package / "heavy.py").write_text("import ierf_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "lazypkg" or m.startswith("lazypkg.")]:
        monkeypatch.delitem(sys.modules, name)
    import lazypkg

    try:
        assert lazypkg.answer == 42
        with pytest.raises(ModuleNotFoundError) as info:
            lazypkg.heavy  # noqa: B018
        assert info.value.name == "ierf_no_such_dependency"
        with pytest.raises(AttributeError, match="module 'lazypkg' has no attribute 'nothing'"):
            lazypkg.nothing  # noqa: B018
        assert not hasattr(lazypkg, "nothing")
    finally:
        for name in [m for m in sys.modules if m == "lazypkg" or m.startswith("lazypkg.")]:
            del sys.modules[name]
