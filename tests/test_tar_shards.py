"""WebDataset tar shards: `maeframe pack --to webdataset`, the `tar_shards` dataset's index (braces, globs,
fsspec URLs, the index cache), damaged and odd shards, and packing from any image source to any channels."""
import io
import json
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from maeframe.build import build_dataset, prepare
from maeframe.cli import main
from maeframe.errors import MaeframeError, RecipeError
from maeframe_plugins.pack import pack
from maeframe_plugins.tar_shards import expand_braces
from conftest import QUICKSTART, ROOT, tiny
from test_user_data_runs import BROKEN, fmnist, four_bands, write_nested, write_shards


def shards(tmp_path, urls, *extra, split="train"):
    options = f"urls: {json.dumps(urls)}, mean: [0.5], std: [0.5]" + "".join(f", {e}" for e in extra)
    return build_dataset(prepare(QUICKSTART, tiny(tmp_path / "out", f"data.train={{name: tar_shards, options: "
                                                                     f"{{{options}}}}}")), split)


def raw(dataset, index):
    """The uint8 [C, H, W] image of sample `index` as decoded (before augmentation)."""
    return dataset._load(index)[0]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The nested folder packed twice at 28²: as .npy shards and as tar shards of lossless PNGs."""
    base = tmp_path_factory.mktemp("pack")
    root = write_nested(base / "nested")
    common = ["--format", "image_files", "--channels", "1", "--size", "28", "--shard-size", "16",
              "--max-bad-fraction", "0.05"]
    assert main(["pack", str(root), str(base / "npy"), *common]) == 0
    assert main(["pack", str(root), str(base / "wds"), *common, "--to", "webdataset", "--image-format", "png"]) == 0
    return base


def test_pack_to_webdataset_is_read_by_webdataset_and_by_tar_shards(tmp_path, packed):
    import webdataset

    index = json.loads((packed / "wds" / "index.json").read_text())
    assert index["count"] == 64 and index["skipped_count"] == 1 and index["urls"] == "shard-{00000..00003}.tar"
    assert [s["count"] for s in index["shards"]] == [16, 16, 16, 16]
    npy = np.concatenate([np.load(packed / "npy" / s["file"]) for s in
                          json.loads((packed / "npy" / "index.json").read_text())["shards"]])
    stream = list(webdataset.WebDataset(str(packed / "wds" / index["urls"]), shardshuffle=False))
    assert [s["__key__"] for s in stream] == [f"{i:09d}" for i in range(64)] and "cls" not in stream[0]
    for i, sample in enumerate(stream):  # webdataset's own reader sees the images pack decoded
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), npy[i, 0])
    dataset = shards(tmp_path, f"file://{packed / 'wds' / index['urls']}")
    assert len(dataset) == 64 and set(dataset.labels.tolist()) == {-1}
    assert all(torch.equal(raw(dataset, i)[0], torch.from_numpy(npy[i, 0])) for i in range(64))
    assert dataset.describe(17).endswith("shard-00001.tar:000000017.png")


def test_brace_ranges_globs_paths_and_file_urls_name_the_same_shards(tmp_path):
    assert expand_braces("s-{08..11}-{a,b}.tar") == ["s-08-a.tar", "s-08-b.tar", "s-09-a.tar", "s-09-b.tar",
                                                     "s-10-a.tar", "s-10-b.tar", "s-11-a.tar", "s-11-b.tar"]
    url = write_shards(tmp_path / "shards")  # file://…/train-{0000..0003}.tar
    by_url = shards(tmp_path, url)
    by_glob = shards(tmp_path, str(tmp_path / "shards" / "train-*.tar"))
    by_list = shards(tmp_path, [str(tmp_path / "shards" / f"train-{i:04d}.tar") for i in range(4)])
    assert len(by_url) == len(by_glob) == len(by_list) == 64
    assert by_url.names.tolist() == by_glob.names.tolist() == by_list.names.tolist()
    _, labels = fmnist()
    assert by_url.labels.tolist() == labels.tolist()  # the .cls fields
    assert torch.equal(raw(by_url, 3), raw(by_glob, 3))


def test_index_cache_is_reused_and_rebuilt_when_a_shard_changes(tmp_path, monkeypatch):
    url = write_shards(tmp_path / "shards", count=24, per_shard=12)
    cache = tmp_path / "cache"
    first = shards(tmp_path, url, f"index_cache: '{cache}'")
    assert len(list(cache.glob("*.json"))) == 2
    opened = []
    import maeframe_plugins.tar_shards as tar_shards

    real = tar_shards.members
    monkeypatch.setattr(tar_shards, "members", lambda *a: opened.append(1) or real(*a))
    again = shards(tmp_path, url, f"index_cache: '{cache}'")
    assert opened == [] and again.offsets.tolist() == first.offsets.tolist()  # no header was read
    shard = tmp_path / "shards" / "train-0001.tar"
    with tarfile.open(shard, "a") as tar:  # one more sample: another size and mtime
        info = tarfile.TarInfo("extra.npy")
        payload = io.BytesIO()
        np.save(payload, np.zeros((28, 28), np.uint8))
        info.size = len(payload.getvalue())
        tar.addfile(info, io.BytesIO(payload.getvalue()))
    opened.clear()
    changed = shards(tmp_path, url, f"index_cache: '{cache}'")
    assert len(opened) == 1 and len(changed) == 25 and changed.names[-1] == "extra.npy"


def test_a_damaged_shard_keeps_what_precedes_the_damage_and_counts_the_rest(tmp_path, caplog):
    url = write_shards(tmp_path / "shards", count=40, per_shard=20)
    shard = tmp_path / "shards" / "train-0001.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    tenth = members[20]  # the header of the 11th sample (2 members per sample)
    data[tenth.offset: tenth.offset + 100] = b"\xff" * 100  # a garbled header
    shard.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="maeframe.data"):
        dataset = shards(tmp_path, url)
    assert len(dataset) == 20 + 10 + 1 and "train-0001.tar is damaged" in caplog.text
    assert "damaged tar header" in caplog.text and "after 10 samples" in caplog.text
    with pytest.raises(OSError, match="damaged remainder"):
        dataset._load(30)  # one unreadable sample per epoch for the lost tail
    assert raw(dataset, 29).shape == (1, 28, 28)


def test_a_truncated_shard_and_a_corrupt_member_fail_when_read(tmp_path, caplog):
    url = write_shards(tmp_path / "shards", count=20, per_shard=20)
    dataset = shards(tmp_path, url)
    with pytest.raises(Exception, match="cannot identify image file"):
        dataset._load(7)  # written as garbage by write_shards: counted by the engine when read
    shard = tmp_path / "shards" / "train-0000.tar"
    whole = shard.read_bytes()
    cut = int(dataset.offsets[19]) + 10  # inside the last image
    shard.write_bytes(whole[:cut])
    with pytest.raises(OSError, match="truncated member: 10 of"):
        dataset._load(19)  # cut after the index was built: fails when read
    with caplog.at_level("WARNING", logger="maeframe.data"):
        truncated = shards(tmp_path, url)
    assert len(truncated) == 19 + 1 and "the file ends inside member 's00019.png'" in caplog.text
    with pytest.raises(OSError, match="damaged remainder"):
        truncated._load(19)  # what was lost after the cut is unknown: one bad read per epoch


def test_the_header_reader_agrees_with_tarfile(tmp_path):
    """Long names (PAX and GNU), ustar prefixes, directories and links: the same members and offsets."""
    from maeframe_plugins.tar_index import members

    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, size in [("a/" + "d" * 90 + "/" + "n" * 40 + ".jpg", 700), ("short.cls", 1), ("x.png", 0)]:
                info = tarfile.TarInfo(name if fmt != tarfile.USTAR_FORMAT or len(name) < 256 else name[-99:])
                info.size = size
                tar.addfile(info, io.BytesIO(b"z" * size))
            directory = tarfile.TarInfo("folder")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
        with tarfile.open(path) as tar:
            expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        with open(path, "rb") as handle:
            assert [(m.name, m.offset, m.size) for m in members(handle, path.stat().st_size)] == expected, fmt


def test_samples_without_an_image_are_passed_over_and_logged(tmp_path, caplog):
    import webdataset

    (tmp_path / "s").mkdir()
    with webdataset.TarWriter(str(tmp_path / "s" / "mixed.tar")) as sink:
        png = io.BytesIO()
        Image.fromarray(fmnist(1)[0][0]).save(png, format="PNG")
        sink.write({"__key__": "a", "png": png.getvalue(), "cls": 3})
        sink.write({"__key__": "b", "txt": "a caption only"})
        sink.write({"__key__": "c", "png": png.getvalue(), "cls": "cat"})
    with caplog.at_level("INFO", logger="maeframe.data"):
        dataset = shards(tmp_path, str(tmp_path / "s" / "mixed.tar"))
    assert dataset.names.tolist() == ["a.png", "c.png"] and dataset.labels.tolist() == [3, -1]
    assert "passed over 1 file" in caplog.text and "without an image field (fields: txt)" in caplog.text
    assert "'cat' is not an integer label" in caplog.text


def test_shard_mistakes_name_the_urls_option(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.train\.options\.urls: .*shard .*absent\.tar not found"):
        shards(tmp_path, str(tmp_path / "absent.tar"))
    with pytest.raises(RecipeError, match=r"data\.train\.options\.urls: .*no shard matches"):
        shards(tmp_path, str(tmp_path / "none-*.tar"))
    with pytest.raises(RecipeError, match=r"data\.train\.options\.urls: nosuchfs://b/x\.tar: .*nosuchfs"):
        shards(tmp_path, "nosuchfs://b/x.tar")
    (tmp_path / "plain.tar").write_bytes(b"hello" * 300)
    with pytest.raises(RecipeError, match=r"data\.train\.options\.urls: .*plain\.tar is not a tar file"):
        shards(tmp_path, str(tmp_path / "plain.tar"))


def test_pack_reads_lists_and_shards_and_stores_any_channel_count(tmp_path, packed):
    images, _ = fmnist(12)
    (tmp_path / "bands").mkdir()
    for i, image in enumerate(images):
        np.save(tmp_path / "bands" / f"{i:02d}.npy", four_bands(image))
    for to in ("npy", "webdataset"):
        index = pack(str(tmp_path / "bands"), tmp_path / f"four-{to}", size=28, fmt="image_files", channels=4,
                     options={"mean": [0.5] * 4, "std": [0.5] * 4}, to=to)
        assert index["shape"] == [4, 28, 28] and index["count"] == 12
    stored = np.load(tmp_path / "four-npy" / "shard-00000.npy")
    assert all(np.array_equal(stored[i], four_bands(images[i])) for i in range(12))
    with tarfile.open(tmp_path / "four-webdataset" / "shard-00000.tar") as tar:
        first = tar.getmembers()[0]
        assert first.name == "000000000.npy"
        assert np.array_equal(np.load(io.BytesIO(tar.extractfile(first).read())), four_bands(images[0]))
    from_shards = pack(f"{packed / 'wds'}/shard-{{00000..00003}}.tar", tmp_path / "again", size=28,
                       fmt="tar_shards", channels=1)
    assert from_shards["count"] == 64
    assert np.array_equal(np.load(tmp_path / "again" / "shard-00000.npy"),
                          np.concatenate([np.load(packed / "npy" / f"shard-{i:05d}.npy") for i in range(4)]))


def test_pack_refusals_name_what_to_do(tmp_path, monkeypatch, capsys):
    (tmp_path / "src").mkdir()
    np.save(tmp_path / "src" / "f.npy", np.zeros((28, 28), np.float32))
    with pytest.raises(MaeframeError, match=r"1 of 1 source images are unreadable.*float32 values.*8-bit"):
        pack(str(tmp_path / "src"), tmp_path / "o", size=28, fmt="image_files", channels=1)
    with pytest.raises(MaeframeError, match="--image-format jpg stores 1 or 3 channels, not 4; use npy"):
        pack(str(tmp_path / "src"), tmp_path / "o", size=28, fmt="image_files", channels=4, to="webdataset",
             encoding="jpg")
    monkeypatch.setitem(sys.modules, "webdataset", None)
    assert main(["pack", str(tmp_path / "src"), str(tmp_path / "o"), "--size", "8", "--to", "webdataset"]) == 2
    assert "pip install 'maeframe[webdataset]'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_loader_formats_benchmark_times_the_three_formats_of_one_image_set(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import loader_formats

    report = loader_formats.main(["--data", str(tmp_path / "data"), "--count", "40", "--side", "32",
                                  "--batch-size", "8", "--batches", "1", "--warmup", "1", "--workers", "0",
                                  "--out", str(tmp_path / "r.json")])
    assert [row["case"] for row in report["results"]] == ["jpeg-imagefolder", "packed-npy", "tar-shards-jpeg"]
    assert [row["dataset"] for row in report["results"]] == ["image_folder", "packed", "tar_shards"]
    assert all(row["output_shape"] == [8, 3, 224, 224] and row["img_s"] > 0 for row in report["results"])
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 40
    jpegs = sorted(p.read_bytes() for p in (tmp_path / "data" / "jpeg").glob("*/*.jpg"))
    with tarfile.open(tmp_path / "data" / "tar" / "shard-00000.tar") as tar:  # the same JPEG bytes
        assert sorted(tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")) == jpegs
