"""Seed points for tracking: CSV, Neuroglancer states and links, as users bring them."""
import json

import neuroglancer
import numpy as np
import pytest

from iicats_cv.errors import IicatsError
from iicats_cv.seeds import read_seed_points
from iicats_cv.viewer.link import build_state, state_json, state_to_url


def _space(scales):
  return neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=scales)


def _state_with_points(points, layer_scales, state_scales=(4, 4, 40)):
  state = neuroglancer.ViewerState()
  state.dimensions = _space(state_scales)
  state.layers.append(name="stained", layer=neuroglancer.LocalAnnotationLayer(
    dimensions=_space(layer_scales),
    annotations=[neuroglancer.PointAnnotation(id=str(i), point=p) for i, p in enumerate(points)]))
  return state


def test_csv(tmp_path):
  path = tmp_path / "seeds.csv"
  path.write_text("x,y,z\n10,20,30\n\n1.5,2.5,3.5\n")
  np.testing.assert_array_equal(read_seed_points(str(path)), [[10, 20, 30], [1.5, 2.5, 3.5]])


def test_points_are_in_their_layers_coordinate_space(tmp_path):
  """Neuroglancer stores a local annotation layer's points in the layer's own space (its
  source's outputDimensions), which need not be the state's."""
  state = _state_with_points([[10, 20, 30]], layer_scales=(8, 8, 40))
  path = tmp_path / "state.json"
  path.write_text(json.dumps(state.to_json()))
  np.testing.assert_allclose(read_seed_points(str(path)), [[80, 160, 1200]])


def test_a_link_as_is_or_in_a_file(tmp_path):
  url = neuroglancer.to_url(_state_with_points([[1, 2, 3], [4, 5, 6]], (10, 10, 10)))
  expected = [[10, 20, 30], [40, 50, 60]]
  np.testing.assert_allclose(read_seed_points(url), expected)
  saved = tmp_path / "link.txt"
  saved.write_text(url + "\n")
  np.testing.assert_allclose(read_seed_points(str(saved)), expected)


def test_points_added_to_the_runs_own_link():
  """A user opens the pipeline's link (nuclei layer at the run's resolution), and sends the
  link back as seeds: the points come back in nm."""
  nuclei = np.array([[800.0, 480.0, 1200.0], [160.0, 320.0, 400.0]])
  state = build_state(segmentation="gs://lab/run/segmentation", nuclei_nm=nuclei,
                      resolution_nm=(8, 8, 40))
  np.testing.assert_allclose(read_seed_points(state_to_url(state)), nuclei)
  assert state_json(state)["layers"][-1]["type"] == "annotation"


def test_legacy_state_with_voxel_size(tmp_path):
  path = tmp_path / "old.json"
  path.write_text(json.dumps({
    "navigation": {"pose": {"position": {"voxelSize": [4, 4, 40]}}},
    "layers": [{"type": "annotation", "name": "cells", "source": "local://annotations",
                "annotations": [{"type": "point", "id": "a", "point": [10, 10, 2]}]}]}))
  np.testing.assert_allclose(read_seed_points(str(path)), [[40, 40, 80]])


@pytest.mark.parametrize("content, message", [
  ("{not json", "not valid JSON"),
  (json.dumps({"layers": [{"type": "image", "source": "gs://b/em"}]}), "no point annotations"),
  (json.dumps({"dimensions": {"x": [1, "furlong"], "y": [1, "m"], "z": [1, "m"]},
               "layers": [{"type": "annotation", "annotations": []}]}), "unknown unit"),
  (json.dumps({"dimensions": {"x": [1e-9, "m"], "y": [1e-9, "m"], "t": [1, "s"]},
               "layers": [{"type": "annotation", "name": "c", "annotations": []}]}),
   "has no dimension z"),
  (json.dumps({"layers": {"cells": {"type": "pointAnnotation", "points": [[4, 2, 2]]}}}),
   "a Neuroglancer state this reader does not understand"),
  (json.dumps({"layers": [{"type": "annotation", "annotations": [{"type": "point"}]}]}),
   "does not understand .*KeyError"),
  (json.dumps({"layers": [{"type": "annotation", "name": "c", "source": [{
    "url": "local://annotations", "transform": {"matrix": [[2, 0, 0, 0], [0, 1, 0, 0],
                                                           [0, 0, 1, 0]]}}],
    "annotations": []}]}), "transform matrix"),
])
def test_bad_states(tmp_path, content, message):
  path = tmp_path / "state.json"
  path.write_text(content)
  with pytest.raises(IicatsError, match=message):
    read_seed_points(str(path))


def test_bad_inputs(tmp_path):
  with pytest.raises(IicatsError, match="no such file"):
    read_seed_points(str(tmp_path / "missing.csv"))
  path = tmp_path / "seeds.csv"
  path.write_text("a,b,c\n1,2,3\n")
  with pytest.raises(IicatsError, match="header x,y,z"):
    read_seed_points(str(path))
  with pytest.raises(IicatsError, match="not a Neuroglancer link"):
    read_seed_points("https://neuroglancer-demo.appspot.com/#!{broken")
