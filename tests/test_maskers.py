"""Structured maskers (block, tube, running_cell, time_freq) and the curriculum masker.

Each test checks a defining property of a masker, not only shapes: exact hidden counts per sample, the
geometry of the hidden set (rectangles, tubes, running cells, whole time/frequency lines), the schedule's
values and strategy mixing, and exact resumption, in a unit round trip and in a real training run.
"""
from __future__ import annotations

import io
import json
import math

import pytest
import torch
from pydantic import ValidationError

from maeframe import Mask, TokenSpec, visible_count
from maeframe.build import prepare
from maeframe.engine.pretrain import Pretrainer
from maeframe.plugins import make_plugin_manager
from maeframe import build_component as build
from maeframe.registry import Registry
from maeframe_plugins.curriculum import CurriculumMasker
from maeframe_plugins.masking import RandomMasker, RandomOptions
from maeframe_plugins.structured_masking import (
    BlockMasker, BlockOptions, RunningCellMasker, RunningCellOptions, TimeFreqMasker, TimeFreqOptions,
    TubeMasker, TubeOptions, block_layout,
)
from conftest import QUICKSTART, tiny

CPU = torch.device("cpu")
IMAGE = TokenSpec(grid=(14, 14), patch_size=(16, 16), channels=3)
VIDEO = TokenSpec(grid=(4, 6, 8), patch_size=(2, 16, 16), channels=3)
AUDIO = TokenSpec(grid=(16, 8), patch_size=(16, 16), channels=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def registry():
    return Registry(make_plugin_manager())


def check_contract(mask: Mask, batch: int, tokens: int, visible: int) -> None:
    """Shapes, dtypes, exact count per sample, and that the three fields describe one permutation."""
    assert mask.ids_keep.shape == (batch, visible) and mask.ids_keep.dtype == torch.long
    assert mask.ids_restore.shape == (batch, tokens) and mask.ids_restore.dtype == torch.long
    assert mask.masked.shape == (batch, tokens) and mask.masked.dtype == torch.float32
    assert torch.equal(mask.masked.sum(1), torch.full((batch,), float(tokens - visible)))
    assert torch.equal(torch.sort(mask.ids_restore, dim=1).values, torch.arange(tokens).expand(batch, -1))
    assert torch.equal(mask.ids_restore.gather(1, mask.ids_keep), torch.arange(visible).expand(batch, -1))
    assert torch.equal(mask.masked, (mask.ids_restore >= visible).float())


def masked_neighbours(masked: torch.Tensor, height: int, width: int) -> float:
    """Mean number of hidden 4-neighbours of a hidden token; masked [B, H·W]."""
    grid = torch.nn.functional.pad(masked.view(-1, 1, height, width), (1, 1, 1, 1))
    kernel = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    neighbours = torch.nn.functional.conv2d(grid, kernel).view_as(masked)
    return float((neighbours * masked).sum() / masked.sum())


# --- registration and exact counts for every masker -----------------------------------------------------

def test_every_masker_is_registered(registry):
    for name, cls in [("block", BlockMasker), ("tube", TubeMasker), ("running_cell", RunningCellMasker),
                      ("time_freq", TimeFreqMasker), ("curriculum", CurriculumMasker)]:
        entry = registry.get("masker", name)
        assert entry.cls is cls
        assert all(field.description for field in cls.Options.model_fields.values()), name


@pytest.mark.parametrize("name, options, spec, visible", [
    ("random", {"ratio": 0.75}, IMAGE, 49),
    ("block", {"ratio": 0.4}, IMAGE, 117),
    ("block", {"ratio": 0.75}, IMAGE, 49),
    ("block", {"ratio": 0.75, "rounds": 1}, IMAGE, 49),  # one rectangle at most: the rest is filled at random
    ("block", {"ratio": 0.5, "min_block": 4}, TokenSpec((7, 9), (4, 4), 1), 31),
    ("block", {"ratio": 0.5}, VIDEO, 4 * 24),
    ("tube", {"ratio": 0.9}, VIDEO, 4 * visible_count(48, 0.9)),
    ("running_cell", {"ratio": 0.75}, VIDEO, 4 * 12),
    ("time_freq", {"time_ratio": 0.5, "freq_ratio": 0.3}, AUDIO, 8 * 6),
    ("curriculum", {"strategies": [{"name": "block"}], "start": 0.6, "end": 0.6}, IMAGE, visible_count(196, 0.6)),
])
def test_every_sample_hides_exactly_the_same_count(registry, name, options, spec, visible):
    with registry.active():
        masker = build("masker", name, options, spec)
    for _ in range(3):
        check_contract(masker(32, CPU), 32, spec.num_tokens, visible)


# --- block ----------------------------------------------------------------------------------------------

def test_single_block_is_one_rectangle_within_the_aspect_bounds():
    # one round: each sample gets at most one rectangle, so its shape and size are visible directly
    hidden = block_layout(400, 14, 14, 60, min_block=16, max_block=None, min_aspect=0.3, attempts=10, rounds=1,
                          device=CPU)
    counts = hidden.flatten(1).sum(1)
    assert (counts > 0).float().mean() > 0.9
    aspects = []
    for sample, count in zip(hidden, counts.tolist()):
        if count == 0:
            continue
        rows = sample.any(1).nonzero().flatten()
        cols = sample.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert h * w == count, "a single placement is a filled rectangle"
        assert 16 <= count <= 60
        assert 0.3 <= h / w <= 1 / 0.3
        aspects.append(h / w)
    assert min(aspects) < 0.5 and max(aspects) > 2  # both orientations are drawn


def test_block_masks_are_clustered_unlike_random_masking():
    block = BlockMasker(BlockOptions(ratio=0.4), IMAGE)(128, CPU)
    random = RandomMasker(RandomOptions(ratio=0.4), IMAGE)(128, CPU)
    block_score, random_score = masked_neighbours(block.masked, 14, 14), masked_neighbours(random.masked, 14, 14)
    assert random_score < 1.7  # ≈ 0.4 × 3.7 neighbours on average
    assert block_score > 1.8 * random_score


def test_block_rectangles_reach_the_target_without_random_fill():
    masker = BlockMasker(BlockOptions(ratio=0.75), IMAGE)
    counts = masker.layout(256, CPU).flatten(1).sum(1)
    assert int(counts.max()) <= 147  # never more than the target, so nothing is trimmed
    assert (counts == 147).float().mean() > 0.95  # and almost never a random top-up


def test_block_on_video_repeats_one_layout_over_time():
    mask = BlockMasker(BlockOptions(ratio=0.5, min_block=6), VIDEO)(16, CPU)
    frames = mask.masked.view(16, 4, 48)
    assert torch.equal(frames, frames[:, :1].expand_as(frames))
    random = RandomMasker(RandomOptions(ratio=0.5), TokenSpec((6, 8), (16, 16), 3))(16, CPU)
    assert masked_neighbours(frames[:, 0], 6, 8) > 1.5 * masked_neighbours(random.masked, 6, 8)


def test_block_rejects_grids_and_sizes_it_cannot_use():
    with pytest.raises(ValueError, match=r"grid \(196,\)"):
        BlockMasker(BlockOptions(), TokenSpec((196,), (16,), 3))
    with pytest.raises(ValueError, match="min_block 64 is larger"):
        BlockMasker(BlockOptions(min_block=64), TokenSpec((7, 7), (4, 4), 1))
    with pytest.raises(ValidationError, match="max_block"):
        BlockOptions(min_block=16, max_block=8)


# --- tube -----------------------------------------------------------------------------------------------

def test_tube_hides_the_same_positions_in_every_frame():
    mask = TubeMasker(TubeOptions(ratio=0.75), VIDEO)(16, CPU)
    frames = mask.masked.view(16, 4, 48)
    assert torch.equal(frames, frames[:, :1].expand_as(frames))
    assert torch.equal(frames[:, 0].sum(1), torch.full((16,), 36.0))
    assert len({tuple(row.tolist()) for row in frames[:, 0]}) > 1  # each sample draws its own tube


def test_tube_needs_a_video_grid():
    with pytest.raises(ValueError, match=r"3-D \(T, H, W\) token grid, got grid \(14, 14\)"):
        TubeMasker(TubeOptions(), IMAGE)


# --- running cell ---------------------------------------------------------------------------------------

def running_cell_reference(frames: int, height: int, width: int, hidden_per_cell: int) -> set[tuple]:
    """VideoMAE v2's rule, written out: a cyclic pointer over the cell queue [1]*m + [0]*(4-m) starts at one
    of 4 positions and advances by one before each frame; cell position k (raster order in the 2×2 cell)
    takes the queue entry at (k + pointer) mod 4, and the cell is tiled over the frame."""
    queue = [1] * hidden_per_cell + [0] * (4 - hidden_per_cell)
    patterns = set()
    for start in range(4):
        pointer, video = start, []
        for _ in range(frames):
            pointer += 1
            cell = [queue[(k + pointer) % 4] for k in range(4)]
            video += [cell[2 * (h % 2) + (w % 2)] for h in range(height) for w in range(width)]
        patterns.add(tuple(video))
    return patterns


def test_running_cell_matches_the_expected_frames_on_a_small_grid():
    spec = TokenSpec(grid=(4, 2, 4), patch_size=(2, 16, 16), channels=3)
    masker = RunningCellMasker(RunningCellOptions(ratio=0.5), spec)
    frames = [[[1, 1, 1, 1], [0, 0, 0, 0]],   # cell [[1, 1], [0, 0]]
              [[1, 0, 1, 0], [0, 1, 0, 1]],   # cell [[1, 0], [0, 1]]
              [[0, 0, 0, 0], [1, 1, 1, 1]],   # cell [[0, 0], [1, 1]]
              [[0, 1, 0, 1], [1, 0, 1, 0]]]   # cell [[0, 1], [1, 0]]
    assert masker.pattern(torch.tensor([0])).int().tolist() == [frames]
    # the other offsets start the same cycle later: offset s shows frame (t + s) mod 4 at time t
    for s in range(4):
        assert masker.pattern(torch.tensor([s])).int().tolist() == [[frames[(t + s) % 4] for t in range(4)]]
    mask = masker(64, CPU)
    seen = {tuple(row) for row in mask.masked.int().tolist()}
    assert seen == running_cell_reference(4, 2, 4, 2)  # all four sequences occur, nothing else


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_hides_m_of_each_cell_and_runs_over_time(ratio):
    masker = RunningCellMasker(RunningCellOptions(ratio=ratio), VIDEO)
    mask = masker(32, CPU)
    hidden = mask.masked.view(32, 4, 3, 2, 4, 2)  # [B, T, cell row, h mod 2, cell col, w mod 2]
    per_cell = hidden.sum(dim=(3, 5))
    assert torch.equal(per_cell, torch.full_like(per_cell, 4 * ratio))
    cells = hidden.permute(0, 1, 2, 4, 3, 5).reshape(32, 4, 12, 4)  # raster position k in the last axis
    assert torch.equal(cells, cells[:, :, :1].expand_as(cells))  # one cell pattern per frame
    assert torch.equal(cells[:, 1:], cells[:, :-1].roll(-1, dims=3))  # frame t+1 at k = frame t at k+1
    assert {tuple(row) for row in mask.masked.int().tolist()} <= running_cell_reference(4, 6, 8, round(4 * ratio))


def test_running_cell_rejects_what_it_cannot_tile():
    with pytest.raises(ValidationError, match="0.25, 0.5 or 0.75"):
        RunningCellOptions(ratio=0.6)
    with pytest.raises(ValueError, match="must be even"):
        RunningCellMasker(RunningCellOptions(), TokenSpec((4, 7, 8), (2, 16, 16), 3))
    with pytest.raises(ValueError, match=r"got grid \(14, 14\)"):
        RunningCellMasker(RunningCellOptions(), IMAGE)


# --- time / frequency -----------------------------------------------------------------------------------

def test_time_freq_hides_whole_time_columns_and_frequency_rows():
    masker = TimeFreqMasker(TimeFreqOptions(time_ratio=0.5, freq_ratio=0.3), AUDIO)  # grid (time 16, freq 8)
    assert masker.counts() == (8, 2)
    mask = masker(32, CPU)
    check_contract(mask, 32, 128, (16 - 8) * (8 - 2))
    hidden = mask.masked.view(32, 16, 8).bool()
    whole_times = hidden.all(dim=2)  # [B, T]: time steps hidden across every band
    whole_bands = hidden.all(dim=1)  # [B, F]: bands hidden at every time step
    assert torch.equal(whole_times.sum(1), torch.full((32,), 8))
    assert torch.equal(whole_bands.sum(1), torch.full((32,), 2))
    assert torch.equal(hidden, whole_times[:, :, None] | whole_bands[:, None, :])  # nothing else is hidden


def test_time_freq_axis_zero_is_time():
    mask = TimeFreqMasker(TimeFreqOptions(time_ratio=0.25, freq_ratio=0.0), AUDIO)(8, CPU)
    hidden = mask.masked.view(8, 16, 8)
    assert torch.equal(hidden, hidden[:, :, :1].expand_as(hidden))  # a time step is hidden in all bands
    assert torch.equal(hidden[:, :, 0].sum(1), torch.full((8,), 4.0))
    with pytest.raises(ValueError, match=r"2-D \(time, freq\) token grid, got grid \(4, 6, 8\)"):
        TimeFreqMasker(TimeFreqOptions(), VIDEO)


# --- curriculum -----------------------------------------------------------------------------------------

def curriculum(registry, spec=IMAGE, **options) -> CurriculumMasker:
    with registry.active():
        return build("masker", "curriculum", options, spec)


def ratios(masker, unit_values, unit="epoch"):
    out = []
    for t in unit_values:
        masker.set_progress(int(t), t) if unit == "step" else masker.set_progress(0, t)
        out.append(masker.current_ratio)
    return out


def test_curriculum_schedule_shapes(registry):
    linear = curriculum(registry, start=0.5, end=0.75, span=5, shape="linear")
    assert ratios(linear, [0, 2.5, 5, 7]) == [0.5, 0.625, 0.75, 0.75]
    cosine = curriculum(registry, start=0.5, end=0.75, span=5, shape="cosine")
    got = ratios(cosine, [0, 1.25, 2.5, 5, 9])
    assert got == pytest.approx([0.5, 0.5 + 0.25 * (1 - math.cos(math.pi / 4)) / 2, 0.625, 0.75, 0.75])
    step = curriculum(registry, start=0.3, end=0.6, span=8, unit="step", shape="step", steps=4)
    assert ratios(step, range(11), unit="step") == pytest.approx([0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.6, 0.6,
                                                                  0.6, 0.6])
    constant = curriculum(registry, start=0.6, end=0.9, span=2, shape="constant")
    assert ratios(constant, [0, 1, 3]) == [0.6, 0.6, 0.6]


def test_curriculum_masks_follow_the_scheduled_ratio(registry):
    masker = curriculum(registry, strategies=[{"name": "block", "options": {"min_block": 8}}],
                        start=0.25, end=0.75, span=4, unit="step")
    for step, ratio in enumerate([0.25, 0.375, 0.5, 0.625, 0.75]):
        masker.set_progress(step, step / 4)
        assert masker.maskers[0].options.ratio == ratio
        check_contract(masker(16, CPU), 16, 196, visible_count(196, ratio))


def test_curriculum_mixing_probabilities_switch_strategies(registry):
    masker = curriculum(registry, strategies=[{"name": "random"}, {"name": "block"}], start=0.5, end=0.5,
                        span=10, unit="step", probs_start=[1, 0], probs_end=[0, 1])
    assert masker.current_strategy == "random"  # before any step: the most probable strategy at the start

    def choices(step, draws=200):
        picked = []
        for _ in range(draws):
            masker.set_progress(step, 0.0)
            picked.append(masker.index)
        return picked

    assert set(choices(0)) == {0}
    assert set(choices(10)) == {1} and set(choices(25)) == {1}
    assert 0.3 < sum(choices(5)) / 200 < 0.7  # halfway: half and half
    masker.set_progress(12, 0.0)
    assert masker.current_strategy == "block"
    assert masked_neighbours(masker(64, CPU).masked, 14, 14) > 1.8 * 0.5 * 3.7  # the masks are block masks


def test_curriculum_draws_strategies_from_the_global_cpu_generator(registry):
    options = dict(strategies=[{"name": "random"}, {"name": "block"}], probs_start=[0.5, 0.5])
    first, second = curriculum(registry, **options), curriculum(registry, **options)
    torch.manual_seed(7)
    picks = [(first.set_progress(i, 0.0), first.index)[1] for i in range(40)]
    torch.manual_seed(7)
    assert picks == [(second.set_progress(i, 0.0), second.index)[1] for i in range(40)]
    assert set(picks) == {0, 1}


def test_curriculum_state_round_trip_gives_the_same_next_masks(registry):
    options = dict(strategies=[{"name": "random"}, {"name": "block", "options": {"min_block": 4}}],
                   start=0.4, end=0.8, span=20, unit="step", shape="cosine", probs_start=[0.7, 0.3],
                   probs_end=[0.2, 0.8])
    original = curriculum(registry, **options)
    for step in range(7):
        original.set_progress(step, step / 10)
        original(4, CPU)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)  # checkpoints are read back with weights_only=True
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert {"step", "epoch", "ratio", "strategy"} <= set(state) and state["step"] == 6

    restored = curriculum(registry, **options)
    restored.load_state_dict(state)
    assert (restored.current_ratio, restored.index) == (original.current_ratio, original.index)
    assert restored.maskers[0].options.ratio == original.current_ratio

    def continue_from(masker, rng):
        torch.set_rng_state(rng)
        masks = [masker(4, CPU).masked]  # the saved step's strategy and ratio, before any new progress
        for step in range(7, 20):
            masker.set_progress(step, step / 10)
            masks.append(masker(4, CPU).masked)
        return masks, masker.state_dict()

    rng = torch.get_rng_state()
    expected, expected_state = continue_from(original, rng)
    got, got_state = continue_from(restored, rng)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert got_state == expected_state
    assert len({tuple(m.sum(1).tolist()) for m in got}) > 3  # the ratio really moved along the way


