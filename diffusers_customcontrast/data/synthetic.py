"""A procedural world of subjects seen from several views, with exact masks and captions (docs/synthetic_world.md).

A subject's *intrinsic* attributes (shape, texture, two colours) are fixed by its seed; each frame shows it under
*irrelevant* attributes (rotation, size, position, brightness) in a *scene* that the caption names: a background
("on grass", "in the snow"), optionally a second object ("next to a ball") and a style ("a sketch of ...").
Subject-driven generation should keep the intrinsic attributes and let the prompt control the scene.

Everything is numpy + PIL and fast (8 subjects x 4 frames at 64 px take a few milliseconds), so tests and tiny
CPU trainings can make data on the fly. The vocabularies are module-level tuples / mappings so that the world
can be grown (new shapes in ``_OUTLINES``, textures in ``_TEXTURES``, scenes in ``BACKGROUNDS``, second objects in
``COMPANIONS``, styles in ``STYLES``). :func:`render_frame` draws plain views (no brightness change, no second object,
no style); :func:`sample_scene` draws the full variety that :mod:`customcontrast_world` writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# --------------------------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------------------------

COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "cyan", "brown", "black", "gray",
)  # fmt: skip
"""Colour names a subject can have. No white: references are segmented on white, where it would vanish."""

COLOR_VALUES: dict[str, RGB] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 130, 190),
    "cyan": (40, 200, 220),
    "brown": (130, 80, 40),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}

TEXTURES: tuple[str, ...] = ("solid", "stripes", "dots", "checker")
"""Textures; all but ``solid`` mix the subject's two colours."""

TEXTURE_ADJECTIVES: dict[str, str] = {"solid": "", "stripes": "striped", "dots": "dotted", "checker": "checkered"}
"""How a caption names a texture (a solid subject is named by its shape alone)."""

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart", "hexagon", "crescent",
)  # fmt: skip
"""Shapes, which are also the subjects' class names."""


@dataclass(frozen=True)
class Background:
    """A scene: a vertical gradient from ``top`` to ``bottom`` colour, named in captions by ``phrase``."""

    name: str
    phrase: str
    top: RGB
    bottom: RGB


BACKGROUNDS: tuple[Background, ...] = (
    Background("red", "on a red background", (200, 45, 45), (200, 45, 45)),
    Background("blue", "on a blue background", (50, 90, 210), (50, 90, 210)),
    Background("gray", "on a gray background", (150, 150, 150), (150, 150, 150)),
    Background("snow", "in the snow", (225, 232, 245), (255, 255, 255)),
    Background("grass", "on grass", (120, 190, 90), (40, 120, 40)),
    Background("beach", "on the beach", (130, 190, 235), (235, 215, 165)),
    Background("night", "at night", (10, 12, 40), (45, 45, 95)),
    Background("desert", "in the desert", (250, 205, 140), (205, 150, 85)),
)

BACKGROUND_BY_NAME: dict[str, Background] = {background.name: background for background in BACKGROUNDS}

MIN_CONTRAST = 90.0
"""Least RGB distance between a subject colour and a randomly chosen background (so the subject stays visible)."""

VIEW_SCALE = (0.4, 0.75)
"""Range of the subject's diameter as a fraction of the image side."""

BRIGHTNESS = (0.8, 1.15)
"""Range of the lighting factor every pixel of a scene is multiplied by (an irrelevant attribute)."""


@dataclass(frozen=True)
class Companion:
    """A second object of a scene: a small ``outline`` shape filled with ``fill`` and outlined in black.

    It is drawn behind the subject, so the subject's mask stays exact, in the image corner farthest from it.
    """

    name: str
    phrase: str
    outline: str
    fill: RGB


COMPANIONS: tuple[Companion, ...] = (
    Companion("ball", "next to a ball", "circle", (250, 250, 250)),
    Companion("box", "next to a box", "square", (205, 170, 110)),
    Companion("cone", "next to a cone", "triangle", (255, 100, 0)),
)

COMPANION_BY_NAME: dict[str, Companion] = {companion.name: companion for companion in COMPANIONS}

COMPANION_SCALE = 0.24
"""Diameter of a second object as a fraction of the image side."""

COMPANION_OUTLINE: RGB = (20, 20, 20)

STYLES: dict[str, str] = {"photo": "", "sketch": "a sketch of "}
"""Rendering styles and the caption prefix that names them (a photo is the unnamed default)."""

