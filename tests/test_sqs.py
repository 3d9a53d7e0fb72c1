"""sqs:// queues against an SQS-compatible server on loopback (moto's server)."""
import os
import shutil
import socket
import subprocess
import sys
import time
from functools import partial

import pytest

from iicats_cv.tasks.runner import open_queue, execute, run_tasks
from test_queue import touch_task


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sqs_endpoint(tmp_path_factory):
  beside = os.path.join(os.path.dirname(sys.executable), "moto_server")
  server = beside if os.access(beside, os.X_OK) else shutil.which("moto_server")
  if server is None:
    pytest.skip("moto_server (pip package moto[server], a test extra) is not installed")
  port = _free_port()
  log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
  proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                          stderr=subprocess.STDOUT)
  endpoint = f"http://127.0.0.1:{port}"
  import boto3
  env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
         "AWS_SESSION_TOKEN": "", "AWS_DEFAULT_REGION": "us-east-1"}
  mp = pytest.MonkeyPatch()
  for key, value in env.items():
    mp.setenv(key, value)
  client = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
  deadline = time.time() + 30
  while True:
    try:
      client.list_queues()
      break
    except Exception:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("moto_server did not start")
      time.sleep(0.3)
  yield endpoint, client
  proc.terminate()
  proc.wait(timeout=10)
  log.close()
  mp.undo()


def test_sqs_queue_runs_tasks_through_endpoint_url(sqs_endpoint, tmp_path):
  endpoint, client = sqs_endpoint
  client.create_queue(QueueName="iicats-test", Attributes={"VisibilityTimeout": "30"})
  qurl = f"sqs://{endpoint}/iicats-test"
  tq = open_queue(qurl)
  tq.insert([partial(touch_task, path=str(tmp_path / f"t{i}")) for i in range(4)])
  assert tq.enqueued == 4
  stats = execute(qurl, lease_sec=30)
  assert stats["executed"] == 4 and tq.enqueued == 0
  assert all((tmp_path / f"t{i}").read_text() == "x" for i in range(4))


def test_sqs_queue_status_and_worker_cli(sqs_endpoint, tmp_path):
  from click.testing import CliRunner
  from iicats_cv.cli import cli
  endpoint, client = sqs_endpoint
  client.create_queue(QueueName="iicats-cli", Attributes={"VisibilityTimeout": "30"})
  qurl = f"sqs://{endpoint}/iicats-cli"
  run_tasks([], qurl, None)  # nothing to do: returns at once
  open_queue(qurl).insert([partial(touch_task, path=str(tmp_path / "c"))])
  runner = CliRunner()
  assert "enqueued:  1" in runner.invoke(cli, ["queue", "status", qurl]).output
  result = runner.invoke(cli, ["execute", qurl, "-x"])
  assert result.exit_code == 0 and "1 task(s) executed" in result.output
  assert (tmp_path / "c").read_text() == "x"