def test_curriculum_rejects_strategies_it_cannot_schedule(registry):
    with pytest.raises(ValueError, match=r"strategies\[1\] \(time_freq\): .*no `ratio` option"):
        curriculum(registry, AUDIO, strategies=[{"name": "random"}, {"name": "time_freq"}], probs_start=[1, 0])
    with pytest.raises(ValueError, match=r"strategies\[0\] \(nope\): unknown masker 'nope'"):
        curriculum(registry, strategies=[{"name": "nope"}])
    with pytest.raises(ValueError, match="remove options.ratio"):
        curriculum(registry, strategies=[{"name": "random", "options": {"ratio": 0.5}}])
    with pytest.raises(ValueError, match=r"strategies\[0\] \(tube\): ValueError: .*got grid \(14, 14\)"):
        curriculum(registry, strategies=[{"name": "tube"}])
    with pytest.raises(ValueError, match=r"\(running_cell\): the linear schedule from 0.25 to 0.75 reaches ratio"):
        curriculum(registry, VIDEO, strategies=[{"name": "running_cell"}], start=0.25, end=0.75)
    plateaus = curriculum(registry, VIDEO, strategies=[{"name": "running_cell"}], start=0.25, end=0.75,
                          shape="step", steps=3, span=3, unit="step")  # 0.25, 0.5, 0.75: all valid
    assert ratios(plateaus, [0, 1, 2], unit="step") == [0.25, 0.5, 0.75]
    with pytest.raises(ValidationError, match="probs_end has 1 entries for 2 strategies"):
        curriculum(registry, strategies=[{"name": "random"}, {"name": "block"}], probs_end=[1])
    with pytest.raises(ValidationError, match="sum to 1"):
        curriculum(registry, strategies=[{"name": "random"}, {"name": "block"}], probs_start=[0.5, 0.6])


