"""Audio: spectrogram tokenizer, audio datasets (decode, resample, fbank, crop/pad, normalisation, labels,
bad files, feature cache, statistics), the windowed decoder attention block, and a short run on real
KLettres recordings."""
import json
import logging
import math
import os
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF
from pydantic import ValidationError
from timm.models.vision_transformer import Block
from torchaudio.compliance import kaldi

from maeframe.build import prepare
from maeframe.cli import main
from maeframe.engine.data import SeededDataset
from maeframe.engine.pretrain import Pretrainer
from maeframe import Mask
from maeframe.model import MaskedAutoencoder
from maeframe.plugins import make_plugin_manager
from maeframe.registry import Registry
from maeframe_plugins.audio import SpectrogramOptions, SpectrogramTokenizer, griffin_lim_from_fbank
from maeframe_plugins.audio_data import (AudioCsvDataset, AudioCsvOptions, AudioFolderDataset, AudioFolderOptions,
                                         KlettresDataset, KlettresOptions)
from maeframe_plugins.audio_features import (AUDIOSET_MEAN, AUDIOSET_STD, AudioError, FbankConfig, audio_features,
                                             fit_length, load_audio, resample)
from maeframe.model.windowed import (WindowedAttention, WindowedBlock, make_windowed_blocks,
                                            reference_mask, window_groups)
from maeframe_plugins.structured_masking import TimeFreqMasker, TimeFreqOptions
from conftest import RECIPES

KLETTRES = Path("/usr/share/klettres")
LayerNorm = partial(torch.nn.LayerNorm, eps=1e-6)  # the core's (and timm ViT's) norm
AUDIO_RECIPES = sorted(RECIPES.glob("audio_*.yaml"))
SHAPE = (1, 64, 32)  # [1, T, F]: 64 frames (0.64 s), 32 mel bins


def tone(path: Path, rate: int, seconds: float = 0.5, freq: float = 440.0, channels: int = 1, sweep: float = 1.0,
         **kwargs) -> Path:
    """A sine (a linear chirp from freq to sweep·freq when sweep != 1) written with soundfile."""
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * (t + (sweep - 1) * t * t / (2 * seconds)))
    data = np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), data, rate, **kwargs)
    return path


@pytest.fixture
def folder(tmp_path):
    """root/<class>/: 'high' tones (one 8 kHz wav, one 44.1 kHz stereo flac), 'low' (ogg + a long wav)."""
    root = tmp_path / "sounds"
    tone(root / "high" / "a.wav", 8000, freq=1800)
    tone(root / "high" / "b.flac", 44100, freq=2000, channels=2)
    tone(root / "low" / "c.ogg", 16000, freq=200, format="OGG", subtype="VORBIS")
    tone(root / "low" / "d.wav", 16000, seconds=1.5, freq=300, sweep=8.0)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not audio")  # a folder without recordings: no class
    return root


def folder_data(root, train=False, shape=SHAPE, **options):
    return AudioFolderDataset(AudioFolderOptions(root=str(root), **options), shape, train)


# --- decoding, resampling, fbank ---------------------------------------------------------------------------

def test_stereo_is_averaged_and_resampled_like_torchaudio(tmp_path):
    path = tone(tmp_path / "s.wav", 44100, channels=2)
    waveform, rate = load_audio(path)
    raw, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    assert rate == 44100 and waveform.shape == (1, 22050)
    assert torch.equal(waveform[0], torch.from_numpy(raw).mean(1))
    ours = resample(waveform, 44100, 16000)
    assert ours.shape == (1, 8000)
    assert torch.equal(ours, AF.resample(waveform, 44100, 16000))


