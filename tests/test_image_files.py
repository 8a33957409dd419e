"""Image files as users have them: the decoder (transparency, arrays of any channel count, the pixel limit),
`image_files`, `image_list`, per-channel statistics (`maeframe image-stats`) and the pictures' channels."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from maeframe.build import build_dataset, prepare
from maeframe.cli import main
from maeframe.errors import RecipeError
from maeframe_plugins.image import ImagePatchOptions, ImagePatchTokenizer
from maeframe_plugins.image_decode import DecodeOptions, ImageTooLarge, decode, image_extensions
from maeframe_plugins.image_files import ImageFilesDataset, ImageFilesOptions
from conftest import QUICKSTART, tiny
from test_user_data_runs import fmnist, four_bands, write_csv_list, write_nested

RED, WHITE = (255, 0, 0), (255, 255, 255)


def dataset(tmp_path, *extra, split="train"):
    return build_dataset(prepare(QUICKSTART, tiny(tmp_path / "out", *extra)), split)


# --- the decoder ------------------------------------------------------------------------------------


def transparent_red(mode, size=(6, 4)):
    """An image whose left half is opaque black and right half fully transparent with red colour values."""
    rgba = Image.new("RGBA", size, (0, 0, 0, 255))
    rgba.paste(Image.new("RGBA", (size[0] // 2, size[1]), (*RED, 0)), (size[0] // 2, 0))
    if mode == "P":  # a palette with one transparent entry (GIF-style)
        palette = rgba.convert("RGB").quantize(colors=4)
        palette.info["transparency"] = palette.getpixel((size[0] - 1, 0))
        return palette
    return rgba.convert(mode) if mode != "RGBA" else rgba


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_onto_the_background(tmp_path, mode):
    path = tmp_path / f"{mode}.png"
    transparent_red(mode).save(path)
    default = decode(path, str(path), 3, DecodeOptions())
    assert default.shape == (3, 4, 6) and default.dtype == torch.uint8
    assert default[:, :, :3].eq(0).all()  # the opaque half as it is
    assert default[:, :, 3:].eq(255).all()  # the invisible half white (the default), not its stored red
    blue = decode(path, str(path), 3, DecodeOptions(background=(0, 0, 200)))
    assert blue[:, :, 3:].flatten(1).unique(dim=1).tolist() == [[0], [0], [200]]
    grey = decode(path, str(path), 1, DecodeOptions(background=(0, 0, 0)))
    assert grey.shape == (1, 4, 6) and grey.eq(0).all()


def test_alpha_can_be_kept_as_a_fourth_channel(tmp_path):
    path = tmp_path / "rgba.png"
    transparent_red("RGBA").save(path)
    kept = decode(path, str(path), 4, DecodeOptions(alpha="keep"))
    assert kept.shape == (4, 4, 6) and kept[3, :, :3].eq(255).all() and kept[3, :, 3:].eq(0).all()
    Image.new("RGB", (6, 4), RED).save(tmp_path / "opaque.png")  # no alpha: an opaque one is added
    assert decode(tmp_path / "opaque.png", "opaque.png", 4, DecodeOptions(alpha="keep"))[3].eq(255).all()
    with pytest.raises(ValueError, match="has 3 channels, the tokenizer expects 4"):
        decode(tmp_path / "opaque.png", "opaque.png", 4, DecodeOptions())


def test_the_pixel_limit_is_an_option_with_a_clear_message(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    with pytest.raises(ImageTooLarge, match=r"60000 pixels, above max_pixels=50000.*data\.train\.options\.max_pixels"):
        decode(path, str(path), 1, DecodeOptions(max_pixels=50000))
    assert decode(path, str(path), 1, DecodeOptions(max_pixels=None)).shape == (1, 200, 300)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own limit is restored after opening
    assert DecodeOptions().max_pixels == Image.MAX_IMAGE_PIXELS


def test_arrays_of_any_channel_count_and_bit_depth(tmp_path):
    image = fmnist(1)[0][0]
    bands = four_bands(image)
    np.save(tmp_path / "chw.npy", bands)
    np.save(tmp_path / "hwc.npy", bands.transpose(1, 2, 0).copy())
    for name in ("chw.npy", "hwc.npy"):
        assert torch.equal(decode(tmp_path / name, name, 4, DecodeOptions()), torch.from_numpy(bands))
    with pytest.raises(ValueError, match=r"no axis of 5 channels"):
        decode(tmp_path / "chw.npy", "chw.npy", 5, DecodeOptions())
    sixteen = np.stack([image.astype(np.uint16) * 257] * 13)  # 13 bands of 16-bit values (Sentinel-2-like)
    import tifffile

    tifffile.imwrite(tmp_path / "s2.tif", sixteen)
    decoded = decode((tmp_path / "s2.tif").read_bytes(), "s2.tif", 13, DecodeOptions())
    assert decoded.dtype == torch.float32 and decoded.shape == (13, 28, 28)
    assert torch.allclose(decoded[0], torch.from_numpy(image / 255).float(), atol=1e-6)  # / 65535
    np.save(tmp_path / "float.npy", np.full((2, 3, 3), 7.5, dtype=np.float32))
    assert decode(tmp_path / "float.npy", "float.npy", 2, DecodeOptions()).eq(7.5).all()  # floats as stored


def test_default_extensions_cover_pillow_tiff_and_arrays():
    taken = image_extensions()
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".npy"} <= set(taken)
    assert ".h5" not in taken and ".eps" not in taken  # identified by Pillow but not decodable by it alone


# --- image_files -------------------------------------------------------------------------------------


def test_image_files_finds_every_image_at_any_depth_unlabelled(tmp_path, caplog):
    root = write_nested(tmp_path / "photos")
    with caplog.at_level("WARNING", logger="maeframe.data"):
        found = ImageFilesDataset(ImageFilesOptions(root=str(root), mean=(0.5,), std=(0.5,)), (1, 28, 28), True)
    assert len(found) == 65 and found.paths == sorted(found.paths)  # 64 images + the broken one
    assert {p.rsplit(".", 1)[1] for p in found.paths} == {"png", "jpg", "bmp"}
    assert any("/2024/05/scans/" in p for p in found.paths)
    assert "passed over 1 file" in caplog.text and "with extension .txt" in caplog.text
    image, label = found[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == -1
    with pytest.raises(Exception, match="cannot identify image file"):
        found[found.paths.index(str(root / "site0" / "broken.png"))]
    only_png = ImageFilesDataset(ImageFilesOptions(root=str(root), extensions=["png"], mean=(0.5,), std=(0.5,)),
                                 (1, 28, 28), True)
    assert len(only_png) == 23 and all(p.endswith(".png") for p in only_png.paths)


def test_image_files_errors_name_the_option(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.train\.options\.root: image_files: root .*nowhere"):
        dataset(tmp_path, f"data.train={{name: image_files, options: {{root: '{tmp_path / 'nowhere'}', "
                          f"mean: [0.5], std: [0.5]}}}}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(RecipeError, match="no image under"):
        dataset(tmp_path, f"data.train={{name: image_files, options: {{root: '{tmp_path / 'empty'}', "
                          f"mean: [0.5], std: [0.5]}}}}")
    Image.new("L", (8, 8)).save(tmp_path / "empty" / "a.png")
    with pytest.raises(RecipeError, match=r"data\.train\.options\.mean: 3 values but the tokenizer expects 1.*image-stats"):
        dataset(tmp_path, f"data.train={{name: image_files, options: {{root: '{tmp_path / 'empty'}'}}}}")


# --- image_list --------------------------------------------------------------------------------------


def test_csv_list_with_class_names_relative_paths_and_unlabelled_rows(tmp_path):
    listing = write_csv_list(tmp_path)
    listed = dataset(tmp_path, f"data.train={{name: image_list, options: {{list: '{listing}', "
                               f"label_column: label, mean: [0.5], std: [0.5]}}}}")
    _, labels = fmnist()
    assert len(listed) == 65 and listed.classes == sorted({f"class{n}" for n in labels})
    assert listed.labels[0] == listed.classes.index(f"class{labels[0]}") and listed.labels[5] == -1
    assert listed.describe(3) == str(listing.parent / "../images/3.png")
    image, label = listed[3]
    assert image.shape == (1, 28, 28) and label == listed.classes.index(f"class{labels[3]}")
    with pytest.raises(FileNotFoundError):
        listed[64]  # listed, missing: the engine counts it as unreadable
    unlabelled = dataset(tmp_path, f"data.train={{name: image_list, options: {{list: '{listing}', "
                                   f"mean: [0.5], std: [0.5]}}}}")
    assert set(unlabelled.labels) == {-1} and unlabelled.classes is None


def test_txt_list_with_and_without_integer_labels(tmp_path):
    images, labels = fmnist(4)
    (tmp_path / "a b").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "a b" / f"{i}.png")
    (tmp_path / "plain.txt").write_text("# images\n" + "".join(f"a b/{i}.png\n" for i in range(4)) + "\n")
    (tmp_path / "labelled.txt").write_text("".join(f"a b/{i}.png {labels[i]}\n" for i in range(4)))
    options = "mean: [0.5], std: [0.5]"
    plain = dataset(tmp_path, f"data.train={{name: image_list, options: {{list: '{tmp_path / 'plain.txt'}', {options}}}}}")
    assert len(plain) == 4 and plain.labels == [-1] * 4 and plain.paths[1].endswith("a b/1.png")
    labelled = dataset(tmp_path, f"data.train={{name: image_list, options: {{list: '{tmp_path / 'labelled.txt'}', "
                                 f"label_column: 1, {options}}}}}")
    assert labelled.labels == labels[:4].tolist() and labelled[2][1] == labels[2]


def test_list_mistakes_name_the_option(tmp_path):
    listing = write_csv_list(tmp_path)
    base = f"list: '{listing}', mean: [0.5], std: [0.5]"
    with pytest.raises(RecipeError, match=r"data\.train\.options\.path_column: .*no column 'file'; its header: path, label"):
        dataset(tmp_path, f"data.train={{name: image_list, options: {{{base}, path_column: file}}}}")
    with pytest.raises(RecipeError, match=r"data\.train\.options\.label_column: .*no column 'class'"):
        dataset(tmp_path, f"data.train={{name: image_list, options: {{{base}, label_column: class}}}}")
    with pytest.raises(RecipeError, match=r"data\.train\.options\.root: image_list: none of 20 paths checked .*set root"):
        dataset(tmp_path, f"data.train={{name: image_list, options: {{{base}, root: '{tmp_path / 'elsewhere'}'}}}}")
    (tmp_path / "moved.csv").write_text(listing.read_text())  # ../images/ is now outside tmp_path
    with pytest.raises(RecipeError, match=r"data\.train\.options\.list: image_list: none of 20 paths checked"):
        dataset(tmp_path, f"data.train={{name: image_list, options: {{list: '{tmp_path / 'moved.csv'}', "
                          f"mean: [0.5], std: [0.5]}}}}")
    with pytest.raises(RecipeError, match=r"data\.train\.options\.list: image_list: list .*absent\.csv"):
        dataset(tmp_path, f"data.train={{name: image_list, options: {{list: '{tmp_path / 'absent.csv'}', mean: [0.5], std: [0.5]}}}}")


# --- statistics and pictures -------------------------------------------------------------------------


def test_image_stats_computes_per_channel_mean_and_std(tmp_path, capsys):
    images, _ = fmnist(16)
    for i, image in enumerate(images):
        np.save(tmp_path / f"{i}.npy", four_bands(image))
    stats_file = tmp_path / "stats" / "bands.json"
    source = [f"data.train={{name: image_files, options: {{root: '{tmp_path}', stats_file: '{stats_file}'}}}}",
              "tokenizer.options.channels=4", f"runtime.output_dir={tmp_path / 'out'}"]
    assert main(["image-stats", str(QUICKSTART), *source, "--write"]) == 0
    printed = capsys.readouterr().out
    stored = json.loads(stats_file.read_text())
    values = np.stack([four_bands(image) for image in images]).astype(np.float64) / 255
    assert np.allclose(stored["mean"], values.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(stored["std"], values.std(axis=(0, 2, 3)), atol=1e-9)
    assert stored["num_images"] == 16 and "wrote" in printed and "4 channels over 16 images" in printed
    used = build_dataset(prepare(QUICKSTART, tiny(tmp_path / "out", *source)), "eval")  # stats_file replaces mean/std
    assert np.allclose(used.mean, stored["mean"]) and np.allclose(used.std, stored["std"])


def test_image_stats_refuses_other_datasets_and_write_without_a_file(tmp_path, capsys):
    assert main(["image-stats", "recipes/audio_klettres.yaml"]) == 2
    assert "data.train.name: dataset 'klettres' is not an image dataset" in capsys.readouterr().err
    assert main(["image-stats", str(QUICKSTART), "data.train.options.limit=8", "--write"]) == 2
    assert "data.train.options.stats_file: --write stores the statistics here" in capsys.readouterr().err


def test_pictures_draw_the_chosen_three_channels(tmp_path):
    tokenizer = ImagePatchTokenizer(ImagePatchOptions(image_size=8, patch_size=4, channels=5,
                                                      display_channels=[4, 0, 2]))
    panels = torch.zeros(2, 4, 5, 8, 8)
    panels[:, :, 4] = 1.0  # only band 4 is bright: it must be drawn as red
    (path,) = tokenizer.save_pictures(panels, tmp_path / "p.png")
    drawn = np.asarray(Image.open(path).convert("RGB"))
    assert drawn[50, 50].tolist() == [255, 0, 0]  # inside the first tile (2 px padding, 8 px enlarged 14×)
    colours = {tuple(c) for c in drawn.reshape(-1, 3).tolist()}
    assert colours == {(255, 0, 0), (255, 255, 255)}  # red tiles on the white padding, nothing else
    default = ImagePatchTokenizer(ImagePatchOptions(image_size=8, patch_size=4, channels=5))
    assert default.options.drawn == [0, 1, 2] and ImagePatchOptions(channels=2).drawn == [0]
    with pytest.raises(ValueError, match="must lie in 0..4"):
        ImagePatchOptions(image_size=8, patch_size=4, channels=5, display_channels=[5, 0, 1])
