"""klettres_letters: real KLettres recordings paired with clips of the same letter in the machine's fonts."""
from pathlib import Path

import pytest
import torch

from maeframe_plugins.letter_glyphs import draws, find_fonts, render_glyph
from maeframe_plugins.spoken_letters import (SpokenLetterClips, SpokenLetterSounds, SpokenLettersDataset,
                                             SpokenLettersOptions)

SHAPES = {"audio": (1, 96, 32), "visual": (1, 32, 32)}


def letters(split, train=False, shapes=SHAPES, **options):
    options = SpokenLettersOptions(split=split, languages=["en", "fr", "hu"], **options)
    return SpokenLettersDataset(options, shapes, train)


@pytest.fixture(scope="module")
def test_set():
    return letters("test")


def test_pairs_real_recordings_with_the_letter_they_say(test_set):
    assert len(test_set) > 0
    sample, label = test_set[0]
    assert sample["audio"].shape == (1, 96, 32) and sample["visual"].shape == (1, 32, 32)
    path = Path(test_set.describe(0))
    assert path.is_file() and path.parent.name == "alpha" and path.parts[-3] in ("en", "fr", "hu")
    assert test_set.classes[label] == test_set.letters[0]
    assert sample["audio"].std() > 0.05  # real sound, not padding
    visual = sample["visual"][0]
    assert (visual > 0.5).sum() > 10 and (visual < 0.01).float().mean() > 0.3  # a drawn glyph on black


def test_evaluation_clips_are_fixed_and_training_clips_follow_the_seed(test_set):
    assert torch.equal(test_set[1][0]["visual"], test_set[1][0]["visual"])
    train = letters("train", train=True, shapes={"audio": (1, 96, 32), "visual": (3, 4, 32, 32)})
    torch.manual_seed(5)
    first = train[2][0]["visual"]
    torch.manual_seed(5)
    again = train[2][0]["visual"]
    torch.manual_seed(6)
    other = train[2][0]["visual"]
    assert first.shape == (3, 4, 32, 32) and torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[:, 0], first[:, 3])  # the letter moves (this seed draws a non-zero speed)
    fixed = letters("train", train=True, redraw=False)
    torch.manual_seed(5)
    kept = fixed[2][0]["visual"]
    torch.manual_seed(6)
    assert torch.equal(kept, fixed[2][0]["visual"])  # redraw: false ignores the per-sample seed
    assert not torch.equal(kept, fixed[3][0]["visual"])


def test_glyphs_differ_between_letters():
    font = str(find_fonts()[0])
    a, b = render_glyph("A", font, 40), render_glyph("B", font, 40)
    assert a.max() > 0.9 and (a.shape != b.shape or not torch.equal(a, b))
    assert draws(font, "A") and not draws(font, "\u0d05")  # Malayalam: not in DejaVu


def test_split_is_disjoint_deterministic_and_shares_classes(test_set):
    train, test_again = letters("train"), letters("test")
    train_files = {train.describe(i) for i in range(len(train))}
    test_files = {test_set.describe(i) for i in range(len(test_set))}
    assert not train_files & test_files
    assert test_files == {test_again.describe(i) for i in range(len(test_again))}
    assert len(test_set) == pytest.approx(len(train) / 4, abs=3)  # 1 in 5 of each language
    assert train.classes == test_set.classes


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="fonts-dejavu-core"):
        letters("test", font_dirs=[str(tmp_path)])
    with pytest.raises(ValueError, match="none of the .* fonts draws"):
        SpokenLettersDataset(SpokenLettersOptions(split="test", languages=["ml"]), SHAPES, False)
    with pytest.raises(ValueError, match="audio_modality"):
        letters("test", shapes={"sound": (1, 96, 32), "visual": (1, 32, 32)})


def test_single_modality_variants_give_the_same_samples(test_set):
    options = SpokenLettersOptions(split="test", languages=["en", "fr", "hu"])
    sounds = SpokenLetterSounds(options, (1, 96, 32), False)
    clips = SpokenLetterClips(options, (1, 32, 32), False)
    (audio, label), (pair, pair_label) = sounds[3], test_set[3]
    assert label == pair_label == clips[3][1] and torch.equal(audio, pair["audio"])
    assert torch.equal(clips[3][0], pair["visual"]) and not sounds.paired and test_set.paired


def test_pictures_undo_each_modalitys_normalisation(test_set):
    sample, _ = test_set[0]
    visual = test_set.denormalize(sample["visual"][None])
    assert torch.allclose(visual, (sample["visual"][None] * 1.0 + 0.0).clamp(0, 1))  # mean 0, std 1 here
    audio = test_set.denormalize(sample["audio"][None])
    assert torch.equal(audio, test_set.audio.denormalize(sample["audio"][None]))
    with pytest.raises(ValueError, match="cannot tell"):
        test_set.denormalize(torch.zeros(1, 2, 3, 4))
