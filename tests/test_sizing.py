"""The worker-memory estimate printed before a run (tasks/sizing.py). The constants are
measured by benchmarks/task_memory.py; these tests check how the estimate follows the task
shape, the context and the volume, and when a run is warned."""
import numpy as np
from click.testing import CliRunner

from iicats_cv.cli import cli
from iicats_cv.tasks import sizing
from iicats_cv.tasks.sizing import GIB, memory_plan, task_memory, worker_memory
from iicats_cv.volume_io import import_volume


def test_every_stage_grows_with_the_task_shape():
  small, large = (task_memory((s, s, s), (10, 10, 10)) for s in (64, 256))
  assert set(small) == set(sizing.STAGES)
  for stage in sizing.STAGES:
    assert sizing.FIXED[stage] < small[stage] < large[stage], stage


def test_the_watershed_counts_its_context_and_the_volume_clips_it():
  isotropic = task_memory((128, 128, 128), (10, 10, 10))["watershed"]
  # 48 voxels of 10 nm on each side: 224³ voxels are read
  assert isotropic == int(sizing.FIXED["watershed"] + sizing.PER_VOXEL["watershed"] * 224 ** 3)
  # 4×4×40 nm: 48 voxels (192 nm) of context in x and y, 5 sections in z
  anisotropic = task_memory((128, 128, 128), (4, 4, 40))["watershed"]
  assert anisotropic == int(sizing.FIXED["watershed"]
                            + sizing.PER_VOXEL["watershed"] * 224 * 224 * 138)
  at_origin = task_memory((128, 128, 128), (10, 10, 10), volume_size=(150, 150, 150),
                          at_origin=True)["watershed"]
  assert at_origin == int(sizing.FIXED["watershed"] + sizing.PER_VOXEL["watershed"] * 150 ** 3)
  # a task larger than the volume holds only the volume
  whole = task_memory((512, 512, 512), (10, 10, 10), volume_size=(100, 100, 100))
  assert whole["rag"] == int(sizing.FIXED["rag"] + sizing.PER_VOXEL["rag"] * 100 ** 3)


def test_worker_memory_is_the_largest_stage_with_a_margin():
  estimates = task_memory((256, 256, 256), (10, 10, 10))
  need, stage = worker_memory((256, 256, 256), (10, 10, 10))
  assert estimates[stage] == max(estimates.values())
  assert need == int(estimates[stage] * sizing.WORKER_MARGIN)


def test_too_many_local_workers_for_this_machine_are_warned(monkeypatch):
  monkeypatch.setattr(sizing, "machine_memory", lambda: 16 * GIB)
  need, _ = worker_memory((256, 256, 256), (10, 10, 10))
  fits = int(16 * GIB // need)
  assert fits >= 2
  estimate, lines = memory_plan((256, 256, 256), (10, 10, 10), None, fits)
  assert estimate == need and len(lines) == 1
  assert f"{fits} local workers" in lines[0] and "of this machine's 16.0 GiB" in lines[0]
  _, lines = memory_plan((256, 256, 256), (10, 10, 10), None, fits + 1)
  assert lines[1].startswith(f"warning: {fits + 1} local workers of 256×256×256 tasks")
  # one worker (or a queue's remote workers) is sized, not compared with this machine
  _, lines = memory_plan((256, 256, 256), (10, 10, 10), None, None)
  assert len(lines) == 1 and "local workers" not in lines[0]
  assert lines[0].startswith(f"memory: give each worker about {need / GIB:.2f} GiB")


def test_a_small_volume_reads_only_the_context_it_has():
  # 250 voxels in 128-voxel blocks: [0, 128) reads [0, 176), [128, 250) reads [80, 250)
  estimate = task_memory((128, 128, 128), (10, 10, 10), volume_size=(250, 250, 250))
  assert estimate["watershed"] == int(sizing.FIXED["watershed"]
                                      + sizing.PER_VOXEL["watershed"] * 176 ** 3)


def test_design_prints_tasks_and_memory_per_shape_from_the_layers_info(tmp_path, monkeypatch):
  image = import_volume(np.zeros((256, 128, 64), np.uint8), "file://" + str(tmp_path / "em"),
                        "image", (10, 10, 10))
  monkeypatch.setattr(sizing, "machine_memory", lambda: GIB)
  result = CliRunner().invoke(cli, ["design", "--image", image, "--task-shape", "128,128,64",
                                    "--task-shape", "64,64,64", "-p", "4"])
  assert result.exit_code == 0, result.output
  lines = result.output.splitlines()
  assert lines[0].endswith("256×128×64 voxels of 10×10×10 nm (mip 0)")
  rows = {line.split()[0]: line.split() for line in lines[2:4]}
  assert rows["128×128×64"][1] == "2" and rows["64×64×64"][1] == "8"
  # 64³ tasks with 48 voxels of context: x reads 112+160+160+112 of 256, y 112+112 of 128
  assert rows["64×64×64"][2] == f"{(544 / 256) * (224 / 128):.1f}×"
  need, stage = worker_memory((128, 128, 64), (10, 10, 10), (256, 128, 64))
  assert rows["128×128×64"][-2:] == [f"{need / GIB:.2f}", f"({stage})"]
  # 2.1 µm³ at the FIB volume's edge density: 3 MB, which the (patched) 1 GiB machine holds
  edges = int(sizing.EDGES_PER_CUBIC_UM * 256 * 128 * 64 / 1e6)
  assert f"~{edges:,} RAG edges" in result.output
  assert "--hierarchy" not in result.output
  assert "warning: 4 local workers of 128×128×64 tasks" in result.output
  result = CliRunner().invoke(cli, ["design", "--image", image, "--task-shape", "96,96,96"])
  assert result.exit_code != 0 and "not a multiple of the chunk size" in result.output
  monkeypatch.setattr(sizing, "machine_memory", lambda: 2 ** 20)
  result = CliRunner().invoke(cli, ["design", "--image", image])
  assert "add --hierarchy 2 and enough --levels" in result.output


def test_a_containers_memory_limit_counts_as_the_machines(tmp_path, monkeypatch):
  limit = tmp_path / "memory.max"
  monkeypatch.setattr(sizing, "CGROUP_LIMITS", (str(tmp_path / "absent"), str(limit)))
  limit.write_text("max\n")  # no limit: the physical memory
  unlimited = sizing.machine_memory()
  assert unlimited > 2 ** 30
  limit.write_text(f"{2 ** 30}\n")
  assert sizing.machine_memory() == 2 ** 30
