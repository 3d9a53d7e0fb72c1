"""Queues and workers: fq:// round trip, attempts + dead letter, CLI verbs, bad protocols."""
from functools import partial

import numpy as np
import pytest
from click.testing import CliRunner
from taskqueue import queueable

from iicats_cv.cli import cli
from iicats_cv.errors import IicatsError
from iicats_cv.tasks.runner import (dead_letters, execute, open_queue, peak_memory_bytes,
                                    run_tasks)


@queueable
def touch_task(path: str):
  with open(path, "a") as fh:
    fh.write("x")


@queueable
def failing_task(path: str):
  with open(path, "a") as fh:
    fh.write("x")
  raise RuntimeError("this task always fails")


@queueable
def invalid_input_task(path: str):
  with open(path, "a") as fh:
    fh.write("x")
  raise IicatsError("file:///nowhere: no such layer")


def test_tasks_run_once_each(tmp_path):
  qurl = "fq://" + str(tmp_path / "queue")
  tq = open_queue(qurl)
  tq.insert([partial(touch_task, path=str(tmp_path / f"out{i}")) for i in range(5)])
  stats = execute(qurl, exit_on_empty=True)
  assert stats == {"executed": 5, "failed": 0, "dead": 0}
  assert all((tmp_path / f"out{i}").read_text() == "x" for i in range(5))
  assert tq.enqueued == 0 and tq.completed == 5


@queueable
def slow_task(path: str, seconds: float):
  import time
  time.sleep(seconds)
  with open(path, "a") as fh:
    fh.write("x")


def test_a_task_longer_than_its_lease_is_not_handed_to_a_second_worker(tmp_path):
  """The worker renews the lease while the task runs: a second worker finds nothing to lease
  after the first lease would have expired, and the task runs once."""
  import threading
  import time
  from taskqueue.taskqueue import QueueEmptyError
  qurl = "fq://" + str(tmp_path / "queue")
  open_queue(qurl).insert([partial(slow_task, path=str(tmp_path / "out"), seconds=5)])
  # fq:// leases end on whole seconds: 3 s leases renewed every second never lapse
  worker = threading.Thread(target=execute, args=(qurl,), kwargs={"lease_sec": 3})
  worker.start()
  time.sleep(4)  # the first lease has run out
  with pytest.raises(QueueEmptyError):
    open_queue(qurl).lease(seconds=1)
  worker.join()
  assert (tmp_path / "out").read_text() == "x"
  assert open_queue(qurl).enqueued == 0


def test_failing_task_is_dead_lettered_after_attempts(tmp_path):
  qurl = "fq://" + str(tmp_path / "queue")
  open_queue(qurl).insert([partial(failing_task, path=str(tmp_path / "tries"))])
  stats = execute(qurl, exit_on_empty=True, max_attempts=3, quiet=True)
  assert stats["dead"] == 1 and stats["failed"] == 3
  assert (tmp_path / "tries").read_text() == "xxx"
  assert len(dead_letters(qurl)) == 1


def test_run_tasks_reports_dead_letters(tmp_path):
  with pytest.raises(IicatsError, match="failed .*this task always fails; attempts: 3"):
    run_tasks([partial(failing_task, path=str(tmp_path / "t"))],
              "fq://" + str(tmp_path / "q"), 1)
  # a user mistake caught by a task's validation is not retried
  with pytest.raises(IicatsError, match="failed .*no such layer; attempts: 1"):
    run_tasks([partial(invalid_input_task, path=str(tmp_path / "v"))],
              "fq://" + str(tmp_path / "q2"), 1)
  assert (tmp_path / "v").read_text() == "x"


def test_local_worker_processes_report_their_peak_memory(tmp_path):
  """What `-p N` workers needed, for sizing a fleet's: the largest process's peak, in bytes."""
  import numpy as np
  from iicats_cv.layers import create_layer
  from iicats_cv.tasks.segmentation import create_watershed_tasks
  affinities = "file://" + str(tmp_path / "affinities")
  create_layer(affinities, layer_type="image", dtype="float32", resolution=(10, 10, 10),
               voxel_offset=(0, 0, 0), volume_size=(64, 64, 32), chunk_size=(32, 32, 32),
               num_channels=3, step="test")[:, :, :] = \
    np.random.default_rng(0).random((64, 64, 32, 3), dtype=np.float32)
  tasks = create_watershed_tasks(affinities, "file://" + str(tmp_path / "supervoxels"),
                                 (32, 32, 32), chunk_size=(32, 32, 32))
  peak = run_tasks(tasks, "fq://" + str(tmp_path / "q"), 2)
  # a worker process holds numpy, torch and CloudVolume: hundreds of MiB, not KiB
  assert 100 * 2 ** 20 < peak < 8 * 2 ** 30
  # one worker runs in the calling process, whose peak is not the tasks' alone
  tasks = create_watershed_tasks(affinities, "file://" + str(tmp_path / "supervoxels1"),
                                 (32, 32, 32), chunk_size=(32, 32, 32))
  assert run_tasks(tasks, "fq://" + str(tmp_path / "q1"), 1) is None


