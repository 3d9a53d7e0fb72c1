"""One exception type for user mistakes: the CLI prints its message without a traceback."""
import os

import click


class IicatsError(click.ClickException):
  """A user-facing error: the message names the layer/path/file and the problem."""

  def __init__(self, message: str):
    super().__init__(message)


def check_output_path(path: str, option: str, folder: bool = False) -> str:
  """path, checked before the work whose result goes there: a file path must not be a folder
  and its folder must exist and be writable (folder=True: a folder path must not be a file,
  and is created later). Local paths only; an IicatsError names the option and the path."""
  full = os.path.abspath(os.path.expanduser(path))
  if folder:
    if os.path.exists(full) and not os.path.isdir(full):
      raise IicatsError(f"{option} {path}: is a file, expected a folder")
    return path
  if os.path.isdir(full):
    raise IicatsError(f"{option} {path}: is a folder; give a file path")
  parent = os.path.dirname(full)
  if not os.path.isdir(parent):
    raise IicatsError(f"{option} {path}: no such folder {parent}")
  if not os.access(parent, os.W_OK):
    raise IicatsError(f"{option} {path}: cannot write in {parent}")
  return path


def output_file_option(ctx, param, value):
  """click callback: check_output_path for an option naming an output file."""
  if value is None:
    return None
  return check_output_path(value, "--" + param.name.removesuffix("_path").replace("_", "-"))


class FiniteFloatRange(click.FloatRange):
  """click.FloatRange that also refuses NaN and ±inf, which its comparisons let through
  (`--threshold nan` ran an agglomeration that merged nothing)."""

  def convert(self, value, param, ctx):
    number = super().convert(value, param, ctx)
    if number != number or number in (float("inf"), float("-inf")):
      self.fail(f"{value} is not a finite number", param, ctx)
    return number
