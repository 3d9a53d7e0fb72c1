"""Igneous-style tasks (`iicats_cv.tasks`): thin, serialisable wrappers around `iicats_cv`."""
