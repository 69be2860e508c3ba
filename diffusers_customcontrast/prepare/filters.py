"""Why frames and subjects are dropped, and the checks of a subject mask.

Every drop is counted under one of these reasons (``summary.json``, ``PrepareSummary.frame_drops`` and
``subject_drops``).
"""

from __future__ import annotations

import numpy as np

# Frames
UNREADABLE = "unreadable"
"""An image file that does not decode."""
BLURRY = "blurry"
NEAR_DUPLICATE = "near_duplicate"
NO_DETECTION = "no_detection"
"""The detector found nothing scoring above the threshold (or the segmenter returned an empty mask)."""
MASK_TOO_SMALL = "mask_too_small"
MASK_TOO_LARGE = "mask_too_large"
CUT_BY_BORDER = "cut_by_border"

FRAME_REASONS = (UNREADABLE, BLURRY, NEAR_DUPLICATE, NO_DETECTION, MASK_TOO_SMALL, MASK_TOO_LARGE, CUT_BY_BORDER)

# Subjects
UNREADABLE_INPUT = "unreadable_input"
"""No frame at all: an empty folder, a folder of other files, or a video that does not decode."""
TOO_FEW_FRAMES = "too_few_frames"

SUBJECT_REASONS = (UNREADABLE_INPUT, TOO_FEW_FRAMES)


def border_touch(mask: np.ndarray) -> float:
    """The largest fraction of one image side (its outermost row or column) that the mask covers."""
    return float(max(mask[0].mean(), mask[-1].mean(), mask[:, 0].mean(), mask[:, -1].mean()))


def check_mask(mask: np.ndarray, min_area: float, max_area: float, max_border_touch: float | None) -> str | None:
    """The reason to drop a frame with this boolean mask, or ``None`` to keep it.

    A mask is too small (the subject is a speck, or the detector found a part of it) or too large (the box took the
    whole scene) by its area as a fraction of the frame, and the subject is cut by the border when the mask covers
    more than ``max_border_touch`` of one side.
    """
    area = float(mask.mean())
    if area < min_area:
        return MASK_TOO_SMALL
    if area > max_area:
        return MASK_TOO_LARGE
    if max_border_touch is not None and border_touch(mask) > max_border_touch:
        return CUT_BY_BORDER
    return None
