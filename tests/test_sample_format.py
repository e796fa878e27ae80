"""The shard sample format: what the preprocessing job writes is exactly what training reads back."""

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from skimage import data

from preprocess.sample import Entity, Sample


def make_sample(faces: bool = False) -> Sample:
    image = Image.fromarray(data.chelsea())  # 451 x 300
    caption = "a cat lying next to a cat toy"
    w, h = image.size
    masks = np.zeros((2, h, w), bool)
    masks[0, 50:250, 40:300] = True
    masks[1, 150:290, 250:440] = True  # overlaps mask 0: both must survive
    crops = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    entities = [
        Entity("a cat", "cat", 2, 5, 0, 5, (40, 50, 300, 250), 0.9),
        Entity("a cat toy", "toy", 26, 29, 18, 29, (250, 150, 440, 290), 0.5),
    ]
    face_array = np.array([[0.5] * 512, [np.nan] * 512], np.float32) if faces else None
    return Sample("chelsea-0a1b", image, caption, entities, masks, crops, face_array, {"source": "chelsea.png"})


@pytest.mark.parametrize("faces", [False, True])
def test_roundtrip_through_a_webdataset_tar(tmp_path, faces):
    sample = make_sample(faces)
    path = str(tmp_path / "shard-000000.tar")
    with wds.TarWriter(path) as sink:
        sink.write(sample.to_wds())
    (raw,) = list(wds.WebDataset(path, shardshuffle=False))
    back = Sample.from_wds(raw)
    assert back.key == sample.key and back.caption == sample.caption
    assert back.entities == sample.entities
    assert np.array_equal(back.masks, sample.masks)  # lossless, overlap kept
    assert np.array_equal(back.crops, sample.crops)
    assert back.image.size == sample.image.size
    assert np.abs(np.asarray(back.image, float) - np.asarray(sample.image, float)).mean() < 3  # JPEG q95
    assert back.meta == {"source": "chelsea.png"}
    if faces:
        assert np.array_equal(back.faces, sample.faces, equal_nan=True)
    else:
        assert back.faces is None


def test_members_are_standard_files(tmp_path):
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write(make_sample().to_wds())
    with tarfile.open(path) as tar:
        names = sorted(tar.getnames())
        meta = json.load(tar.extractfile("chelsea-0a1b.json"))
        mask_image = Image.open(io.BytesIO(tar.extractfile("chelsea-0a1b.masks.png").read()))
    assert names == [f"chelsea-0a1b.{m}" for m in ("crops.png", "jpg", "json", "masks.png", "txt")]
    assert meta["entities"][1]["word"] == "toy" and meta["format_version"] == 1
    assert mask_image.size == (451, 600)  # two 451x300 masks stacked
    # 1-bit, and a plain PIL reader's convert("L") gives the 0/255 image of the masks (what readers decode)
    sample = make_sample()
    assert mask_image.mode == "1" and np.array_equal(np.asarray(mask_image.convert("L")),
                                                     sample.masks.reshape(600, 451).astype(np.uint8) * 255)


def test_entity_word_must_sit_at_its_span():
    sample = make_sample()
    bad = Entity("a cat", "cat", 3, 6, 0, 5, (0, 0, 1, 1), 0.9)
    with pytest.raises(ValueError, match="chelsea-0a1b: entity word 'cat' is not at caption"):
        Sample(sample.key, sample.image, sample.caption, [bad], sample.masks[:1], sample.crops[:1])


def test_mask_shape_mismatch_names_the_sample():
    sample = make_sample()
    with pytest.raises(ValueError, match="sample chelsea-0a1b: masks shape"):
        Sample(sample.key, sample.image, sample.caption, sample.entities, sample.masks[:, :10], sample.crops)


def test_corrupt_member_error_names_the_sample():
    raw = make_sample().to_wds()
    raw["masks.png"] = b"not a png"
    with pytest.raises(ValueError, match="sample chelsea-0a1b: cannot decode"):
        Sample.from_wds(raw)