@pytest.mark.parametrize("rate, channels", [(8000, 1), (44100, 2), (16000, 1)])
def test_fbank_equals_torchaudio_kaldi_fbank(tmp_path, rate, channels):
    path = tone(tmp_path / "x.wav", rate, seconds=1.0, channels=channels)
    features = audio_features(path, FbankConfig(num_mel_bins=128))
    raw, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    wave = AF.resample(torch.from_numpy(raw).mean(1)[None], rate, 16000)
    expected = kaldi.fbank(wave - wave.mean(), htk_compat=True, sample_frequency=16000, use_energy=False,
                           window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25)
    assert features.shape == (98, 128) == expected.shape  # 1 s: 1 + (16000 - 400) // 160 frames
    assert torch.equal(features, expected)
    assert features[:, :40].mean() > features[:, 90:].mean()  # a 440 Hz tone: energy in the low bins


def test_fit_length_pads_at_the_end_and_crops():
    x = torch.arange(10.0)[:, None].expand(10, 3)
    padded = fit_length(x, 14, train=True, pad_value=-7.0)
    assert padded.shape == (14, 3) and torch.equal(padded[:10], x) and (padded[10:] == -7).all()
    assert torch.equal(fit_length(x, 4, train=False, pad_value=0), x[:4])  # evaluation: the start
    starts = {int(fit_length(x, 4, train=True, pad_value=0)[0, 0]) for _ in range(200)}
    assert starts == set(range(7))  # training: every window of 4 consecutive frames
    for _ in range(5):
        crop = fit_length(x, 4, train=True, pad_value=0)[:, 0]
        assert torch.equal(crop, torch.arange(4.0) + crop[0])


# --- tokenizer ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, patch", [((1024, 128), 16), ((64, 32), (4, 16)), ((48, 40), (16, 8))])
def test_tokenizer_layout_and_exact_inverse(shape, patch):
    tok = SpectrogramTokenizer(SpectrogramOptions(target_length=shape[0], num_mel_bins=shape[1], patch_size=patch))
    pt, pf = (patch, patch) if isinstance(patch, int) else patch
    gt, gf = shape[0] // pt, shape[1] // pf
    assert tok.spec.grid == (gt, gf) and tok.spec.patch_size == (pt, pf) and tok.spec.channels == 1
    assert tok.input_shape == (1, *shape)
    batch = torch.randn(2, 1, *shape)
    patches = tok.tokenize(batch).patches
    assert patches.shape == (2, gt * gf, pt * pf)
    n = gf + 1  # second time row, second frequency column: grid axis 0 is time
    assert torch.equal(patches[:, n], batch[:, 0, pt:2 * pt, pf:2 * pf].reshape(2, -1))
    assert torch.equal(tok.untokenize(patches), batch)
    with pytest.raises(ValueError, match="expects"):
        tok.tokenize(torch.randn(2, 1, shape[1], shape[0]) if shape[0] != shape[1] else torch.randn(2, 2, *shape))


def test_audiomae_grid_and_patch_errors():
    tok = SpectrogramTokenizer(SpectrogramOptions())
    assert tok.spec.grid == (64, 8) and tok.spec.num_tokens == 512 and tok.spec.patch_dim == 256
    masker = TimeFreqMasker(TimeFreqOptions(), tok.spec)  # the time/frequency masker accepts the grid
    mask = masker(2, torch.device("cpu"))
    assert mask.masked.shape == (2, 512)
    with pytest.raises(ValidationError, match="does not divide"):
        SpectrogramOptions(target_length=100, patch_size=16)
    with pytest.raises(ValidationError, match="does not divide"):
        SpectrogramOptions(num_mel_bins=128, patch_size=(16, 24))


