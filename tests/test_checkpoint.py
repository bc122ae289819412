"""The checkpoint sidecar carries the eval preprocessing, resize mode included."""

import pytest

from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import backbone_info_of, read_sidecar


def test_resize_mode_comes_from_the_sidecar(tiny_run):
    sidecar = read_sidecar(tiny_run["checkpoint"])
    assert backbone_info_of(sidecar).resize == sidecar["resize"] == "stretch"
    assert backbone_info_of({**sidecar, "resize": "center_crop"}).resize == "center_crop"
    older = {k: v for k, v in sidecar.items() if k != "resize"}
    assert backbone_info_of(older).resize == "stretch"  # the only mode before the option


def test_unknown_resize_mode_in_a_sidecar_is_refused(tiny_run):
    sidecar = read_sidecar(tiny_run["checkpoint"])
    with pytest.raises(CheckpointError, match=r"resize 'fit' is not one of \['stretch'"):
        backbone_info_of({**sidecar, "resize": "fit"})
