"""Session 47: what a job's arrays look like after Ray has carried them.

Ray hands a worker the numpy arrays of a job as read-only views of the message buffer. ``torch.from_numpy``
warns on such an array (PyTorch cannot stop a later write through the tensor), once per process, into the
replica's log: the worker must take a copy of what it converts.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from serving.test_worker_warm_up import HASH, PIXELS, _host

pytestmark = pytest.mark.slow


def test_ierf_positions_as_ray_delivers_them_convert_without_a_warning() -> None:
    from ierf.serving.jobs import IERFJob

    host = _host()
    positions = np.array([[0, 0], [1, 2]], dtype=np.int64)
    positions.setflags(write=False)  # as deserialised from Ray's object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each warning is raised, however often it was shown before
        outcome = host.ierf(IERFJob(PIXELS, HASH, "layer3.1", positions))
    assert outcome.maps.shape[0] == 2


def test_a_view_cut_by_the_ingress_as_ray_delivers_it_converts_without_a_warning() -> None:
    """The ingress cuts large images to the model's view and sends that: the worker's input is then the
    job's own (read-only) buffer."""
    from ierf.images import resize_crop
    from ierf.serving.jobs import ExplainJob

    host = _host()
    photo = np.random.default_rng(5).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    view = resize_crop(photo, host.description.resize, host.description.input_height)
    view.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = host.explain(
            ExplainJob(view, "cut-47", target=3, view_version=host.description.preprocess_version, overlay=True)
        )
    whole = host.explain(ExplainJob(photo, "whole-47", target=3, overlay=True))
    np.testing.assert_array_equal(cut.maps, whole.maps)
