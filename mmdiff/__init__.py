"""MM-Diff: tuning-free personalised image generation with one or several subjects."""

from mmdiff.model_config import MMDiffConfig
from mmdiff.modeling import MMDiffModel
from mmdiff.pipeline import MMDiffPipeline, Subject
from mmdiff.prompting import find_words, parse_markers, subject_pixel_values, tokenize_with_subjects

__all__ = ["MMDiffConfig", "MMDiffModel", "MMDiffPipeline", "Subject", "tokenize_with_subjects",
           "subject_pixel_values", "find_words", "parse_markers"]