def test_spectrogram_picture_and_griffin_lim_audio(tmp_path):
    tok = SpectrogramTokenizer(SpectrogramOptions(target_length=64, num_mel_bins=32, patch_size=16,
                                                  audio_samples=1, griffin_lim_iters=4))
    panels = torch.zeros(2, 4, 1, 64, 32)
    panels[:, :, :, :, :4] = 1.0      # loud lowest mel bins
    panels[:, :, :, 10:20] = 0.25     # and a band of time frames
    panels[:, 1, :, 48:64, 16:32] = 0.5  # the masked panel: one hidden patch (time 3, frequency 1)
    panels[:, 1, :, 0:16, 0:16] = 0.5    # a visible patch that happens to hold 0.5 everywhere: not grey
    masked = torch.zeros(2, 8, dtype=torch.bool)
    masked[:, 3 * 2 + 1] = True          # token (time 3, frequency 1) in the 4 × 2 grid
    paths = tok.save_pictures(panels, tmp_path / "pics" / "epoch0001.png", Mask.from_bool(masked))
    from PIL import Image

    assert [p.name for p in paths] == ["epoch0001.png", "epoch0001-0-original.wav",
                                       "epoch0001-0-reconstruction.wav"]
    picture = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    scale = math.ceil(112 / 32)  # 32 mel bins are enlarged ×4
    assert picture.shape == (14 + 2 * (32 * scale + 2), 4 * (64 * scale + 2), 3)
    top, bottom = picture[14 + 2, 30 * scale], picture[14 + 32 * scale - 2, 30 * scale]
    assert bottom.sum() > top.sum() + 200  # bright (loud) low frequencies are drawn at the bottom
    left = 64 * scale + 2  # the masked panel: its hidden patch (upper half, last quarter of time) is grey
    assert picture[14 + 2, left + 60 * scale].tolist() == [200, 200, 200]
    assert picture[14 + 2, left + 30 * scale].tolist() == top.tolist()
    assert picture[14 + 32 * scale - 2, left + 5 * scale].tolist() != [200, 200, 200]  # visible, though 0.5
    audio, rate = soundfile.read(str(paths[1]))
    assert rate == 16000 and audio.shape[0] > 0.6 * 16000 and np.abs(audio).max() <= 0.9 + 1e-3


def test_griffin_lim_recovers_a_tone_frequency(tmp_path):
    features = audio_features(tone(tmp_path / "t.wav", 16000, seconds=1.0, freq=1000), FbankConfig(128))
    wave = griffin_lim_from_fbank(features, iters=16).numpy()
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 1000) < 60


# --- datasets ----------------------------------------------------------------------------------------------

def test_audio_folder_classes_shapes_and_normalisation(folder):
    data = folder_data(folder)
    assert data.classes == ["high", "low"] and len(data) == 4 and data.skipped == []
    x, label = data[1]
    assert x.shape == SHAPE and x.dtype == torch.float32 and label == 0
    raw = audio_features(folder / "high" / "b.flac", FbankConfig(num_mel_bins=32))  # 48 frames < 64
    assert raw.shape == (48, 32)
    assert torch.allclose(x[0, :48], (raw - AUDIOSET_MEAN) / (2 * AUDIOSET_STD))  # audiomae normalisation
    assert torch.equal(x[0, 48:], torch.zeros(16, 32))  # padded with the mean = 0 after normalisation
    plain = folder_data(folder, norm="standard", mean=-5.0, std=2.0, pad_value=0.0)[1][0]
    assert torch.allclose(plain[0, :48], (raw + 5.0) / 2.0) and torch.allclose(plain[0, 48:], torch.tensor(2.5))
    assert torch.allclose(data.denormalize(x[None])[0, 0, :48], ((raw + 16) / 24).clamp(0, 1), atol=1e-6)
    long = folder_data(folder, classes=["low"])
    assert long.classes == ["low"] and len(long) == 2 and long[1][1] == 0
    assert torch.equal(long[1][0][0], (audio_features(folder / "low" / "d.wav", FbankConfig(32))[:64]
                                       - AUDIOSET_MEAN) / (2 * AUDIOSET_STD))  # evaluation crops the start
    with pytest.raises(ValueError, match="classes without recordings"):
        folder_data(folder, classes=["notes"])


