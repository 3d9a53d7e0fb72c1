"""Igneous-style tasks (`iicats_cv.tasks`): thin, serialisable wrappers around `iicats_cv`.

Importing this package registers every task type with python-task-queue, so a worker
(`iicats execute QUEUE`) can run any task of the pipeline, Igneous' included.
"""
from . import igneous_stages, inference, segmentation  # noqa: F401
