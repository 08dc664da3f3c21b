"""Mutation round 17 (request checks in ``ierf.serving.jobs``): tests killing mutants that survived."""

from __future__ import annotations

import numpy as np
import pytest
from ierf.serving.errors import InvalidArgument, ResourceExhausted
from ierf.serving.jobs import LayerShape, ModelDescription, check_ierf_args, check_response_fits, grpc_message_cap
from ierf.serving.settings import GRPC_MAX_MESSAGE_ENV


def _description(layers: list[LayerShape], aliases: dict[str, str] | None = None) -> ModelDescription:
    return ModelDescription(
        "m", "d", 224, 224, "p", ["a", "b"], layers, ["srd"], "srd", "cpu", layer_aliases=aliases or {}
    )


def test_the_runs_of_a_reused_activation_are_listed_in_run_order() -> None:
    """An activation module run 12 times: the hint lists relu:0 .. relu:11 in that order (as strings,
    relu:10 and relu:11 came before relu:2)."""
    layers = [LayerShape(f"relu:{i}", 8, 7, 7) for i in range(12)]
    with pytest.raises(InvalidArgument) as caught:
        check_ierf_args(_description(layers), "relu", np.array([[0, 0]]))
    listed = str(caught.value).split("name one run, ")[1].split(", ")
    assert listed == [f"relu:{i}" for i in range(12)]


def test_an_unknown_layer_lists_twelve_names_and_says_how_many_there_are() -> None:
    """A model with 40 layers: the message shows the first 12 and points at GetModel for the rest, so it
    stays readable (a DenseNet has hundreds)."""
    layers = [LayerShape(f"block{i}", 8, 7, 7) for i in range(40)]
    with pytest.raises(InvalidArgument, match=r"block11, … \(40 in all; see GetModel\)") as caught:
        check_ierf_args(_description(layers), "nope", np.array([[0, 0]]))
    assert "block12" not in str(caught.value)


def test_a_layer_alias_resolves_to_its_canonical_layer() -> None:
    """GetModel lists "layer4.1"; the engine also takes "layer4" (a stage's last block) for it, and so must
    the service's check, answering with the canonical layer."""
    layers = [LayerShape("layer4.0", 512, 7, 7), LayerShape("layer4.1", 512, 7, 7)]
    layer = check_ierf_args(_description(layers, {"layer4": "layer4.1"}), "layer4", np.array([[6, 6]]))
    assert layer.name == "layer4.1"


def test_the_response_size_check_counts_the_input_crop_and_takes_a_response_of_exactly_the_cap(monkeypatch) -> None:
    """The worst case is P maps + the input crop (3 bytes a pixel) + 64 KiB: a response that fits without the
    crop does not with it, and one of exactly the cap fits."""
    desc = _description([LayerShape("l", 8, 7, 7)])
    pixels = 224 * 224
    exact = 2 * pixels * 4 + (1 << 16)
    monkeypatch.setenv(GRPC_MAX_MESSAGE_ENV, str(exact))
    check_response_fits(desc, maps=2, itemsize=4, overlay=False, return_input=False)  # exactly the cap
    with pytest.raises(ResourceExhausted, match="over the gRPC message cap"):
        check_response_fits(desc, maps=2, itemsize=4, overlay=False, return_input=True)
    monkeypatch.setenv(GRPC_MAX_MESSAGE_ENV, str(exact - 1))
    with pytest.raises(ResourceExhausted):
        check_response_fits(desc, maps=2, itemsize=4, overlay=False, return_input=False)


def test_a_message_cap_that_is_not_a_byte_count_is_taken_as_none(monkeypatch) -> None:
    """The worker reads the proxy's cap from its environment on every ComputeIERF: a value that is not a
    plain byte count ("40MiB", refused by ``python -m ierf.serving`` at start) must not fail each request
    with a ValueError; it is no known cap."""
    for raw in ("40MiB", "-5", ""):
        monkeypatch.setenv(GRPC_MAX_MESSAGE_ENV, raw)
        assert grpc_message_cap() is None
    monkeypatch.setenv(GRPC_MAX_MESSAGE_ENV, " 1048576 ")
    assert grpc_message_cap() == 1 << 20