def test_training_crops_vary_and_roll_gain_changes_levels(folder):
    data = folder_data(folder, train=True, classes=["low"])
    torch.manual_seed(0)
    crops = {tuple(data[1][0][0, :, 0].tolist()) for _ in range(6)}
    assert len(crops) > 1  # random windows of the 1.5 s recording
    augmented = folder_data(folder, train=True, roll_gain=True, classes=["low"])
    plain = folder_data(folder, train=False, classes=["low"])
    a, p = augmented[0][0], plain[0][0]  # 0.5 s: no crop; roll + gain only
    assert a.shape == p.shape and not torch.allclose(a, p)
    assert torch.allclose(a.sort(dim=1).values.mean(), p.sort(dim=1).values.mean(), atol=0.1)


def test_wrong_input_shape_is_rejected(folder):
    with pytest.raises(ValueError, match="spectrogram tokenizer"):
        folder_data(folder, shape=(3, 64, 32))


def write_csv(path: Path, rows: list[tuple[str, str]], header=("path", "labels")) -> Path:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_single_label(folder):
    table = write_csv(folder / "list.csv", [("high/a.wav", "bird"), ("low/c.ogg", "dog"),
                                            (str(folder / "low" / "d.wav"), "bird")])
    data = AudioCsvDataset(AudioCsvOptions(csv=str(table)), SHAPE, False)
    assert data.classes == ["bird", "dog"] and [label for _, label in data.items] == [0, 1, 0]
    assert data[1][1] == 1
    fixed = AudioCsvDataset(AudioCsvOptions(csv=str(table), classes=["dog", "bird", "cat"]), SHAPE, False)
    assert [label for _, label in fixed.items] == [1, 0, 1]
    two = write_csv(folder / "two.csv", [("high/a.wav", "bird;dog")])
    with pytest.raises(ValueError, match="line 2 has 2 labels"):
        AudioCsvDataset(AudioCsvOptions(csv=str(two)), SHAPE, False)
    with pytest.raises(ValueError, match="not in classes"):
        AudioCsvDataset(AudioCsvOptions(csv=str(table), classes=["dog"]), SHAPE, False)


def test_csv_multi_label_and_esc50_style_columns(folder):
    table = write_csv(folder / "multi.csv", [("high/a.wav", "speech;music"), ("low/c.ogg", "music")])
    data = AudioCsvDataset(AudioCsvOptions(csv=str(table), multi_label=True), SHAPE, False)
    assert data.classes == ["music", "speech"]
    assert torch.equal(data[0][1], torch.tensor([1.0, 1.0])) and torch.equal(data[1][1], torch.tensor([1.0, 0.0]))
    batch = torch.utils.data.default_collate([data[0], data[1]])
    assert batch[0].shape == (2, *SHAPE) and batch[1].shape == (2, 2)
    audioset = write_csv(folder / "as.csv", [("high/a.wav", "/m/09x0r,/m/04rlf")])  # quoted by csv: "a,b"
    assert '"/m/09x0r,/m/04rlf"' in audioset.read_text()
    data = AudioCsvDataset(AudioCsvOptions(csv=str(audioset), multi_label=True, label_separator=","), SHAPE, False)
    assert data.classes == ["/m/04rlf", "/m/09x0r"] and data[0][1].tolist() == [1.0, 1.0]
    esc = write_csv(folder / "esc50.csv", [("a.wav", "1", "dog"), ("b.flac", "2", "rain")],
                    header=("filename", "fold", "category"))
    data = AudioCsvDataset(AudioCsvOptions(csv=str(esc), root=str(folder / "high"), path_column="filename",
                                           labels_column="category", where={"fold": ["2"]}), SHAPE, False)
    assert len(data) == 1 and data.items[0][0].name == "b.flac" and data[0][1] == 0
    unlabelled = AudioCsvDataset(AudioCsvOptions(csv=str(esc), root=str(folder / "high"), path_column="filename",
                                                 labels_column=None), SHAPE, False)
    assert unlabelled[0][1] == -1
    with pytest.raises(ValueError, match="no column"):
        AudioCsvDataset(AudioCsvOptions(csv=str(esc)), SHAPE, False)


