"""Entity filter (thresholds, NMS, one box per phrase, 1..N distinct entities) and subject crops."""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.example_inputs import photo
from preprocess.crops import CropConfig, SubjectCropper, square_box
from preprocess.filters import EntityFilter, FilterConfig
from preprocess.phrases import extract_phrases


@dataclass(frozen=True)
class Det:
    box: tuple
    score: float
    phrase_index: int
    label: str = ""


SIZE = (400, 300)
FILTER = EntityFilter(FilterConfig(box_threshold=0.3, nms_iou=0.5, min_entities=1, max_entities=2))


def test_keeps_best_box_per_phrase_in_caption_order():
    phrases = extract_phrases("a man riding a horse on a beach")
    result = FILTER(phrases, [
        Det((200, 50, 380, 290), 0.8, 1),  # horse
        Det((10, 10, 150, 280), 0.6, 0),  # man
        Det((12, 12, 148, 270), 0.5, 0),  # man again, suppressed by NMS
        Det((0, 0, 400, 300), 0.2, 2),  # beach: under the box threshold
    ], SIZE)
    assert result.accepted
    assert [(k.phrase.head, k.box, k.score) for k in result.entities] == [
        ("man", (10.0, 10.0, 150.0, 280.0), 0.6), ("horse", (200.0, 50.0, 380.0, 290.0), 0.8)]


def test_counted_phrases_are_dropped_and_counts_enforced():
    phrases = extract_phrases("two dogs near a cat")
    only_dogs = FILTER(phrases, [Det((0, 0, 200, 200), 0.9, 0)], SIZE)
    assert not only_dogs.accepted and only_dogs.reason == "no_entities"
    assert FILTER(phrases, [Det((0, 0, 200, 200), 0.9, 0), Det((210, 0, 400, 200), 0.9, 1)], SIZE).accepted
    many = extract_phrases("a man with a dog and a cat")
    dets = [Det((i * 130, 0, i * 130 + 120, 200), 0.9, i) for i in range(3)]
    result = FILTER(many, dets, SIZE)
    assert result.reason == "too_many_entities"


def test_nms_between_phrases_and_ambiguous_words():
    phrases = extract_phrases("a dog next to a brown dog")
    result = FILTER(phrases, [Det((0, 0, 150, 150), 0.9, 0), Det((200, 0, 390, 200), 0.8, 1)], SIZE)
    assert result.reason == "ambiguous_words"  # both bind to the word "dog"
    phrases = extract_phrases("a man riding a horse")
    overlapping = [Det((0, 0, 200, 200), 0.9, 0), Det((5, 5, 200, 205), 0.7, 1)]  # one object, two phrases
    assert [k.phrase.head for k in FILTER(phrases, overlapping, SIZE).entities] == ["man"]


def test_boxes_are_clipped_and_tiny_boxes_dropped():
    phrases = extract_phrases("a cat")
    result = FILTER(phrases, [Det((-20, -5, 500, 200), 0.9, 0)], SIZE)
    assert result.entities[0].box == (0.0, 0.0, 400.0, 200.0)
    assert FILTER(phrases, [Det((0, 0, 5, 5), 0.9, 0)], SIZE).reason == "no_entities"
    # a sub-pixel sliver (SAM cannot take it) is dropped even when the size filter is off
    no_size_filter = EntityFilter(FilterConfig(box_threshold=0.0, min_box_fraction=0.0))
    assert no_size_filter(phrases, [Det((100.2, 10, 100.6, 190), 0.9, 0)], SIZE).reason == "no_entities"
    assert no_size_filter(phrases, [Det((100.2, 10, 101.2, 190), 0.9, 0)], SIZE).accepted


def test_square_box_is_centred_and_grown_by_the_margin():
    assert square_box((10, 20, 30, 60), 0.0) == (0, 20, 40, 60)
    x0, y0, x1, y1 = square_box((10, 20, 30, 60), 0.25)
    assert x1 - x0 == y1 - y0 == 60 and (x0 + x1) / 2 == 20 and (y0 + y1) / 2 == 40


def test_crop_keeps_masked_pixels_and_fills_the_rest():
    image = photo("chelsea").resize((200, 150))
    masks = np.zeros((2, 150, 200), bool)
    masks[0, 30:90, 40:100] = True
    masks[1, 100:150, 150:200] = True  # touches the image corner: square extends outside
    boxes = np.array([[40, 30, 100, 90], [150, 100, 200, 150]], np.float32)
    crops = SubjectCropper(CropConfig(size=60, margin=0.0, fill=(0, 255, 0)))(image, boxes, masks)
    assert crops.shape == (2, 60, 60, 3) and crops.dtype == np.uint8
    # box == mask == square at margin 0 and size 60: the crop is exactly the image region
    assert np.array_equal(crops[0], np.asarray(image)[30:90, 40:100])
    ring = SubjectCropper(CropConfig(size=60, margin=0.5, fill=(0, 255, 0)))(image, boxes, masks)
    assert tuple(ring[0, 0, 0]) == (0, 255, 0) and tuple(ring[1, -1, -1]) == (0, 255, 0)  # background filled
    assert not (ring[0, 30, 30] == (0, 255, 0)).all()  # the subject itself is kept


def test_crop_rejects_mismatched_masks():
    image = Image.new("RGB", (50, 40))
    try:
        SubjectCropper(CropConfig())(image, np.zeros((1, 4)), np.zeros((1, 40, 40), bool))
    except ValueError as error:
        assert "50x40" in str(error)
    else:
        raise AssertionError("mismatched masks were accepted")


def test_crops_equal_a_plain_numpy_reference_on_random_boxes_and_masks():
    """The masked paste gives exactly the crops of the straightforward version (canvas filled, masked pixels
    copied by boolean indexing, then square_subject_image), boxes partly outside the image included."""
    from mmdiff.subject_image import square_subject_image

    image = photo("chelsea").convert("RGB").resize((320, 240))
    pixels = np.asarray(image)
    config = CropConfig(size=48, margin=0.2, fill=(10, 200, 30))
    rng = np.random.default_rng(0)
    for _ in range(10):
        x0, y0 = rng.uniform(-20, 300, 2)
        boxes = np.array([[max(0, x0), max(0, y0), min(320, x0 + rng.uniform(4, 300)), min(240, y0 + rng.uniform(4, 200))]],
                         np.float32)
        masks = rng.random((1, 240, 320)) > 0.4
        reference = []
        for box, mask in zip(boxes, masks):
            bx0, by0, bx1, by1 = square_box(tuple(box), config.margin)
            canvas = np.empty((by1 - by0, bx1 - bx0, 3), np.uint8)
            canvas[:] = config.fill
            sx0, sy0, sx1, sy1 = max(bx0, 0), max(by0, 0), min(bx1, 320), min(by1, 240)
            target, keep = canvas[sy0 - by0 : sy1 - by0, sx0 - bx0 : sx1 - bx0], mask[sy0:sy1, sx0:sx1]
            target[keep] = pixels[sy0:sy1, sx0:sx1][keep]
            reference.append(np.asarray(square_subject_image(Image.fromarray(canvas), config.size, config.fill)))
        assert np.array_equal(SubjectCropper(config)(image, boxes, masks), np.stack(reference))