@queueable
def failing_run_task(path: str, state_prefix: str = ""):
  raise IicatsError(f"{path}: no such layer")


def test_a_task_that_failed_on_another_machine_fails_the_stage(tmp_path, monkeypatch):
  """A worker deletes a dead-lettered task from the queue, so the driver of an SQS fleet saw
  an empty queue and went on; the run's tasks now leave their dead letter in the run's
  bucket too, where the driver finds it whatever machine the worker was on."""
  from iicats_cv.tasks import runner
  state = "file://" + str(tmp_path / "run" / "pipeline")
  monkeypatch.setattr(runner, "dead_letters", lambda qurl: [])  # another machine's folder
  with pytest.raises(IicatsError, match=r"1 task\(s\) failed on a worker \(IicatsError: "
                     r"file:///nowhere: no such layer; attempts: 1\); see "
                     + state + "/dead-letter/"):
    run_tasks([partial(failing_run_task, path="file:///nowhere", state_prefix=state)],
              "fq://" + str(tmp_path / "q"), 1, state_prefix=state)


def test_igneous_tasks_of_a_run_leave_their_dead_letter_in_the_run(tmp_path, monkeypatch):
  """Meshes, skeletons and mips come from Igneous' tasks: the pipeline queues them wrapped
  with the run's state prefix, so one that fails on another machine fails its stage too."""
  import shutil
  import numpy as np
  from iicats_cv.layers import create_layer
  from iicats_cv.tasks import igneous_stages as ig, runner
  from iicats_cv.tasks.runner import task_label
  from taskqueue.queueables import totask
  path = "file://" + str(tmp_path / "seg")
  create_layer(path, layer_type="segmentation", dtype="uint32", resolution=(8, 8, 8),
               voxel_offset=(0, 0, 0), volume_size=(32, 32, 32), chunk_size=(32, 32, 32),
               step="test")[:, :, :] = np.ones((32, 32, 32), np.uint32)
  state = "file://" + str(tmp_path / "run" / "pipeline")
  tasks = ig.in_run(ig.mesh_tasks(path, (32, 32, 32)), state)
  assert task_label(totask(tasks[0])) == "MeshTask 0_0_0"  # what a worker logs
  shutil.rmtree(tmp_path / "seg")  # gone before a worker gets to it
  monkeypatch.setattr(runner, "dead_letters", lambda qurl: [])  # another machine's folder
  with pytest.raises(IicatsError, match="1 task\\(s\\) failed on a worker"):
    run_tasks(tasks, "fq://" + str(tmp_path / "q"), 1, state_prefix=state)


def test_unknown_queue_protocol_is_one_clear_error():
  with pytest.raises(IicatsError, match="unknown protocol 'redis://'"):
    open_queue("redis://localhost/queue")
  result = CliRunner().invoke(cli, ["queue", "status", "kafka://x"])
  assert result.exit_code != 0
  assert "unknown protocol 'kafka://'" in result.output
  assert "Traceback" not in result.output


def test_cli_execute_and_status(tmp_path):
  qurl = "fq://" + str(tmp_path / "queue")
  open_queue(qurl).insert([partial(touch_task, path=str(tmp_path / "a"))])
  runner = CliRunner()
  status = runner.invoke(cli, ["queue", "status", qurl])
  assert status.exit_code == 0 and "enqueued:  1" in status.output
  result = runner.invoke(cli, ["execute", qurl, "-x"])
  assert result.exit_code == 0, result.output
  assert "1 task(s) executed" in result.output
  assert "touch_task done in" in result.output  # a worker logs each task
  assert "(worker peak memory " in result.output and "; peak memory " in result.output
  status = runner.invoke(cli, ["queue", "status", qurl])
  assert "enqueued:  0" in status.output and "completed: 1" in status.output
  assert "does not exist yet" not in result.output


def test_a_worker_on_a_file_queue_that_does_not_exist_says_so(tmp_path):
  """python-task-queue creates a missing fq:// folder, so a mistyped path would leave a worker
  waiting on an empty queue without a word."""
  qurl = "fq://" + str(tmp_path / "typo")
  result = CliRunner().invoke(cli, ["execute", qurl, "-x"])
  assert result.exit_code == 0, result.output
  assert f"note: queue {qurl} does not exist yet" in result.output
  assert "0 task(s) executed" in result.output


def test_every_command_has_help_with_example():
  runner = CliRunner()
  for command in ("import", "pipeline", "demo", "execute", "train", "infer", "synthetic"):
    result = runner.invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output, command