def test_unreadable_files_are_skipped_counted_and_logged_once(folder, caplog):
    (folder / "high" / "empty.wav").write_bytes(b"")
    (folder / "high" / "text.wav").write_text("this is not a wave file")
    soundfile.write(str(folder / "low" / "silent.wav"), np.zeros((0, 1), np.float32), 16000)
    tone(folder / "low" / "tick.wav", 16000, seconds=0.01)  # 160 samples: shorter than one 400-sample frame
    with caplog.at_level(logging.WARNING, logger="maeframe.audio"):
        data = folder_data(folder)
    assert len(data) == 4 and sorted(p.name for p in data.skipped) == ["empty.wav", "silent.wav", "text.wav",
                                                                       "tick.wav"]
    assert all(sum(p.name in r.message for r in caplog.records) == 1 for p in data.skipped)
    assert all(torch.isfinite(data[i][0]).all() for i in range(len(data)))
    # reported to the engine, which judges them with the one limit, data.max_bad_fraction
    assert sorted(line.split(":")[0].rsplit("/", 1)[1] for line in data.unreadable()) == [
        "empty.wav", "silent.wav", "text.wav", "tick.wav"]


def test_file_failing_to_decode_is_counted_then_replaced_by_the_engine_loader(folder, caplog, monkeypatch):
    data = folder_data(folder)
    real_read = soundfile.read

    def read(file, *args, **kwargs):  # a.wav: header fine (the probe passed), data corrupt
        if str(file).endswith("a.wav"):
            raise RuntimeError("Internal psf_fseek() failed")
        return real_read(file, *args, **kwargs)

    monkeypatch.setattr(soundfile, "read", read)
    with pytest.raises(AudioError, match="a.wav"):
        data[0]
    assert data.describe(0).endswith("a.wav")
    loader_view = SeededDataset(data)  # what the engine's DataLoader reads through
    with caplog.at_level(logging.WARNING):
        first, again = loader_view[(0, 1)], loader_view[(0, 2)]
    assert torch.equal(first[0], data[1][0]) and first[1] == 0 and first[2] == 1  # next recording, 1 failure
    assert again[2] == 1 and [p.name for p in data.skipped] == ["a.wav"] * 3  # counted at each failure ...
    assert sum("a.wav" in r.message for r in caplog.records) == 1  # ... logged once, with the path


def test_feature_cache_serves_later_epochs(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    data = folder_data(folder, cache_dir=str(cache))
    first = [data[i] for i in range(len(data))]  # epoch 1 decodes and stores
    assert data.cache.misses == 4 and data.cache.hits == 0
    entries = sorted(cache.rglob("*.npy"))
    assert len(entries) == 4 and not list(cache.rglob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(soundfile, "read", no_decoding)
    monkeypatch.setattr(soundfile, "info", no_decoding)  # a new dataset with a warm cache skips the probe too
    for reader in (data, folder_data(folder, cache_dir=str(cache))):
        second = [reader[i] for i in range(len(reader))]  # epoch 2 reads the cache only
        assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, second))
        assert reader.cache.hits == 4 and reader.skipped == []
    monkeypatch.undo()
    other = folder_data(folder, cache_dir=str(cache), frame_shift_ms=20.0)  # other options: other entries
    other[0]
    assert other.cache.misses == 1 and len(list(cache.rglob("*.npy"))) == 5
    os.utime(folder / "high" / "a.wav", ns=(1, 1))  # a changed file is decoded again
    assert data.cache.entry(folder / "high" / "a.wav") not in entries
    with pytest.raises(ValidationError, match="dither"):
        AudioFolderOptions(root=str(folder), cache_dir=str(cache), dither=1.0)


