"""The method registry: one verb across methods, names listed without importing any method's code."""

from __future__ import annotations

import subprocess
import sys

import ierf
import pytest
from ierf import methods


def test_every_listed_method_registers_itself_under_its_name() -> None:
    for name in ierf.available_methods():
        factory = methods._factory(name)
        assert methods._REGISTRY[name] is factory
    assert set(methods._REGISTRY) == set(methods._PROVIDERS)  # the static table and the registrations agree


def test_srd_users_do_not_import_the_baseline_libraries() -> None:
    code = (
        "import sys, torch, ierf\n"
        "names = ierf.available_methods()\n"
        "ierf.create_explainer('srd', torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.ReLU(),"
        " torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 2)).eval())\n"
        "print(sorted(m for m in ('captum', 'pytorch_grad_cam', 'zennit') if m in sys.modules), len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]" and int(out[1]) == len(methods._PROVIDERS)


def test_unknown_method_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available: .*gradcam.*srd"):
        ierf.create_explainer("nope", None)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        ierf.method_version("nope")