RANDOM = "random"
"""Value of :func:`sample_scene`'s ``background`` / ``companion`` / ``style`` arguments that draws them at random."""


# --------------------------------------------------------------------------------------------------------------
# Subjects and views
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSubject:
    """Intrinsic attributes of a synthetic subject: what every view of it shares."""

    shape: str
    texture: str
    color: str
    secondary_color: str

    @property
    def class_name(self) -> str:
        return self.shape

    @property
    def description(self) -> str:
        """The subject as captions name it, e.g. ``"striped star"``."""
        return f"{TEXTURE_ADJECTIVES[self.texture]} {self.shape}".strip()

    @property
    def colored_description(self) -> str:
        """The subject with its visible colours, main colour first, e.g. ``"red and blue striped star"``."""
        return f"{' and '.join(self.visible_colors)} {self.description}"

    @property
    def visible_colors(self) -> tuple[str, ...]:
        return (self.color,) if self.texture == "solid" else (self.color, self.secondary_color)

    @property
    def identity(self) -> tuple[str, ...]:
        """Attributes that tell subjects apart visually (a solid subject shows no secondary colour)."""
        return (self.shape, self.texture, *self.visible_colors)

    def to_dict(self) -> dict[str, str]:
        """Attributes plus ``class_name``: the content of the subject's ``subject.json``."""
        return {"class_name": self.class_name, **asdict(self)}


@dataclass(frozen=True)
class View:
    """Everything about one frame but the subject: irrelevant attributes and the scene.

    Attributes:
        rotation: Rotation of the subject in degrees (counter-clockwise).
        scale: Subject diameter as a fraction of the image side.
        center: Subject centre as fractions (x, y) of the image side.
        background: Name of a scene in :data:`BACKGROUNDS` (named by the caption).
        brightness: Lighting factor of every pixel (irrelevant; 1 leaves the colours exact).
        companion: Name of a second object in :data:`COMPANIONS` (named by the caption), or ``None``.
        style: Rendering style, a key of :data:`STYLES` (named by the caption unless ``"photo"``).
    """

    rotation: float
    scale: float
    center: tuple[float, float]
    background: str
    brightness: float = 1.0
    companion: str | None = None
    style: str = "photo"

    @property
    def scene(self) -> dict[str, str | None]:
        """The attributes a caption names: ``{"background", "companion", "style"}``."""
        return {"background": self.background, "companion": self.companion, "style": self.style}

    def to_dict(self) -> dict:
        """JSON-ready attributes (``center`` as a list)."""
        return {**asdict(self), "center": list(self.center)}

    @classmethod
    def from_dict(cls, data: dict) -> View:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "center": tuple(data["center"])})


def make_subject(seed: int) -> SyntheticSubject:
    """The subject of a seed: shape, texture and two distinct colours drawn uniformly."""
    rng = np.random.default_rng(seed)
    color, secondary = rng.choice(len(COLORS), size=2, replace=False)
    return SyntheticSubject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        texture=TEXTURES[rng.integers(len(TEXTURES))],
        color=COLORS[color],
        secondary_color=COLORS[secondary],
    )


def make_distinct_subjects(num_subjects: int, seed: int = 0) -> list[SyntheticSubject]:
    """``num_subjects`` visually distinct subjects (no two share :attr:`SyntheticSubject.identity`).

    Distinct subjects matter for the contrastive losses, where every other subject of a batch is a negative.
    """
    limit = len(SHAPES) * len(COLORS) * (1 + (len(TEXTURES) - 1) * (len(COLORS) - 1))
    if not 0 <= num_subjects <= limit:
        raise ValueError(f"expected 0 <= num_subjects <= {limit} distinct subjects, got {num_subjects}")
    subjects: dict[tuple[str, ...], SyntheticSubject] = {}
    candidate = 0
    while len(subjects) < num_subjects:
        subject = make_subject(_child_seed(seed, candidate))
        subjects.setdefault(subject.identity, subject)
        candidate += 1
    return list(subjects.values())


def sample_view(subject: SyntheticSubject, rng: np.random.Generator, background: str | None = None) -> View:
    """Draw a view: rotation, size and position uniform (the subject stays inside the image), and a scene.

    Without ``background``, the scene is drawn among those that contrast with the subject's colours.
    """
    scale = float(rng.uniform(*VIEW_SCALE))
    radius = scale / 2
    center = (float(rng.uniform(radius, 1 - radius)), float(rng.uniform(radius, 1 - radius)))
    if background is None:
        choices = [b.name for b in BACKGROUNDS if _contrasts(subject, b)] or [b.name for b in BACKGROUNDS]
        background = choices[rng.integers(len(choices))]
    elif background not in BACKGROUND_BY_NAME:
        raise ValueError(f"expected a background in {sorted(BACKGROUND_BY_NAME)}, got {background!r}")
    return View(float(rng.uniform(0.0, 360.0)), scale, center, background)