def test_stats_command_prints_and_writes(folder, tmp_path, capsys):
    recipe = RECIPES / "audio_klettres.yaml"
    stats_file = tmp_path / "stats" / "sounds.json"
    overrides = ["data.train.name=audio_folder", f"data.train.options={{root: {folder}, mean: 0.0, std: 1.0}}",
                 "tokenizer.options.target_length=64", "tokenizer.options.num_mel_bins=32"]
    values = torch.cat([audio_features(p, FbankConfig(32)) for p in sorted(folder.rglob("*.*"))
                        if p.suffix in (".wav", ".flac", ".ogg")]).double()
    assert main(["audio-stats", str(recipe), *overrides]) == 0
    out = capsys.readouterr().out
    mean, std = (float(v) for v in re.search(r"mean (\S+)  std (\S+)", out).groups())
    assert mean == pytest.approx(float(values.mean()), abs=2e-6)
    assert std == pytest.approx(float(values.std(unbiased=False)), abs=2e-6)
    assert f"data.train.options.mean={mean:.6f} data.train.options.std={std:.6f}" in out and "4 recordings" in out
    assert main(["audio-stats", str(recipe), *overrides, "--write"]) == 2  # no stats_file to write to
    assert "stats_file" in capsys.readouterr().err
    overrides[1] = f"data.train.options={{root: {folder}, stats_file: {stats_file}}}"
    assert main(["audio-stats", str(recipe), *overrides, "--limit", "2", "--write"]) == 0
    stats = json.loads(stats_file.read_text())
    assert stats["num_files"] == 2 and stats["num_mel_bins"] == 32 and stats["std"] > 0
    data = folder_data(folder, stats_file=str(stats_file))  # the dataset reads its normalisation from it
    assert (data.mean, data.std) == (stats["mean"], stats["std"])
    with pytest.raises(FileNotFoundError, match="audio-stats"):
        folder_data(folder, stats_file=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="mel bins"):
        folder_data(folder, stats_file=str(stats_file), shape=(1, 64, 16))


@pytest.mark.skipif(not KLETTRES.is_dir(), reason="klettres-data is not installed")
def test_klettres_languages_sounds_and_split():
    options = dict(languages=["fr", "en"], kinds=["alpha"])
    data = KlettresDataset(KlettresOptions(**options), SHAPE, False)
    assert data.classes == ["fr", "en"] and len(data) == 52  # 26 letters each
    assert {label for _, label in data.items} == {0, 1}
    sounds = KlettresDataset(KlettresOptions(**options, label="sound"), SHAPE, False)
    assert sounds.classes == [chr(ord("A") + i) for i in range(26)]
    path, label = sounds.items[0]  # fr/alpha/a-0.ogg is "A" in fr/sounds.xml
    assert path.name == "a-0.ogg" and sounds.classes[label] == "A"
    train = KlettresDataset(KlettresOptions(**options, split="train"), SHAPE, False)
    test = KlettresDataset(KlettresOptions(**options, split="test"), SHAPE, False)
    assert len(train) + len(test) == 52 and not {p for p, _ in train.items} & {p for p, _ in test.items}
    x, _ = test[0]
    assert x.shape == SHAPE and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="no alpha recordings for"):
        KlettresDataset(KlettresOptions(languages=["xx"], kinds=["alpha"]), SHAPE, False)


def test_registered_under_their_names():
    registry = Registry(make_plugin_manager())
    assert registry.get("tokenizer", "spectrogram").cls is SpectrogramTokenizer
    assert registry.get("dataset", "audio_folder").cls is AudioFolderDataset
    assert registry.get("dataset", "audio_csv").cls is AudioCsvDataset
    assert registry.get("dataset", "klettres").cls is KlettresDataset


# --- windowed (local) decoder attention --------------------------------------------------------------------

def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module


@pytest.mark.parametrize("grid, window, shift", [((4, 6), (4, 6), (0, 0)), ((8, 4), (4, 2), (0, 0)),
                                                 ((8, 4), (4, 2), (2, 1)), ((8, 8), (4, 4), (2, 0)),
                                                 ((6, 4), (3, 4), (1, 3)), ((4, 6), (16, 16), (2, 2))])