def test_worker_processes_wait_between_stages_unless_told_to_exit(monkeypatch):
  """`iicats execute Q -p N` on a fleet node: the queue is empty while the driver creates the
  next stage's tasks, so its processes may only exit on empty with -x."""
  import multiprocessing
  started = []

  class FakeProcess:
    exitcode = 0

    def __init__(self, target, args):
      started.append(args)

    def start(self):
      pass

    def join(self):
      pass

  class Context:
    Process = FakeProcess
    SimpleQueue = multiprocessing.SimpleQueue

    def set_forkserver_preload(self, modules):
      pass

  monkeypatch.setattr(multiprocessing, "get_context", lambda method: Context())
  for flags, exit_on_empty in (([], False), (["-x"], True)):
    started.clear()
    result = CliRunner().invoke(cli, ["execute", "fq:///tmp/unused", "-p", "2", *flags])
    assert result.exit_code == 0, result.output
    assert len(started) == 2
    assert all(args[3] is exit_on_empty and args[4] is True for args in started)


def test_parallel_zero_leaves_the_tasks_to_external_workers(tmp_path):
  """`iicats pipeline --queue Q -p 0`: the driver only queues and waits."""
  import threading
  import time
  qurl = "fq://" + str(tmp_path / "queue")
  external = []

  def worker():  # starts once the tasks are queued
    time.sleep(1.0)
    external.append(execute(qurl, exit_on_empty=True, quiet=True))

  thread = threading.Thread(target=worker)
  thread.start()
  run_tasks([partial(touch_task, path=str(tmp_path / f"out{i}")) for i in range(3)], qurl, 0)
  thread.join()
  assert external == [{"executed": 3, "failed": 0, "dead": 0}]


def test_a_stage_says_when_its_queue_already_holds_tasks(tmp_path, capsys):
  qurl = "fq://" + str(tmp_path / "queue")
  open_queue(qurl).insert([partial(touch_task, path=str(tmp_path / "stale"))])
  run_tasks([partial(touch_task, path=str(tmp_path / "new"))], qurl, 1)
  assert "already holds 1 task(s)" in capsys.readouterr().out
  assert (tmp_path / "stale").exists() and (tmp_path / "new").exists()


def test_a_spawned_workers_peak_memory_is_its_own_not_its_drivers():
  """ru_maxrss carries the parent's peak over fork and exec: a worker spawned by a driver
  holding 1.5 GiB reported 1.5 GiB before it ran anything."""
  import multiprocessing
  from concurrent.futures import ProcessPoolExecutor
  held = np.ones(int(1.5 * 2 ** 30) // 8)
  with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
    peak = pool.submit(peak_memory_bytes).result()
  assert held.all() and 0 < peak < 2 ** 30


def test_workers_that_died_are_described_by_how_they_ended():
  """Worker processes killed (the out-of-memory killer sends SIGKILL) or crashed stop the
  stage with one line saying how each ended, and what a SIGKILL usually means."""
  from types import SimpleNamespace
  from iicats_cv.tasks.runner import ended_workers_text
  procs = [SimpleNamespace(exitcode=code) for code in (-9, -9, -11, 1)]
  text = ended_workers_text(procs)
  assert text.startswith("killed by SIGKILL (2), crashed with SIGSEGV (1), exit status 1 (1)")
  assert "out-of-memory" in text and "iicats design" in text
  assert "out-of-memory" not in ended_workers_text([SimpleNamespace(exitcode=-11)])


def test_queue_release_frees_the_leases_of_workers_that_are_gone(tmp_path):
  """A task leased by a worker that died waits for its lease; `iicats queue release` puts it
  back at once (fq://), and an SQS queue is told why it cannot."""
  qurl = "fq://" + str(tmp_path / "queue")
  tq = open_queue(qurl)
  tq.insert([partial(touch_task, path=str(tmp_path / f"out{i}")) for i in range(2)])
  tq.lease(seconds=3600)  # the worker that took it is gone
  assert tq.leased == 1
  result = CliRunner().invoke(cli, ["queue", "release", qurl])
  assert result.exit_code == 0, result.output
  assert "released 1 leased task(s)" in result.output and "2 task(s) enqueued" in result.output
  assert tq.leased == 0
  assert execute(qurl, exit_on_empty=True)["executed"] == 2
  assert (tmp_path / "out0").exists() and (tmp_path / "out1").exists()
  result = CliRunner().invoke(cli, ["queue", "release", "sqs://some-queue"])
  assert result.exit_code != 0 and "only fq:// queues" in result.output


def test_an_unreadable_task_file_is_dead_lettered_not_waited_on(tmp_path):
  """python-task-queue leases a task file that is not JSON (a driver that died while
  inserting) and hands out nothing, again and again: a worker waited forever. Such a file
  goes to the dead-letter folder, named; a younger one may still be being written."""
  import os
  import time
  qurl = "fq://" + str(tmp_path / "queue")
  tq = open_queue(qurl)
  tq.insert([partial(touch_task, path=str(tmp_path / "a")),
             partial(touch_task, path=str(tmp_path / "b"))])
  broken = sorted((tmp_path / "queue" / "queue").iterdir())[0]
  broken.write_text('{"payload": {"fn"')
  old = time.time() - 120
  os.utime(broken, (old, old))
  stats = execute(qurl, exit_on_empty=True, quiet=True)
  assert stats == {"executed": 1, "failed": 0, "dead": 1}
  letters = dead_letters(qurl)
  assert len(letters) == 1 and tq.enqueued == 0
  letter = (tmp_path / "queue" / "dead-letter" / letters[0]).read_text()
  assert "unreadable task file of task " + broken.stem.split("--")[1] in letter


def test_queue_commands_refuse_a_missing_folder_a_layer_or_no_path(tmp_path):
  """`queue status` (and release, purge) created python-task-queue's folders wherever they
  were pointed: in a mistyped path, or inside a precomputed layer."""
  layer = tmp_path / "layer"
  layer.mkdir()
  (layer / "info").write_text("{}")
  for args, message in [(["status", f"fq://{tmp_path}/typo"], "no such folder"),
                        (["purge", f"fq://{layer}"], "is a precomputed layer"),
                        (["release", f"fq://{layer}"], "is a precomputed layer"),
                        (["status", "fq://"], "no path after fq://")]:
    result = CliRunner().invoke(cli, ["queue", *args])
    assert result.exit_code != 0 and message in result.output, result.output
  assert not (tmp_path / "typo").exists() and sorted(p.name for p in layer.iterdir()) == ["info"]


def test_a_failed_stage_on_a_private_queue_keeps_the_dead_letters_it_names(tmp_path):
  import os
  import re
  with pytest.raises(IicatsError) as failure:
    run_tasks([partial(failing_task, path=str(tmp_path / "t"))], None, 1)
  folder = re.search(r"see (\S+)$", str(failure.value)).group(1)
  assert os.listdir(folder) and os.listdir(os.path.dirname(folder)) == ["dead-letter"]


def test_workers_of_other_stages_do_not_import_torch():
  """A worker process imports every task type; only inference's need PyTorch, whose import
  took 1.2 s of the 2.1 s a worker spent starting, in every stage."""
  import subprocess
  import sys
  code = "import sys, iicats_cv.tasks; print('torch' in sys.modules)"
  assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=True).stdout.strip() == "False"


