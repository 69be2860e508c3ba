"""Reading a subject's colours in a scene by the world's palette (the judge's colour reading).

The world paints every subject in colours of a fixed palette (:data:`~diffusers_customcontrast.data.synthetic.
COLOR_VALUES`), times the scene's lighting (:data:`~diffusers_customcontrast.data.synthetic.BRIGHTNESS`), on a
background whose colour changes only from top to bottom. So a pixel that differs from the border of its row belongs
to an object, and the palette colour that explains it under a lighting in range names it; the colours most object
pixels show are the subject's. A learned colour classifier does worse on subjects it never saw: the judge's own head
learns colours together with the train subjects' identities and reads 58-67 % of held-out subjects' colour sets
right, where this reading gets 97-98 % (``docs/synthetic_world.md``).
"""

from __future__ import annotations

import numpy as np

from diffusers_customcontrast.data.synthetic import BRIGHTNESS, COLOR_VALUES, COLORS

__all__ = ["palette_colors"]

# Chosen on renders of train subjects (98.7 % of their colour sets read right; held-out subjects are never used).
FOREGROUND_DISTANCE = 30.0
"""RGB distance from its row's border colour above which a pixel is taken to belong to an object."""
PALETTE_TOLERANCE = 25.0
"""RGB distance within which a palette colour, under some lighting in range, explains a pixel."""
BORDER = 3
"""Columns on each side whose median colour is a row's background."""

_PALETTE = np.array([COLOR_VALUES[name] for name in COLORS], dtype=np.float64)


def palette_colors(pixels: np.ndarray, count: int) -> tuple[str, ...]:
    """The ``count`` palette colours that most object pixels of a scene show, in ``COLORS`` order.

    Args:
        pixels: An ``[H, W, 3]`` RGB image with values in [0, 255].
        count: How many colours the subject has (1 when solid, 2 when textured).

    A subject colour equal to the background's is invisible where the subject meets it; when fewer than ``count``
    colours are found, the palette colour of the background is taken for the one it hides. An image with no object
    pixel (or none a palette colour explains) gives fewer than ``count`` colours, which no subject has.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    background = np.median(np.concatenate([pixels[:, :BORDER], pixels[:, -BORDER:]], axis=1), axis=1)
    foreground = np.linalg.norm(pixels - background[:, None, :], axis=-1) > FOREGROUND_DISTANCE
    names, explained = _nearest_palette(pixels[foreground])
    votes = np.bincount(names[explained], minlength=len(COLORS))
    found = [int(i) for i in np.argsort(-votes, kind="stable")[:count] if votes[i] > 0]
    if len(found) < count:
        names, explained = _nearest_palette(background)
        if explained.any():
            hidden = int(np.bincount(names[explained], minlength=len(COLORS)).argmax())
            found += [hidden] if hidden not in found else []
    return tuple(COLORS[i] for i in sorted(found))


def _nearest_palette(colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``[N, 3]`` colours: the index of the palette colour nearest under the best lighting in range, and
    whether it is within :data:`PALETTE_TOLERANCE`."""
    if len(colors) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    lighting = np.clip(colors @ _PALETTE.T / (_PALETTE**2).sum(axis=1), *BRIGHTNESS)  # least squares, then clamped
    distances = np.linalg.norm(colors[:, None, :] - lighting[..., None] * _PALETTE[None], axis=-1)
    return distances.argmin(axis=1), distances.min(axis=1) < PALETTE_TOLERANCE
