"""torchrun with 2 CPU processes (gloo) equals one process with the same global batch, under ddp and fsdp,
and checkpoints move between world sizes and strategies."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from maeframe.build import prepare
from maeframe.cli import main
from maeframe import TokenSpec
from maeframe.engine.checkpoint import load_checkpoint
from maeframe.interop.encoder_weights import pretrained_encoder_state
from maeframe.errors import MaeframeError, RecipeError
from conftest import QUICKSTART, RECIPES, tiny

FSDP = "runtime.strategy=fsdp"


def launch(output_dir, processes, *extra, env=None):
    per_process = 16 // processes
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "maeframe"] if processes > 1 else [sys.executable, "-m", "maeframe"]
    return subprocess.run([*command, "run", str(QUICKSTART), *tiny(output_dir, f"data.batch_size={per_process}"),
                           *extra], capture_output=True, text=True, timeout=300, env=env)


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "quickstart" / "metrics.jsonl").read_text().splitlines()]


def run(output_dir, processes, *extra):
    result = launch(output_dir, processes, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics(output_dir)


def assert_same_trajectory(expected, got):
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for a, b in zip(expected, got):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])


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


# --- fsdp ----------------------------------------------------------------------------------------------


def test_fsdp_two_processes_follow_the_single_process_trajectory(tmp_path, single):
    assert_same_trajectory(single, run(tmp_path, 2, FSDP))
    run_dir = tmp_path / "quickstart"
    assert (run_dir / "last.dcp" / ".metadata").is_file() and not (run_dir / "last.pt").exists()
    assert sorted(p.name for p in (run_dir / "last.dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (run_dir / "reconstructions" / "epoch0002.png").is_file()  # both ranks ran the sharded forward
    # one file, for copying or loading elsewhere: the same state as reading the directory directly
    assert main(["convert-checkpoint", str(run_dir / "last.dcp"), str(tmp_path / "one.pt")]) == 0
    gathered, converted = load_checkpoint(run_dir / "last.dcp"), load_checkpoint(tmp_path / "one.pt")
    assert converted["step"] == gathered["step"] == 8 and set(converted["model"]) == set(gathered["model"])
    assert all(torch.equal(converted["model"][k], v) for k, v in gathered["model"].items())
    assert set(converted["optimizer"]["state"]) == set(gathered["model"]) - {"encoder.pos_embed", "decoder.pos_embed"}
    # export reads the directory as it reads a file
    for source, out in ((run_dir / "last.dcp", "a.safetensors"), (tmp_path / "one.pt", "b.safetensors")):
        assert main(["export", str(source), str(tmp_path / out), "--timm-name", "vit_tiny_patch16_224"]) == 0
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["blocks.0.mlp.fc1.weight"], gathered["model"]["encoder.blocks.0.mlp.fc1.weight"])
    # a downstream recipe initialises from the directory as from the file
    prepared = prepare(RECIPES / "knn_fmnist.yaml", [f"init.checkpoint={run_dir / 'last.dcp'}"])
    recipe = prepared.recipe
    encoder = pretrained_encoder_state(prepared.components.weight_format, recipe.init, TokenSpec((7, 7), (4, 4), 1),
                                       recipe.model.model_copy(
        update={"embed_dim": 32, "depth": 1, "num_heads": 2}), recipe.tokenizer.options)
    assert all(torch.equal(v, converted["model"][k]) for k, v in encoder.items()) and len(encoder) > 10


def test_fsdp_checkpoints_move_to_one_ddp_process_and_back(tmp_path, single):
    run(tmp_path / "a", 2, FSDP, "runtime.max_steps=3")
    two_fsdp_then_one = run(tmp_path / "a", 1, "--resume")
    assert (tmp_path / "a" / "quickstart" / "last.pt").is_file()
    assert not (tmp_path / "a" / "quickstart" / "last.dcp").exists()  # stale once last.pt is written
    run(tmp_path / "b", 1, "runtime.max_steps=5")
    one_then_two_fsdp = run(tmp_path / "b", 2, FSDP, "--resume")
    assert not (tmp_path / "b" / "quickstart" / "last.pt").exists()
    for resumed in (two_fsdp_then_one, one_then_two_fsdp):
        assert_same_trajectory(single, resumed)


def test_fsdp_in_one_process_and_an_interrupted_checkpoint_swap(tmp_path, single):
    """One process runs fsdp on a group of one (same numbers, a DCP checkpoint). A crash between moving the
    old last.dcp aside and renaming the new one into place leaves the old one, which the resume uses."""
    assert_same_trajectory(single[:5], run(tmp_path, 1, FSDP, "runtime.max_steps=5"))
    run_dir = tmp_path / "quickstart"
    (run_dir / "last.dcp").rename(run_dir / ".last.dcp.old")
    (run_dir / ".last.dcp.tmp").mkdir()
    (run_dir / ".last.dcp.tmp" / "__0_0.distcp").write_bytes(b"half written")
    assert_same_trajectory(single, run(tmp_path, 2, FSDP, "--resume"))
    assert sorted(p.name for p in run_dir.glob("*.dcp")) == ["checkpoint-epoch0002.dcp", "last.dcp"]
    assert not list(run_dir.glob(".*"))  # the temp directory and the old checkpoint are gone


PREEMPT_PLUGIN = """
import os, signal
from maeframe import hookimpl