# --- end to end: resuming a curriculum run is exact --------------------------------------------------------

CURRICULUM = [
    "masker.name=curriculum",
    "masker.options={strategies: [{name: random}, {name: block, options: {min_block: 4}}], start: 0.5, "
    "end: 0.75, span: 8, unit: step, shape: linear, probs_start: [0.8, 0.2], probs_end: [0.2, 0.8]}",
]


def run(tmp_path, *extra, resume=False) -> Pretrainer:
    trainer = Pretrainer(prepare(QUICKSTART, tiny(tmp_path, *CURRICULUM, *extra)), resume=resume)
    trainer.train()
    return trainer


def logged(run_dir, key="loss"):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_curriculum_run_resumes_exactly(tmp_path):
    straight = run(tmp_path / "a")  # 8 steps: 2 epochs of 4
    run(tmp_path / "b", "runtime.max_steps=3")  # stops mid-epoch, writes last.pt
    resumed = run(tmp_path / "b", resume=True)
    assert logged(tmp_path / "b" / "quickstart") == logged(tmp_path / "a" / "quickstart")
    assert resumed.components.masker.state_dict() == straight.components.masker.state_dict()
    assert straight.components.masker.current_ratio == 0.5 + 0.25 * 7 / 8  # the last step is step 7
    ratios = logged(tmp_path / "a" / "quickstart", "masker/ratio")  # logged after each step
    assert ratios == [0.5 + 0.25 * step / 8 for step in range(8)]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
