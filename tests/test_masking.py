import pytest
import torch

from maeframe import Mask, TokenSpec, visible_count
from maeframe_plugins.masking import RandomMasker, RandomOptions

SPEC = TokenSpec(grid=(14, 14), patch_size=(16, 16), channels=3)


def test_random_masker_hides_exactly_the_ratio_per_sample():
    mask = RandomMasker(RandomOptions(ratio=0.75), SPEC)(32, torch.device("cpu"))
    assert mask.ids_keep.shape == (32, 49)
    assert torch.equal(mask.masked.sum(1), torch.full((32,), 147.0))
    # visible tokens are exactly the unmasked ones, and ids_restore inverts the shuffle
    assert torch.gather(mask.masked, 1, mask.ids_keep).sum() == 0
    ids_shuffle = torch.argsort(mask.ids_restore, dim=1)  # ids_restore is a permutation of 0..N-1
    assert torch.equal(torch.sort(mask.ids_restore, dim=1).values, torch.arange(196).expand(32, -1))
    assert torch.equal(ids_shuffle[:, :49], mask.ids_keep)
    assert torch.equal(mask.masked, (mask.ids_restore >= 49).float())


def test_masks_differ_across_samples_and_calls():
    masker = RandomMasker(RandomOptions(ratio=0.5), SPEC)
    first, second = masker(4, torch.device("cpu")), masker(4, torch.device("cpu"))
    assert not torch.equal(first.masked[0], first.masked[1])
    assert not torch.equal(first.masked, second.masked)


def test_from_noise_matches_the_reference_formula():
    noise = torch.rand(3, 20)
    keep = visible_count(20, 0.75)
    mask = Mask.from_noise(noise, keep)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    reference = torch.ones(3, 20)
    reference[:, :keep] = 0
    reference = torch.gather(reference, 1, ids_restore)
    assert keep == 5
    assert torch.equal(mask.masked, reference)
    assert torch.equal(mask.ids_keep, ids_shuffle[:, :keep])


def test_explicit_mask_round_trips():
    hidden = torch.zeros(2, 6, dtype=torch.bool)
    hidden[0, [0, 2, 4]] = True
    hidden[1, [1, 2, 3]] = True
    mask = Mask.from_bool(hidden)
    assert torch.equal(mask.masked.bool(), hidden)
    assert mask.ids_keep.tolist() == [[1, 3, 5], [0, 4, 5]]


def test_explicit_mask_with_unequal_counts_is_rejected():
    hidden = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match="same number"):
        Mask.from_bool(hidden)