@hookimpl
def log_metrics(step, metrics):
    if step == 3 and not os.environ.get("NO_PREEMPT"):  # a scheduler's SIGTERM, on every rank at step 3
        os.kill(os.getpid(), signal.SIGTERM)
"""


def test_fsdp_preemption_periodic_and_keep_k(tmp_path, single):
    (tmp_path / "preempt_plugin.py").write_text(PREEMPT_PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    extra = (FSDP, "plugins=[preempt_plugin]", "runtime.checkpoint_interval=1", "runtime.keep_checkpoints=1")
    stopped = launch(tmp_path, 2, *extra, env=env)
    assert stopped.returncode != 0 and "stopped by signal SIGTERM at step 3" in stopped.stderr
    run_dir = tmp_path / "quickstart"
    assert load_checkpoint(run_dir / "last.dcp")["step"] == 3
    done = launch(tmp_path, 2, *extra, "--auto-resume", env={**env, "NO_PREEMPT": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_trajectory(single, metrics(tmp_path))
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-epoch0002.dcp"]  # keep 1
    assert load_checkpoint(run_dir / "checkpoint-epoch0002.dcp")["step"] == 8


def test_fsdp_refuses_fp16_probes_ema_and_old_torch(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="runtime.*fsdp runs in bf16 or fp32"):
        prepare(QUICKSTART, tiny(tmp_path, FSDP, "runtime.precision=fp16"))
    with pytest.raises(RecipeError, match="runtime.strategy: a linprobe run keeps its frozen encoder whole"):
        prepare(RECIPES / "linprobe_fmnist.yaml", [FSDP])
    with pytest.raises(RecipeError, match="ema: an EMA copy of a sharded"):
        prepare(RECIPES / "finetune_fmnist.yaml", [FSDP, "ema={decay: 0.99}"])
    from maeframe.engine import fsdp

    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", type(sys)("torch.distributed.fsdp"))  # torch<2.6
    with pytest.raises(MaeframeError, match="needs torch>=2.6"):
        fsdp.fully_shard_api()


def test_checkpoints_with_index_keyed_adamw_state_still_resume(tmp_path, single):
    """last.pt files written before checkpoints keyed AdamW state by parameter name resume under ddp."""
    from maeframe.engine.checkpoint import atomic_save
    from maeframe.engine.pretrain import Pretrainer

    overrides = tiny(tmp_path, "runtime.max_steps=3")
    trainer = Pretrainer(prepare(QUICKSTART, overrides))
    trainer.train()
    last = tmp_path / "quickstart" / "last.pt"
    atomic_save({**load_checkpoint(last), "optimizer": trainer.optimizer.state_dict()}, last)
    assert isinstance(load_checkpoint(last)["optimizer"]["param_groups"][0]["params"][0], int)
    Pretrainer(prepare(QUICKSTART, tiny(tmp_path)), resume=True).train()
    assert_same_trajectory(single, metrics(tmp_path))


def test_fsdp_with_a_frozen_timm_teacher_follows_one_process(tmp_path):
    """The timm feature target keeps its own unsharded frozen model beside the sharded student (the EMA
    teacher is refused under fsdp: tests/test_targets.py)."""
    from test_targets import make_teacher

    weights = tmp_path / "teacher.safetensors"
    save_file(make_teacher().state_dict(), str(weights))
    target = ["target.name=feature", "losses=[{name: mse}]",
              f"target.options={{teacher: timm, model_name: vit_tiny_patch16_224, weights: '{weights}', "
              "model_kwargs: {img_size: 28, patch_size: 4, in_chans: 1, depth: 2}, layer_norm: true}"]
    assert_same_trajectory(run(tmp_path / "one", 1, *target), run(tmp_path / "two", 2, *target, FSDP))


def test_fsdp_runs_the_knn_monitor_on_every_rank(tmp_path):
    """Under fsdp the encoder's forward is collective: every rank evaluates the monitor, rank 0 logs it, and the
    figures equal one ddp process's (before: refused under torchrun, and a crash in a one-process fsdp run)."""
    monitor = "monitor={bank: 40, queries: 20, k: 5}"
    expected, got = run(tmp_path / "one", 1, monitor), run(tmp_path / "two", 2, monitor, FSDP)
    knn = [[m.get("monitor/knn_top1") for m in lines if "monitor/knn_top1" in m] for lines in (expected, got)]
    assert len(knn[0]) == 2 and knn[0] == knn[1]
    assert_same_trajectory([m for m in expected if "loss" in m], [m for m in got if "loss" in m])
