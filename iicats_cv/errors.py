"""One exception type for user mistakes: the CLI prints its message without a traceback."""
import click


class IicatsError(click.ClickException):
  """A user-facing error: the message names the layer/path/file and the problem."""

  def __init__(self, message: str):
    super().__init__(message)
