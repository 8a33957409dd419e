"""Jobs that die, are requeued, or are resumed with a changed recipe: what the run directory does, and what
a resume may change."""
import json
import subprocess
import sys

import pytest
import yaml

from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.pretrain import Pretrainer
from maeframe.errors import MaeframeError
from conftest import QUICKSTART, tiny


def cli(tmp_path, *args):
    """`maeframe run` with overrides, flags (--resume, --auto-resume) last."""
    flags = [a for a in args if a.startswith("--")]
    return main(["run", str(QUICKSTART), *tiny(tmp_path), *[a for a in args if a not in flags], *flags])


def test_a_job_that_died_before_its_first_checkpoint_is_requeued(tmp_path, nan_recipe, capsys):
    """Attempt 1 stops at step 1 (non-finite loss, stop policy) before any checkpoint, as a bad node would;
    the plain rerun and --resume say what to do, --auto-resume moves the attempt aside and starts afresh —
    again and again, as a scheduler requeues."""
    run_dir = tmp_path / "out" / "quickstart"
    for attempt in (1, 2):
        with pytest.raises(MaeframeError, match="non-finite"):
            Pretrainer(nan_recipe("runtime.max_steps=4"), resume="auto").train()
        assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / "last.pt").exists()
        if attempt == 1:
            for resume, message in ((False, "stopped before its first checkpoint; pass --auto-resume"),
                                    (True, "stopped before writing its first checkpoint: nothing to resume")):
                with pytest.raises(MaeframeError, match=message):
                    Pretrainer(nan_recipe(), resume=resume)
    Pretrainer(prepare(QUICKSTART, tiny(tmp_path / "out")), resume="auto").train()
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8
    assert sorted(p.name for p in run_dir.glob("failed-attempt-*")) == ["failed-attempt-1", "failed-attempt-2"]
    assert (run_dir / "failed-attempt-2" / "metrics.jsonl").is_file()
    # and once it has a checkpoint, --auto-resume continues it
    assert cli(tmp_path / "out", "--auto-resume") == 0


def test_resume_without_any_run_says_so(tmp_path, capsys):
    assert cli(tmp_path, "--resume") == 2
    assert "there is no run at" in capsys.readouterr().err


def test_resume_refuses_changes_to_the_trajectory_and_names_each(tmp_path, capsys):
    assert cli(tmp_path, "runtime.max_steps=3") == 0
    run_dir = tmp_path / "quickstart"
    original = (run_dir / "recipe.yaml").read_text()
    cases = [("data.batch_size=8", ["data.batch_size: 16 → 8", "global batch"]),
             ("model.depth=2", ["model.depth: 1 → 2"]),
             ("masker.name=block", ["masker.name: 'random' → 'block'"]),
             ("optim.base_lr=0.01", ["optim.base_lr"]),
             ("optim.epochs=4", ["optim.epochs: 2 → 4"])]
    for override, expected in cases:
        assert cli(tmp_path, "--resume", override) == 2, override
        err = capsys.readouterr().err
        assert err.startswith("error: --resume: the recipe changes") and "Traceback" not in err, err
        assert all(e in err for e in expected), (override, err)
    assert (run_dir / "recipe.yaml").read_text() == original  # the run's recipe is never overwritten
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_resume_allows_and_records_harmless_changes(tmp_path):
    assert cli(tmp_path, "runtime.max_steps=3") == 0
    run_dir = tmp_path / "quickstart"
    assert cli(tmp_path, "--resume", "runtime.max_steps=6", "runtime.log_interval=2", "data.num_workers=1") == 0
    assert cli(tmp_path, "--resume") == 0
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["runtime"]["log_interval"] == 1
    kept = sorted(p.name for p in run_dir.glob("recipe-resumed-step*.yaml"))
    assert kept == ["recipe-resumed-step0000003.yaml", "recipe-resumed-step0000006.yaml"]
    resumes = json.loads((run_dir / "run.json").read_text())["resumes"]
    assert [r["step"] for r in resumes] == [3, 6]
    assert resumes[0]["changed"]["runtime.log_interval"] == [1, 2] and "runtime.max_steps" in resumes[1]["changed"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 6, 7, 8]


def test_two_processes_may_resume_one_with_the_same_global_batch_only(tmp_path, capsys):
    """data.batch_size may change with the world size when the global batch stays (the tested cross-world
    resume); under the same world size it may change only together with optim.accum_steps."""
    assert cli(tmp_path, "runtime.max_steps=3") == 0
    assert cli(tmp_path, "--resume", "data.batch_size=8", "optim.accum_steps=2", "runtime.max_steps=4") == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "maeframe", "run", str(QUICKSTART), *tiny(tmp_path), "data.batch_size=8", "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_checkpoint_of_an_older_maeframe_resumes(tmp_path):
    """A checkpoint written before a recipe field existed (here model.decoder_window_block and runtime.loggers)
    resumes: the absent field takes its default, which is the old behaviour, and is not reported as a change."""
    import torch

    assert cli(tmp_path, "runtime.max_steps=3") == 0
    last = tmp_path / "quickstart" / "last.pt"
    state = torch.load(last, weights_only=False)
    del state["recipe"]["model"]["decoder_window_block"], state["recipe"]["runtime"]["loggers"]
    state["recipe"]["runtime"]["tensorboard"] = False  # what the tiny runs set, before runtime.loggers
    torch.save(state, last)
    assert cli(tmp_path, "--resume", "runtime.max_steps=4") == 0
    resumes = json.loads((tmp_path / "quickstart" / "run.json").read_text())["resumes"]
    assert list(resumes[0]["changed"]) == ["runtime.max_steps"]
