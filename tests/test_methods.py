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


@pytest.mark.parametrize("method", ["srd", "integrated_gradients"])
def test_an_interruptible_call_stops_at_a_checkpoint_and_leaves_the_model_as_it_was(method: str) -> None:
    """A server stops work for a caller who has gone: SRD between graph nodes, IG between forwards."""
    import torch
    import torchvision
    from ierf.interrupt import Interrupted, interruptible

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explainer = ierf.create_explainer(method, model)
    x = torch.randn(1, 3, 64, 64)
    reference = explainer.saliency(x, 3)
    checks = 0

    def stop_after_two() -> str | None:
        nonlocal checks
        checks += 1
        return "the caller went away" if checks > 2 else None

    with interruptible(stop_after_two), pytest.raises(Interrupted, match="the caller went away"):
        explainer.saliency(x, 3)
    assert checks == 3  # stopped at the third checkpoint, not at the end
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    torch.testing.assert_close(explainer.saliency(x, 3), reference)  # outside the block: unaffected
    with interruptible(lambda: None):  # a check that never asks to stop changes nothing
        torch.testing.assert_close(explainer.saliency(x, 3), reference)


def test_smoothgrad_stops_part_way_when_interrupted() -> None:
    """SmoothGrad is one of the gradient baselines a server stops "before each model forward" (ierf.interrupt),
    but it ran its 16 noisy copies as one batch: one checkpoint, before any work, so a SmoothGrad whose caller
    cancelled ran to its end on the worker's one compute thread (seen live: cancelled 0.25 s in, the next
    cached request waited 1.25 s, and jobs_stopped_total did not move)."""
    import torch
    import torchvision
    from ierf.interrupt import Interrupted, interruptible

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    explainer = ierf.create_explainer("smoothgrad", model)
    x = torch.randn(1, 3, 64, 64)
    checks = 0

    def stop_after_first() -> str | None:
        nonlocal checks
        checks += 1
        return "the caller went away" if checks > 1 else None

    with interruptible(stop_after_first), pytest.raises(Interrupted, match="the caller went away"):
        explainer.saliency(x, 3)


def test_leaving_an_inner_interruptible_block_puts_the_outer_check_back() -> None:
    """Blocks nest (a server's per-request check around a library's own): once the inner block ends, the
    outer caller's check must apply again, or a caller who has gone is no longer noticed."""
    from ierf.interrupt import Interrupted, checkpoint, interruptible

    with interruptible(lambda: "the outer caller went away"):
        with interruptible(lambda: None):
            checkpoint()  # the innermost check applies: no reason to stop
        with pytest.raises(Interrupted, match="the outer caller went away"):
            checkpoint()
    checkpoint()  # outside every block: nothing to stop for


def test_a_bool_target_tensor_is_refused_like_a_bool() -> None:
    """Guards against letting a bool tensor through ``resolve_target``: ``tensor([True, False])`` would be
    read as classes 1 and 0 by every baseline, as a bare True is refused for."""
    import torch

    with pytest.raises(TypeError, match="integer dtype"):
        methods.resolve_target(torch.tensor([True, False]), 2)
    assert methods.resolve_target(torch.tensor([1, 0]), 2).tolist() == [1, 0]


def test_a_registered_method_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against listing only the built-in provider table: a method registered with ``register_method``
    (a plugin) is accepted by ``create_explainer`` but the service offers only what ``available_methods``
    lists, so it could never be requested."""

    def factory(model: object) -> object:
        return model

    monkeypatch.setitem(methods._REGISTRY, "my_plugin", factory)
    assert "my_plugin" in ierf.available_methods()
    assert methods.create_explainer("my_plugin", "model") == "model"


def test_asking_which_methods_refuse_a_model_imports_no_method_library() -> None:
    """A server asks ``why_unsupported`` of every method at replica start: it must not pull in Captum or
    pytorch-grad-cam (~1.5 s and ~150 MB per replica) that only a request for those methods needs."""
    code = (
        "import sys, torchvision, ierf\n"
        "m = torchvision.models.resnet18()\n"
        "reasons = {n: ierf.why_unsupported(n, m) for n in ierf.available_methods()}\n"
        "assert not any(reasons.values()), reasons\n"
        "print(sorted(k for k in ('captum', 'pytorch_grad_cam') if k in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_asking_why_an_unknown_method_is_unsupported_names_the_available_ones() -> None:
    """Guards ``why_unsupported``'s name check: like ``create_explainer`` and ``method_version`` it refuses an
    unknown name, listing the methods. Returning None instead says "nothing refuses this model" for a method
    that does not exist (a typo such as 'gradcm' would pass as runnable)."""
    with pytest.raises(ValueError, match=r"unknown method 'gradcm'; available: .*gradcam.*srd"):
        ierf.why_unsupported("gradcm", None)
    assert ierf.why_unsupported("gradcam", None) is None  # known, and no up-front check: nothing refuses it
