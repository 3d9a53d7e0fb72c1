"""Shared ending of every benchmark: the JSON result, a one-line summary, optionally a file."""
import json


def report(result: dict, summary: str, json_path: str | None = None) -> None:
  print(json.dumps(result, indent=1))
  print(summary)
  if json_path:
    with open(json_path, "w") as fh:
      json.dump(result, fh, indent=1)