def sample_scene(
    subject: SyntheticSubject,
    rng: np.random.Generator,
    *,
    background: str | None = RANDOM,
    companion: str | None = RANDOM,
    style: str = RANDOM,
    companion_prob: float = 0.3,
    sketch_prob: float = 0.15,
) -> View:
    """Draw a full view: :func:`sample_view`'s attributes plus brightness, a second object and a style.

    ``background``, ``companion`` and ``style`` are drawn when :data:`RANDOM` (``companion=None`` means no second
    object, ``background=None`` a random contrasting scene, as for :func:`sample_view`). A random companion is
    present with probability ``companion_prob``; a random style is ``"sketch"`` with probability ``sketch_prob``.
    The draws are always made, so a forced attribute does not shift the others of the same generator.
    """
    view = sample_view(subject, rng, None if background == RANDOM else background)
    brightness = float(rng.uniform(*BRIGHTNESS))
    drawn_companion = COMPANIONS[rng.integers(len(COMPANIONS))].name if rng.random() < companion_prob else None
    drawn_style = "sketch" if rng.random() < sketch_prob else "photo"
    companion = drawn_companion if companion == RANDOM else companion
    style = drawn_style if style == RANDOM else style
    if companion is not None and companion not in COMPANION_BY_NAME:
        raise ValueError(f"expected a companion in {sorted(COMPANION_BY_NAME)} or None, got {companion!r}")
    if style not in STYLES:
        raise ValueError(f"expected a style in {sorted(STYLES)}, got {style!r}")
    return View(view.rotation, view.scale, view.center, view.background, brightness, companion, style)


def caption_for(
    subject: SyntheticSubject | str,
    background: str,
    companion: str | None = None,
    style: str = "photo",
    name_colors: bool = False,
) -> str:
    """Caption naming the subject and the scene, e.g. ``"a sketch of a striped star on grass next to a ball"``.

    ``subject`` is a subject (named by :attr:`SyntheticSubject.description`, or with ``name_colors`` by
    :attr:`SyntheticSubject.colored_description`) or the words that name it, e.g. a class name for an evaluation
    prompt. The world's captions never name colours (they must come from the subject image); only the base model's
    training captions sometimes do, so that it can draw them.
    """
    if isinstance(subject, SyntheticSubject):
        description = subject.colored_description if name_colors else subject.description
    else:
        description = subject
    article = "an" if description[0] in "aeiou" else "a"
    caption = f"{STYLES[style]}{article} {description} {BACKGROUND_BY_NAME[background].phrase}"
    return f"{caption} {COMPANION_BY_NAME[companion].phrase}" if companion else caption


def caption_for_view(subject: SyntheticSubject | str, view: View, name_colors: bool = False) -> str:
    """:func:`caption_for` of a view's scene."""
    return caption_for(subject, view.background, view.companion, view.style, name_colors)


def caption_words() -> list[str]:
    """Every word :func:`caption_for` can write, in a fixed order (the synthetic base model's whole-word tokens)."""
    phrases = [
        "a an and of", *STYLES.values(), *TEXTURE_ADJECTIVES.values(), *SHAPES, *COLORS,
        *(b.phrase for b in BACKGROUNDS), *(c.phrase for c in COMPANIONS),
    ]  # fmt: skip
    return list(dict.fromkeys(word for phrase in phrases for word in phrase.split()))


def _contrasts(subject: SyntheticSubject, background: Background) -> bool:
    ends = np.array([background.top, background.bottom], dtype=float)
    colors = np.array([COLOR_VALUES[c] for c in subject.visible_colors], dtype=float)
    distances = np.linalg.norm(colors[:, None, :] - ends[None, :, :], axis=-1)
    return bool(distances.min() > MIN_CONTRAST)