def test_windowed_block_equals_masked_global_attention(grid, window, shift):
    """A timm Block with the same weights and the dense mask of the windows (the cls token apart) gives the
    same output; a window over the whole grid (clamped, unshifted) is global attention among grid tokens."""
    dim, heads = 32, 4
    block = randomized(WindowedBlock(dim, heads, grid, window, shift))
    dense = Block(dim, heads, 4.0, qkv_bias=True, norm_layer=LayerNorm)
    dense.load_state_dict(block.state_dict())
    x = torch.randn(3, 1 + grid[0] * grid[1], dim)
    mask = reference_mask(grid, block.attn.window, block.attn.shift)
    assert torch.allclose(block(x), dense(x, attn_mask=mask), atol=1e-5)
    if window == (16, 16):
        assert block.attn.window == grid and block.attn.shift == (0, 0) and mask[1:, 1:].all()


def test_windows_are_local_and_shifted_windows_do_not_wrap():
    assert window_groups(8, 4, 0).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert window_groups(8, 4, 2).tolist() == [-1, -1, 0, 0, 0, 0, 1, 1]  # borders at 2 and 6, no wrap-around
    grid, dim = (8, 8), 16
    for shift, reach in [((0, 0), (slice(0, 4), slice(0, 4))), ((2, 2), (slice(0, 2), slice(0, 2)))]:
        attn = randomized(WindowedAttention(dim, 2, grid, (4, 4), shift))
        x = torch.randn(1, 65, dim)
        y = x.clone()
        y[0, 1] += 1.0  # perturb grid token (0, 0)
        changed = (attn(x) - attn(y)).abs().sum(-1)[0, 1:].view(grid) > 1e-6
        expected = torch.zeros(grid, dtype=torch.bool)
        expected[reach] = True
        assert torch.equal(changed, expected)


def test_windowed_stack_alternates_shifts_and_fits_the_core_decoder():
    blocks = make_windowed_blocks(32, 4, 4, 4.0, grid=(64, 8), window=(4, 4), shift=(2, 0))  # AudioMAE
    assert [b.attn.shift for b in blocks] == [(0, 0), (2, 0), (0, 0), (2, 0)]
    assert [b.attn.shift for b in make_windowed_blocks(32, 2, 4, 4.0, (8, 8), (4, 4))] == [(0, 0), (2, 2)]
    with pytest.raises(ValueError, match="does not divide"):
        make_windowed_blocks(32, 1, 4, 4.0, grid=(6, 8), window=(4, 4))
    with pytest.raises(ValueError, match="smaller than the window"):
        WindowedAttention(32, 4, (8, 8), (4, 4), (4, 0))
    # drop-in for the core decoder's global blocks (what the proposed ModelConfig switch would build)
    tok = SpectrogramTokenizer(SpectrogramOptions(target_length=64, num_mel_bins=32, patch_size=8))  # 8×4 grid
    prepared = prepare(RECIPES / "audio_klettres.yaml", ["model.decoder_embed_dim=32", "model.decoder_num_heads=4",
                                                         "model.embed_dim=32", "model.num_heads=2", "model.depth=1"])
    model = MaskedAutoencoder(tok.spec, tok.spec.patch_dim, prepared.recipe.model)
    model.decoder.blocks = make_windowed_blocks(32, 2, 4, 4.0, tok.spec.grid, (4, 2))
    mask = TimeFreqMasker(TimeFreqOptions(), tok.spec)(2, torch.device("cpu"))
    prediction = model(tok.tokenize(torch.randn(2, 1, 64, 32)).patches, mask)
    assert prediction.values.shape == (2, 32, 64)
    prediction.values.square().mean().backward()
    assert model.decoder.blocks[1].attn.qkv.weight.grad.abs().sum() > 0


# --- recipes and a real run --------------------------------------------------------------------------------

def test_audio_recipes_validate(capsys):
    assert len(AUDIO_RECIPES) >= 2
    assert main(["validate", *map(str, AUDIO_RECIPES)]) == 0
    out = capsys.readouterr().out
    assert "grid (64, 8), 512 tokens of 256" in out and "grid (8, 8), 64 tokens of 256" in out


