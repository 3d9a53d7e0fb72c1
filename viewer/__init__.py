"""Neuroglancer state/link generation and the local viewer server (`iicats_cv.viewer`)."""