def _child_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def render_view(subject: SyntheticSubject, view: View, size: int = 64) -> tuple[Image.Image, Image.Image]:
    """Render ``subject`` under ``view``: an RGB image and its exact subject mask (L mode, 0 or 255).

    No anti-aliasing, so the mask is exactly the set of pixels the subject was painted on (with its colours,
    times ``view.brightness``, in a photo). The second object is drawn first, behind the subject.
    """
    radius_px = view.scale * size / 2
    center_px = (view.center[0] * size, view.center[1] * size)
    mask = _shape_mask(subject.shape, view.rotation, radius_px, center_px, size)
    pixels = _gradient(BACKGROUND_BY_NAME[view.background], size)
    if view.companion is not None:
        pixels = _draw_companion(pixels, COMPANION_BY_NAME[view.companion], companion_center(view))
    inside = np.asarray(mask) > 0
    secondary = _texture_field(subject.texture, view.rotation, radius_px, center_px, size)
    pixels[inside & ~secondary] = COLOR_VALUES[subject.color]
    pixels[inside & secondary] = COLOR_VALUES[subject.secondary_color]
    if view.brightness != 1.0:
        pixels = np.clip(np.round(pixels * view.brightness), 0, 255).astype(np.uint8)
    if view.style == "sketch":
        pixels = sketch_pixels(pixels)
    return Image.fromarray(pixels), mask


def companion_center(view: View) -> tuple[float, float]:
    """Centre (fractions of the image side) of the view's second object: the free corner farthest from the subject."""
    margin = COMPANION_SCALE / 2 + 0.02
    corners = [(x, y) for y in (margin, 1 - margin) for x in (margin, 1 - margin)]
    distances = [np.hypot(x - view.center[0], y - view.center[1]) for x, y in corners]
    return corners[int(np.argmax(distances))]


def render_frame(
    subject: SyntheticSubject, rng: np.random.Generator | int, size: int = 64, background: str | None = None
) -> tuple[Image.Image, Image.Image, str]:
    """Render one random view of ``subject``: ``(RGB image, L mask, caption)``.

    Args:
        subject: The subject.
        rng: Generator (or seed) of the view.
        size: Side of the square image in pixels.
        background: Scene name from :data:`BACKGROUNDS`; drawn at random when ``None``.
    """
    rng = np.random.default_rng(rng)
    view = sample_view(subject, rng, background)
    image, mask = render_view(subject, view, size)
    return image, mask, caption_for(subject, view.background)