@pytest.mark.skipif(not KLETTRES.is_dir(), reason="klettres-data is not installed")
def test_pretraining_steps_on_real_klettres_recordings(tmp_path):
    cache = tmp_path / "cache"
    overrides = [
        "data.train.options.languages=[en, fr]", "data.train.options.kinds=[alpha]", "data.train.options.limit=24",
        f"data.train.options.cache_dir={cache}", f"data.eval.options.cache_dir={cache}",
        "data.eval.options.languages=[en]", "data.eval.options.kinds=[alpha]", "data.eval.options.limit=4",
        "data.batch_size=8", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1",
        "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=16",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "runtime.progress_bar=false",
        "runtime.tensorboard=false", "runtime.log_interval=1", "runtime.visualize_interval=2",
        "runtime.visualize_samples=2", "tokenizer.options.audio_samples=1", "tokenizer.options.griffin_lim_iters=2",
        f"runtime.output_dir={tmp_path}",
    ]
    trainer = Pretrainer(prepare(RECIPES / "audio_klettres.yaml", overrides))
    assert len(trainer.dataset) == 24 and trainer.components.tokenizer.spec.grid == (8, 8)
    trainer.train()
    run = tmp_path / "audio_klettres"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 7))  # 24 / 8 × 2 epochs
    assert all(math.isfinite(line["loss"]) for line in lines)
    pictures = run / "reconstructions"
    assert (pictures / "epoch0002.png").is_file()
    assert (pictures / "epoch0002-0-original.wav").is_file() and (pictures / "epoch0002-0-reconstruction.wav").is_file()
    assert len(list(cache.rglob("*.npy"))) == 24 + 2  # training files + the pictures' eval samples


def test_recordings_unreadable_when_listed_fall_under_data_max_bad_fraction(folder, tmp_path, capsys):
    """One knob for every modality: files failing the header check when the dataset is built count as failed
    reads under data.max_bad_fraction (named in the error, which is no 'invalid recipe'), and are reported
    in metrics.jsonl and run.json."""
    (folder / "high" / "empty.wav").write_bytes(b"")
    (folder / "low" / "text.wav").write_text("this is not a wave file")
    overrides = ["data.train.name=audio_folder", f"data.train.options={{root: {folder}, mean: 0.0, std: 1.0}}",
                 "data.eval=null", "tokenizer.options.target_length=64", "tokenizer.options.num_mel_bins=32",
                 "data.batch_size=2", "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0",
                 "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=16",
                 "model.decoder_depth=1", "model.decoder_num_heads=2", "runtime.progress_bar=false",
                 "runtime.tensorboard=false", "runtime.log_interval=1", "runtime.visualize_interval=9",
                 "tokenizer.options.audio_samples=0", f"runtime.output_dir={tmp_path / 'runs'}"]
    assert main(["run", str(RECIPES / "audio_klettres.yaml"), *overrides, "data.max_bad_fraction=0.2"]) == 2
    err = capsys.readouterr().err
    assert "2 of 6 files of the training set cannot be read" in err and "data.max_bad_fraction=0.2" in err
    assert "invalid recipe" not in err and "empty.wav" in err
    assert main(["validate", "--data", str(RECIPES / "audio_klettres.yaml"),
                 *[f"--set={o}" for o in overrides], "--set=data.max_bad_fraction=0.2"]) == 2
    assert "data.max_bad_fraction" in capsys.readouterr().err
    assert main(["run", str(RECIPES / "audio_klettres.yaml"), *overrides, "data.max_bad_fraction=0.5", "name=ok"]) == 0
    run = tmp_path / "runs" / "ok"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["unreadable_at_build"] == 2 and lines[-1]["bad_samples"] == 0
    facts = json.loads((run / "run.json").read_text())["unreadable_at_build"]
    assert facts["count"] == 2 and any("empty.wav" in line for line in facts["first"])