def test_a_driver_that_runs_the_tasks_itself_hears_of_each(tmp_path):
  qurl = "fq://" + str(tmp_path / "queue")
  open_queue(qurl).insert([partial(touch_task, path=str(tmp_path / f"t{i}")) for i in range(3)]
                          + [partial(invalid_input_task, path=str(tmp_path / "v"))])
  heard = []
  stats = execute(qurl, quiet=True, after_task=lambda: heard.append(1))
  assert stats["executed"] == 3 and stats["dead"] == 1 and len(heard) == 4


def test_local_workers_see_the_drivers_environment_of_now(tmp_path, monkeypatch):
  """Workers are forked from a fork server started with the driver's first stage; credentials
  or endpoints set in the driver since then must reach them: each gets os.environ of now and
  makes it its own."""
  import os
  from iicats_cv.tasks.runner import _worker
  monkeypatch.setenv("IICATS_TEST_STALE", "1")
  monkeypatch.setenv("IICATS_TEST_CREDENTIAL", "new")
  environment = {k: v for k, v in os.environ.items() if k != "IICATS_TEST_STALE"}
  qurl = "fq://" + str(tmp_path / "empty")
  open_queue(qurl)
  _worker(qurl, 60, 1, environment=environment)  # as a worker process would, in this one
  assert os.environ.get("IICATS_TEST_CREDENTIAL") == "new"
  assert "IICATS_TEST_STALE" not in os.environ


def test_an_idle_worker_backs_off_without_end(tmp_path, monkeypatch):
  """A worker with nothing to lease sleeps 50 ms, doubling to 0.4 s: the doubling once
  overflowed a float after 8.5 minutes idle (2 ** 1024) and the worker died."""
  import iicats_cv.tasks.runner as runner
  naps = []

  class Enough(Exception):
    pass

  def nap(seconds):
    naps.append(seconds)
    if len(naps) > 1100:
      raise Enough

  monkeypatch.setattr(runner.time, "sleep", nap)
  qurl = "fq://" + str(tmp_path / "idle")
  open_queue(qurl)
  with pytest.raises(Enough):
    execute(qurl, exit_on_empty=False)
  assert naps[:4] == [0.05, 0.1, 0.2, 0.4] and max(naps) == 0.4
