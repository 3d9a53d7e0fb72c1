"""iicats-cv: II-CATS connectomics reconstruction over Neuroglancer precomputed layers.

Conventions used throughout the library:
- volumes are numpy arrays in (x, y, z) axis order, as CloudVolume returns them; multi-channel
  volumes are (c, x, y, z);
- physical positions and resolutions are in nanometres, (x, y, z);
- label 0 is background.
"""
__version__ = "0.1.0"
