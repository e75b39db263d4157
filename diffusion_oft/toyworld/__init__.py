"""The toy world of the embedded default: scenes, captions, the judge, the tiny pretrained model."""

from .judge import judge_in_world, judge_subject, read_image
from .world import Scene, caption, render, sample_scene, subject_scene

__all__ = [
    "Scene",
    "caption",
    "render",
    "sample_scene",
    "subject_scene",
    "read_image",
    "judge_in_world",
    "judge_subject",
]