def write_synthetic_dataset(
    root: str | os.PathLike, num_subjects: int = 8, frames_per_subject: int = 4, size: int = 64, seed: int = 0
) -> Path:
    """Write a synthetic subject folder (the folder form of ``docs/data_format.md``) and return its path.

    Layout: ``root/subject_<n>/frame_<f>.png``, ``masks/frame_<f>.png``, ``frame_<f>.txt`` (caption) and
    ``subject.json`` (class name and intrinsic attributes). Subjects are visually distinct; the output depends
    only on the arguments.
    """
    if frames_per_subject < 1:
        raise ValueError(f"expected frames_per_subject >= 1, got {frames_per_subject}")
    root = Path(root)
    for index, subject in enumerate(make_distinct_subjects(num_subjects, seed)):
        subject_dir = root / f"subject_{index:03d}"
        (subject_dir / "masks").mkdir(parents=True, exist_ok=True)
        (subject_dir / "subject.json").write_text(json.dumps(subject.to_dict(), indent=2) + "\n", encoding="utf-8")
        rng = np.random.default_rng([seed, index])
        for frame in range(frames_per_subject):
            image, mask, caption = render_frame(subject, rng, size)
            stem = f"frame_{frame:02d}"
            image.save(subject_dir / f"{stem}.png")
            mask.save(subject_dir / "masks" / f"{stem}.png")
            (subject_dir / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return root


def _gradient(background: Background, size: int) -> np.ndarray:
    weights = np.linspace(0.0, 1.0, size)[:, None, None]
    column = (1 - weights) * np.array(background.top) + weights * np.array(background.bottom)
    return np.repeat(np.round(column).astype(np.uint8), size, axis=1)


def _draw_companion(pixels: np.ndarray, companion: Companion, center: tuple[float, float]) -> np.ndarray:
    size = pixels.shape[0]
    image = Image.fromarray(pixels)
    outline = _OUTLINES[companion.outline][0][0] * (COMPANION_SCALE * size / 2)
    points = outline + np.array(center) * size
    ImageDraw.Draw(image).polygon([tuple(p) for p in points.tolist()], fill=companion.fill, outline=COMPANION_OUTLINE)
    return np.array(image)


def sketch_pixels(pixels: np.ndarray, edge_threshold: float = 40.0) -> np.ndarray:
    """The sketch style of a rendered ``[H, W, 3]`` uint8 scene: light grey shading of the luminance, dark lines
    where the colour changes (what :func:`render_view` draws for ``style="sketch"``)."""
    rgb = pixels.astype(np.float32)
    luminance = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    shaded = 255.0 - 0.5 * (255.0 - luminance)
    # A pixel is on a line when it differs from its right or lower neighbour (gradient backgrounds change by
    # a unit or two per row, far below the threshold).
    step_x = np.zeros_like(luminance)
    step_y = np.zeros_like(luminance)
    step_x[:, :-1] = np.linalg.norm(rgb[:, 1:] - rgb[:, :-1], axis=-1)
    step_y[:-1] = np.linalg.norm(rgb[1:] - rgb[:-1], axis=-1)
    shaded[np.maximum(step_x, step_y) > edge_threshold] = 50.0
    return np.repeat(np.round(shaded).astype(np.uint8)[..., None], 3, axis=-1)


def _shape_mask(
    shape: str, rotation: float, radius_px: float, center_px: tuple[float, float], size: int
) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for points, filled in _OUTLINES[shape]:
        pixels = _rotate(points, rotation) * radius_px + np.array(center_px)
        draw.polygon([tuple(p) for p in pixels.tolist()], fill=255 if filled else 0)
    return mask


def _texture_field(
    texture: str, rotation: float, radius_px: float, center_px: tuple[float, float], size: int
) -> np.ndarray:
    """Boolean map of the pixels painted with the secondary colour, in the subject's own (rotated) frame."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    offsets = np.stack([xs - center_px[0], ys - center_px[1]], axis=-1) / max(radius_px, 1e-6)
    local = _rotate(offsets.reshape(-1, 2), -rotation).reshape(size, size, 2)
    return _TEXTURES[texture](local[..., 0], local[..., 1])


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    # Image y points down, so a counter-clockwise turn on screen is a clockwise one in (x, y).
    angle = np.deg2rad(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    return points @ np.array([[cos, -sin], [sin, cos]])


# Textures: functions of the subject-frame coordinates (u, v), in units of the subject's radius.
_TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "solid": lambda u, v: np.zeros(u.shape, dtype=bool),
    "stripes": lambda u, v: np.floor((u + 1.0) * 2.5).astype(int) % 2 == 1,
    "dots": lambda u, v: np.hypot(u * 2 - np.round(u * 2), v * 2 - np.round(v * 2)) < 0.28,
    "checker": lambda u, v: (np.floor(u * 2.5).astype(int) + np.floor(v * 2.5).astype(int)) % 2 == 1,
}


# --------------------------------------------------------------------------------------------------------------
# Shape outlines: (polygon in unit coordinates, filled) parts drawn in order; unfilled parts cut holes.
# --------------------------------------------------------------------------------------------------------------


def _regular(sides: int, phase_degrees: float = -90.0, radius: float = 1.0) -> np.ndarray:
    angles = np.deg2rad(phase_degrees) + 2 * np.pi * np.arange(sides) / sides
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    vertices = _regular(2 * points)
    vertices[1::2] *= inner
    return vertices


def _cross(half_width: float = 0.33) -> np.ndarray:
    w = half_width
    return np.array(
        [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)],
        dtype=float,
    )


def _heart(samples: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, samples, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # minus: image y points down
    points = np.stack([x, y], axis=-1)
    points -= (points.max(axis=0) + points.min(axis=0)) / 2
    return points / np.linalg.norm(points, axis=-1).max()


_OUTLINES: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_regular(48), True)],
    "square": [(_regular(4, phase_degrees=45.0), True)],
    "triangle": [(_regular(3), True)],
    "star": [(_star(), True)],
    "cross": [(_cross(), True)],
    "ring": [(_regular(48), True), (_regular(48, radius=0.55), False)],
    "diamond": [(_regular(4) * np.array([0.65, 1.0]), True)],
    "heart": [(_heart(), True)],
    "hexagon": [(_regular(6), True)],
    "crescent": [(_regular(48), True), (_regular(48, radius=0.85) + np.array([0.4, -0.15]), False)],
}
assert set(_OUTLINES) == set(SHAPES) and set(_TEXTURES) == set(TEXTURES) == set(TEXTURE_ADJECTIVES)
assert all(companion.outline in _OUTLINES for companion in COMPANIONS)
