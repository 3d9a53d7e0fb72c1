"""Queues and workers: python-task-queue with attempt counting and a dead-letter place.

python-task-queue retries a failing task forever; our workers count attempts per task and,
after `max_attempts`, move it to a dead-letter folder (fq://) so a stage fails visibly instead
of spinning. Supported queues: `fq://PATH` (local or shared filesystem), `sqs://…`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import threading
import time
import traceback

from cloudfiles import CloudFiles
from taskqueue import TaskQueue
from taskqueue.taskqueue import QueueEmptyError
from tqdm import tqdm

from iicats_cv.errors import IicatsError
from iicats_cv.layers import register_endpoint_aliases, resolve_cloudpath
from .common import put_json

PROTOCOLS = ("fq", "sqs")


_SQS_ENDPOINT = re.compile(r"^sqs://(https?://[^/]+)/([^/]+)$")


def check_queue_url(qurl: str) -> str:
  """qurl if it names a supported queue (fq://PATH, sqs://…), else an IicatsError."""
  if "://" not in qurl:
    raise IicatsError(f"queue '{qurl}': expected fq://PATH or sqs://QUEUE")
  protocol, rest = qurl.split("://", 1)
  if protocol not in PROTOCOLS:
    raise IicatsError(f"queue '{qurl}': unknown protocol '{protocol}://' "
                      f"(supported: {', '.join(p + '://' for p in PROTOCOLS)})")
  if not rest.strip("/"):
    raise IicatsError(f"queue '{qurl}': no {'path' if protocol == 'fq' else 'queue name'} "
                      f"after {protocol}://")
  return qurl


def open_queue(qurl: str, **kwargs) -> TaskQueue:
  """Open a queue with a clear error for unknown protocols or unreachable queues.

  `sqs://NAME` uses AWS; `sqs://http(s)://host:port/NAME` an SQS-compatible server (the
  endpoint goes to boto3 as endpoint_url, so every worker finds it from the queue URL alone).
  """
  check_queue_url(qurl)
  match = _SQS_ENDPOINT.match(qurl)
  target = qurl
  if match:
    kwargs.setdefault("endpoint_url", match.group(1))
    kwargs.setdefault("region_name", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    target = f"sqs://{match.group(2)}"
  try:
    return TaskQueue(target, progress=False, **kwargs)
  except Exception as err:
    raise IicatsError(f"queue '{qurl}': cannot open ({type(err).__name__}: {err})")


def _fq_dir(tq: TaskQueue) -> str | None:
  path = getattr(tq.api, "path", None)
  return str(path) if path and tq.path.protocol == "fq" else None


def dead_letter_dir(tq: TaskQueue) -> str:
  """fq:// keeps dead letters beside its tasks; other queues in a local folder per queue
  (~/.iicats/dead-letter/NAME), seen by a driver on the same machine as its workers."""
  base = _fq_dir(tq)
  if base:
    return os.path.join(base, "dead-letter")
  name = re.sub(r"[^\w.-]", "_", tq.path.path)
  return os.path.join(os.path.expanduser("~"), ".iicats", "dead-letter", name)


def dead_letters(qurl: str) -> list[str]:
  directory = dead_letter_dir(open_queue(qurl))
  if not os.path.isdir(directory):
    return []
  return sorted(os.listdir(directory))


def _record_failure(tq, task, err, attempts: dict, max_attempts: int) -> bool:
  """Count a failed attempt; returns True when the task was dead-lettered."""
  ident = str(getattr(task, "id", id(task)))
  key = ident.split("--")[-1]
  base = _fq_dir(tq)
  count_path = os.path.join(base, "attempts", key) if base else None
  if count_path:
    os.makedirs(os.path.dirname(count_path), exist_ok=True)
    with open(count_path, "a") as fh:
      fh.write(".")
    count = os.path.getsize(count_path)
  else:
    attempts[key] = attempts.get(key, 0) + 1
    count = attempts[key]
  if count < max_attempts:
    return False
  directory = dead_letter_dir(tq)
  os.makedirs(directory, exist_ok=True)
  payload = task.payload() if hasattr(task, "payload") else repr(task)
  letter = {"task": payload, "attempts": count, "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc()}
  with open(os.path.join(directory, f"{key}.json"), "w") as fh:
    json.dump(letter, fh, indent=1, default=str)
  state_prefix = (getattr(task, "kwargs", None) or {}).get("state_prefix")
  if state_prefix:
    # in the run's bucket too, where the driver sees it whatever machine this worker is on
    try:
      put_json(state_prefix, f"{DEAD_LETTER_PREFIX}{key}.json",
               json.loads(json.dumps(letter, default=str)))
    except Exception as bucket_err:
      print(f"note: could not write the dead letter to {state_prefix} "
            f"({type(bucket_err).__name__}: {bucket_err})", flush=True)
  tq.delete(task)
  return True


UNREADABLE_AFTER_SEC = 30  # a task file younger than this may still be being written


def set_aside_unreadable_tasks(tq: TaskQueue) -> int:
  """Move the fq:// queue's task files that are not JSON (a driver that died while inserting,
  a full disk) into the dead-letter folder, each with a letter naming the file; returns how
  many. python-task-queue leases such a file but hands out nothing, again after every
  lease, so a worker would wait on it forever and the driver with it. Files younger than
  UNREADABLE_AFTER_SEC are left: an insert may be writing them."""
  base = _fq_dir(tq)
  if not base or not os.path.isdir(os.path.join(base, "queue")):
    return 0
  now, moved = time.time(), 0
  for entry in os.scandir(os.path.join(base, "queue")):
    try:
      if now - entry.stat().st_mtime < UNREADABLE_AFTER_SEC:
        continue
      with open(entry.path, "rb") as fh:
        content = fh.read()
      json.loads(content)
      continue
    except FileNotFoundError:  # leased or done meanwhile
      continue
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
      problem = f"{type(err).__name__}: {err}"
    directory = dead_letter_dir(tq)
    os.makedirs(directory, exist_ok=True)
    key = entry.name.split("--")[-1].removesuffix(".json")
    # named by its task id: the file's name changes with every lease, and it is removed
    with open(os.path.join(directory, f"{key}.json"), "w") as fh:
      json.dump({"task": content[:10000].decode(errors="replace"), "attempts": 0,
                 "error": f"unreadable task file of task {key} in {base}/queue ({problem}); "
                          "its content is kept in this letter"}, fh, indent=1)
    with contextlib.suppress(FileNotFoundError):
      os.remove(entry.path)
      moved += 1
  return moved


def peak_memory_bytes() -> int | None:
  """This process's peak resident memory so far, in bytes (None where the OS does not say):
  for a worker process, the memory a machine must give it for the tasks it ran.

  On Linux the high-water mark of the process's own memory (VmHWM): ru_maxrss also keeps
  the peak of the process it was started from (the kernel carries it over fork and exec), so
  a worker spawned by a driver holding 1 GiB reported 1 GiB before running anything."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024  # kB
  except (OSError, ValueError, IndexError):
    pass
  try:
    import resource
  except ImportError:  # Windows
    return None
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB


def gib_text(size_bytes: float) -> str:
  return f"{size_bytes / 2 ** 30:.2f} GiB"


@contextlib.contextmanager
def _lease_kept(tq: TaskQueue, task, lease_sec: int):
  """Renew the task's lease every third of lease_sec while the block runs (python-task-queue
  leases for a fixed time, after which another worker would run the task again)."""
  done = threading.Event()

  def renew():
    while not done.wait(lease_sec / 3):
      try:
        tq.renew(task, lease_sec)
      except Exception as err:  # the task goes on; at worst another worker repeats it
        print(f"note: could not renew the lease of {task_label(task)} "
              f"({type(err).__name__}: {err})", flush=True)

  keeper = threading.Thread(target=renew, daemon=True)
  keeper.start()
  try:
    yield
  finally:
    done.set()
    keeper.join()


def _payload_text(task) -> str:
  try:
    return json.dumps(task.payload(), default=str)
  except Exception:
    return repr(task)


def execute(qurl: str, lease_sec: int = 600, exit_on_empty: bool = True,
            max_attempts: int = 3, quiet: bool = False, log_tasks: bool = False,
            after_task=None) -> dict:
  """Run tasks from a queue until it is empty (or forever without exit_on_empty).

  quiet: no line for a failed attempt; log_tasks: a line for each task done (a standalone
  worker's log; the pipeline's own workers report through its progress bar).
  after_task: called after each task that is done or dead-lettered (a driver that runs the
  tasks itself moves its progress bar there).

  Each task is deleted only after it succeeded; a failure releases the lease for a retry
  until max_attempts, then the task moves to the dead-letter folder. While a task runs its
  lease is renewed (_lease_kept), so a task longer than lease_sec is not handed to a second
  worker; a worker that dies stops renewing, and its task comes back lease_sec later.
  Returns {"executed", "failed", "dead"} counts for this worker.
  """
  import iicats_cv.tasks  # noqa: F401  (registers every task type)
  tq = open_queue(qurl)
  stats = {"executed": 0, "failed": 0, "dead": 0}
  attempts = {}
  next_scan = time.time()
  idle = 0  # leases in a row that found nothing
  while True:
    if exit_on_empty and tq.enqueued == 0:
      break  # before leasing: an empty SQS lease long-polls for 20 s
    try:
      task = tq.lease(seconds=int(lease_sec))
    except QueueEmptyError:
      if time.time() >= next_scan:  # nothing to lease: unreadable task files?
        next_scan = time.time() + 10
        unreadable = set_aside_unreadable_tasks(tq)
        if unreadable:
          stats["dead"] += unreadable
          if not quiet:
            print(f"note: {unreadable} unreadable task file(s) moved to "
                  f"{dead_letter_dir(tq)}", flush=True)
          continue
      if exit_on_empty and tq.enqueued == 0:
        break
      # the others' last tasks may end any moment: a stage's workers exit soon after them
      time.sleep(0.05 * 2 ** min(idle, 3))  # 50 ms, doubling to 0.4 s
      idle += 1
      continue
    idle = 0
    started = time.time()
    try:
      register_endpoint_aliases(_payload_text(task))
      with _lease_kept(tq, task, int(lease_sec)):
        task.execute()
    except Exception as err:  # a worker must survive a bad task
      stats["failed"] += 1
      if not quiet:
        print(f"task failed: {type(err).__name__}: {err}", flush=True)
      # a user mistake that the task's validation caught fails the same way every time
      if _record_failure(tq, task, err, attempts,
                         1 if isinstance(err, IicatsError) else max_attempts):
        stats["dead"] += 1
        if after_task:
          after_task()
      else:
        try:
          tq.cancel(task)  # back on the queue now, not after the lease
        except Exception:
          pass
      continue
    tq.delete(task, tally=True)
    stats["executed"] += 1
    if after_task:
      after_task()
    if log_tasks:
      peak = peak_memory_bytes()
      print(f"{task_label(task)} done in {time.time() - started:.1f} s"
            + (f" (worker peak memory {gib_text(peak)})" if peak else ""), flush=True)
  return stats


def task_label(task) -> str:
  """A task's kind and block for a worker's log: 'inference_task 0_128_0',
  'MeshTask 0_0_0', or the kind alone."""
  if hasattr(task, "key") and task.key[-1] == "igneous_task":  # an Igneous task of a run
    from taskqueue.queueables import totask
    return task_label(totask(copy.deepcopy(task.kwargs["payload"])))
  if hasattr(task, "key"):  # python-task-queue's FunctionTask: our tasks
    name, fields = task.key[-1], task.kwargs
  else:  # a RegisteredTask: Igneous'
    name, fields = type(task).__name__, getattr(task, "_args", {})
  start = fields.get("start", fields.get("offset"))
  if start is None:
    return name
  return f"{name} " + "_".join(str(int(v)) for v in start)


def _worker(qurl, lease_sec, max_attempts, exit_on_empty=True, standalone=False, report=None,
            environment=None):
  """One worker process: the pipeline's own (quiet, gone when the stage's queue is empty), or
  one of `iicats execute -p N` (standalone: it logs each task and failure, and waits for more
  work between stages unless told to exit on empty). `report`: a queue that gets the
  process's peak memory (bytes) when it is done. environment: the driver's os.environ now
  (a fork server's children inherit the environment it started with, which credentials or
  endpoints set since would be missing from)."""
  import signal
  # Ctrl-C reaches the whole process group: the driver stops its workers itself
  # (workers_stopped_on_exit), without a traceback from each
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if environment is not None:
    for key in set(os.environ) - set(environment):
      del os.environ[key]
    os.environ.update(environment)
  from . import inference
  inference.TORCH_THREADS = 1
  execute(qurl, lease_sec=lease_sec, exit_on_empty=exit_on_empty, max_attempts=max_attempts,
          quiet=not standalone, log_tasks=standalone)
  if report is not None:
    report.put(peak_memory_bytes())


def _worker_context():
  """Where the OS has it, a fork server that imported the task modules once: each stage's
  workers are forked from it, where spawned ones spent about 2.5 s a stage importing NumPy,
  CloudVolume and Igneous (`iicats pipeline -p 2` on a 96×96×64 volume: 45.5 s against
  8.4 s with -p 1). The server is one process of its own, started without the driver's
  threads, so forking it is safe; PyTorch is not among its imports (only inference workers
  import it, after the fork). Each child still runs the driver's main script, as spawned
  ones do (Python 3.11's fork server does not preload '__main__'): for `iicats` that is
  the CLI module, preloaded here too. Elsewhere: spawn."""
  import tempfile
  # the server listens on TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX: a Unix socket path, of at
  # most 107 bytes on Linux (a scheduler's job TMPDIR can be longer)
  too_long = len(os.path.join(tempfile.gettempdir(), "pymp-12345678", "listener-12345678")) > 100
  if "forkserver" not in multiprocessing.get_all_start_methods() or too_long:
    return multiprocessing.get_context("spawn")
  ctx = multiprocessing.get_context("forkserver")
  preload = ["__main__", "iicats_cv.cli", "iicats_cv.tasks", "iicats_cv.tasks.runner"]
  if getattr(sys.modules["__main__"].__spec__, "name", None) == "iicats_cv.cli":
    # `python -m iicats_cv.cli`: each child runs the module as its main itself, and warns
    # (RuntimeWarning from runpy) when the server had already imported it
    preload.remove("iicats_cv.cli")
  ctx.set_forkserver_preload(preload)
  return ctx


def start_workers(n: int, qurl: str, lease_sec: int, max_attempts: int,
                  exit_on_empty: bool = True, standalone: bool = False):
  """Start n worker processes on qurl -> (processes, report: the queue of their peak memory,
  read with largest_peak once they have exited)."""
  ctx = _worker_context()
  report = ctx.SimpleQueue()
  procs = [ctx.Process(target=_worker, args=(qurl, lease_sec, max_attempts, exit_on_empty,
                                             standalone, report, dict(os.environ)))
           for _ in range(n)]
  for proc in procs:
    proc.start()
  return procs, report


@contextlib.contextmanager
def workers_stopped_on_exit(procs):
  """Terminate the worker processes of start_workers when the block ends in an exception: a
  Ctrl-C (which they ignore), a SIGTERM to this process (turned into SystemExit here), a
  failed stage. Their leased tasks come back when the leases expire. Without this, workers
  of an interrupted `iicats execute -p N` lived on for ever, waiting for tasks."""
  import signal
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
  try:
    yield
  except BaseException:
    for proc in procs:
      if proc.is_alive():
        proc.terminate()
    for proc in procs:
      proc.join(10)
    raise
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def largest_peak(report) -> int | None:
  """The largest peak memory (bytes) the exited workers of start_workers reported."""
  peaks = []
  while not report.empty():
    peaks.append(report.get())
  return max((p for p in peaks if p), default=None)


DEAD_LETTER_PREFIX = "dead-letter/"  # under a run's state prefix (OUT/pipeline/)


def _run_dead_letters(state_prefix: str | None) -> set:
  if not state_prefix:
    return set()
  return set(CloudFiles(resolve_cloudpath(state_prefix)).list(prefix=DEAD_LETTER_PREFIX))


def ended_workers_text(procs) -> str:
  """How worker processes ended, from their exit codes (negative: the signal that ended
  them), counted: 'killed by SIGKILL (2), crashed with SIGSEGV (1)', with a hint on memory
  where the kernel's out-of-memory killer is the likely cause."""
  import signal
  counts = {}
  for proc in procs:
    code = proc.exitcode
    if code is not None and code < 0:
      try:
        name = signal.Signals(-code).name
      except ValueError:
        name = f"signal {-code}"
      text = f"crashed with {name}" if name in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL") \
        else f"killed by {name}"
    else:
      text = f"exit status {code}"
    counts[text] = counts.get(text, 0) + 1
  line = ", ".join(f"{text} ({n})" for text, n in counts.items())
  if "killed by SIGKILL" in counts:
    line += (" (SIGKILL is usually the out-of-memory killer: fewer workers (-p) or a smaller "
             "--task-shape; `iicats design` gives each stage's memory per worker)")
  return line


def drain(qurl: str, total: int, parallel: int = 1, desc: str = "tasks", lease_sec: int = 600,
          max_attempts: int = 3, wait_for_external: bool = False,
          poll_sec: float | None = None, state_prefix: str | None = None):
  """Run (parallel ≥ 1) or wait for external workers to run (wait_for_external) every task
  of the queue, with a progress bar over the queue's remaining count. A task that failed for
  good fails the stage: its dead letter is found beside the queue (fq://), on this machine,
  or (tasks of a run) under state_prefix, where workers on any machine write it: a worker
  deletes such a task from the queue, so an empty queue alone does not say all went well.

  Returns the largest peak memory (bytes) of the worker processes it started (parallel ≥ 2),
  else None: a single worker runs in this process, whose peak is not the stage's alone.
  """
  tq = open_queue(qurl)
  if poll_sec is None:  # an fq:// count is a directory listing; SQS's is a billed request
    poll_sec = 0.2 if _fq_dir(tq) else 1.0
  dead_before = set(dead_letters(qurl))
  run_dead_before = _run_dead_letters(state_prefix)
  bar = tqdm(total=total, desc=desc, unit="task", leave=False)
  procs = []
  if not wait_for_external:
    if parallel <= 1:
      # one step per task, not a count of the queue: listing a file queue of N tasks after
      # each task would cost N² directory entries
      execute(qurl, lease_sec=lease_sec, max_attempts=max_attempts,
              after_task=lambda: bar.update(1) if bar.n < total else None)
    else:
      procs, report = start_workers(parallel, qurl, lease_sec, max_attempts)
  with workers_stopped_on_exit(procs):
    while True:
      remaining = tq.enqueued
      bar.update(max(0, total - remaining) - bar.n)
      if remaining == 0:
        break
      alive = [p.sentinel for p in procs if p.is_alive()]
      if procs and not alive:
        bar.close()  # before the message, which a bar's last redraw would overwrite
        # a worker only leaves a non-empty queue when it dies; its leased task would wait
        raise IicatsError(f"{desc}: all {len(procs)} worker processes ended with {remaining} "
                          f"task(s) left on {qurl}: {ended_workers_text(procs)}")
      if alive:  # they exit once the queue is empty: no need to wait for the next poll
        multiprocessing.connection.wait(alive, timeout=poll_sec)
      else:
        time.sleep(poll_sec)
    for proc in procs:
      proc.join()
  bar.close()
  dead = set(dead_letters(qurl)) - dead_before
  if dead:
    directory = dead_letter_dir(open_queue(qurl))
    first = _letter_text(lambda name: _read_text(os.path.join(directory, name)), dead)
    raise IicatsError(f"{desc}: {len(dead)} task(s) failed ({first}); see {directory}")
  run_dead = _run_dead_letters(state_prefix) - run_dead_before
  if run_dead:
    files = CloudFiles(resolve_cloudpath(state_prefix))
    first = _letter_text(lambda name: files.get(name).decode(), run_dead)
    raise IicatsError(f"{desc}: {len(run_dead)} task(s) failed on a worker ({first}); see "
                      f"{state_prefix.rstrip('/')}/{DEAD_LETTER_PREFIX}")
  return largest_peak(report) if procs else None


def _read_text(path: str) -> str:
  with open(path) as fh:
    return fh.read()


def _letter_text(read, names) -> str:
  """The error of one dead letter and its attempts, for the one-line failure message."""
  try:
    letter = json.loads(read(sorted(names)[0]))
    return f"{letter['error'].splitlines()[0]}; attempts: {letter['attempts']}"
  except (OSError, ValueError, KeyError, IndexError, AttributeError):
    return "error unreadable"


def run_tasks(tasks, queue: str | None, parallel: int | None, desc: str = "tasks",
              lease_sec: int = 600, state_prefix: str | None = None) -> int | None:
  """Insert tasks and see them done: on a private fq:// queue with local workers when no queue
  is given, by `parallel` local workers, or (queue and parallel None or 0) by external
  workers.
  Returns the largest peak memory (bytes) of the local worker processes (see drain), or None.
  """
  tasks = list(tasks)  # task creation may fail: before a private queue exists
  private = None
  if queue is None:
    import tempfile
    private = tempfile.mkdtemp(prefix="iicats-queue-")
    queue = "fq://" + private
    parallel = parallel or 1
  peak = None
  try:
    if tasks:
      # the fq insert counter costs ~1 s of lock retries per insert here, and nothing reads it
      # a local file queue needs no insert threads, whose pool polls every 0.1 s to finish
      threads = {"n_threads": 0} if queue.startswith("fq://") else {}
      tq = open_queue(queue, **threads)
      waiting = tq.enqueued
      if waiting:
        print(f"note: queue {queue} already holds {waiting} task(s) (an interrupted run's?); "
              "this stage waits for them too, leased ones once their leases expire "
              f"(`iicats queue release {queue}` frees the leases of workers that are gone, "
              f"`iicats queue purge {queue}` drops the tasks)", flush=True)
      tq.insert(tasks, skip_insert_counter=True)
      if parallel:
        # a worker more than the tasks only races the others for their leases (python-task-
        # queue's file queue retries a lost race with random back-off: 1.5-3.5 s stalls)
        parallel = min(parallel, len(tasks))
      who = f"{parallel} local worker(s)" if parallel else "external workers"
      print(f"[{desc}] {len(tasks)} task(s) on {queue} for {who}", flush=True)
      peak = drain(queue, len(tasks), parallel=parallel or 1, desc=desc, lease_sec=lease_sec,
                   wait_for_external=not parallel, state_prefix=state_prefix)
  finally:
    if private:
      _remove_private_queue(private)
  return peak


def _remove_private_queue(folder: str) -> None:
  """Delete a private queue, all but its dead letters, which a failed stage's message names."""
  import shutil
  letters = os.path.join(folder, "dead-letter")
  if not (os.path.isdir(letters) and os.listdir(letters)):
    shutil.rmtree(folder, ignore_errors=True)
    return
  for entry in os.scandir(folder):
    if entry.name != "dead-letter":
      if entry.is_dir():
        shutil.rmtree(entry.path, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(entry.path)
