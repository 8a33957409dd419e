"""torchrun with 2 CPU processes (gloo) equals one process with the same global batch, and checkpoints
move between world sizes."""
import json
import subprocess
import sys

import pytest

from conftest import QUICKSTART, tiny


def run(output_dir, processes, *extra):
    per_process = 16 // processes
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "maeframe"] if processes > 1 else [sys.executable, "-m", "maeframe"]
    result = subprocess.run([*command, "run", str(QUICKSTART), *tiny(output_dir, f"data.batch_size={per_process}"),
                             *extra], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (output_dir / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    return lines


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("one"), 1)


def test_two_processes_follow_the_single_process_trajectory(tmp_path, single):
    double = run(tmp_path, 2)
    assert [m["step"] for m in double] == [m["step"] for m in single] == list(range(1, 9))
    for a, b in zip(single, double):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    facts = json.loads((tmp_path / "quickstart" / "run.json").read_text())
    assert facts["world_size"] == 2 and facts["effective_batch"] == 16


def test_checkpoints_move_between_world_sizes(tmp_path, single):
    run(tmp_path / "a", 2, "runtime.max_steps=3")
    two_then_one = run(tmp_path / "a", 1, "--resume")
    run(tmp_path / "b", 1, "runtime.max_steps=5")
    one_then_two = run(tmp_path / "b", 2, "--resume")
    for resumed in (two_then_one, one_then_two):
        assert [m["step"] for m in resumed] == list(range(1, 9))
        for a, b in zip(single, resumed):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
