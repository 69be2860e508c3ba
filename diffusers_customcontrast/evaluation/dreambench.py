"""Reader for the DreamBench data set in the layout of `google/dreambooth`.

The data set is a folder ``dataset/`` holding one sub-folder of real images per subject and a text file
``prompts_and_classes.txt`` with

* a ``subject_name,class`` table, and
* two python-like prompt lists, "Object Prompts" and "Live Subject Prompts", written as
  ``'a {0} {1} in the jungle'.format(unique_token, class_token)``.

Everything, prompts included, is read from that file: nothing about the benchmark is hard-coded here except
which classes are "live" (cat and dog, as in DreamBooth) and the rule that sorts prompts into
recontextualisation and edit prompts (:data:`PROMPT_KIND_RULES`).
"""

from __future__ import annotations

import ast
import csv
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

logger = logging.getLogger(__name__)

PROMPTS_FILE = "prompts_and_classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LIVE_CLASSES = frozenset({"cat", "dog"})

RECONTEXTUALIZATION = "recontextualization"
EDIT = "edit"
PROMPT_KINDS = (RECONTEXTUALIZATION, EDIT)

# Canonical placeholders of a parsed template; the file's positional `{0}`/`{1}` are renamed after the
# arguments of its `.format(...)` call, so the order in which the file passes them does not matter.
UNIQUE_TOKEN_FIELD = "{unique_token}"
CLASS_TOKEN_FIELD = "{class_token}"
_FORMAT_ARGUMENTS = {"unique_token": UNIQUE_TOKEN_FIELD, "class_token": CLASS_TOKEN_FIELD}

# How a prompt template is sorted into the paper's R- (recontextualisation) and E- (edit) columns. The paper
# does not define the split; this is our reading. Rules are tried in order on the canonical template and the
# first match wins; a template that matches none is a recontextualisation (a new background or scene).
PROMPT_KIND_RULES: tuple[tuple[str, str, str], ...] = (
    # A word before the subject changes a property of it: "a red / purple / shiny / wet / cube shaped sks dog".
    ("property", r"^an? [^{]+ \{unique_token\}", EDIT),
    # Accessories: "a sks dog wearing a red hat / pink glasses / a rainbow scarf".
    ("accessory", r"\{class_token\} wearing ", EDIT),
    # Outfits: "a sks dog in a chef / firefighter / police / purple wizard outfit".
    ("outfit", r"\{class_token\} in an? .*\boutfit\b", EDIT),
)
DEFAULT_PROMPT_KIND = RECONTEXTUALIZATION

# How many of a subject's photos the adapter is given: "first" (one, today's DreamBench protocol), "all", or N.
References = Literal["first", "all"] | int
REFERENCE_CHOICES = ("first", "all")


@dataclass(frozen=True)
class DreamBenchSubject:
    """One DreamBench subject.

    Attributes:
        name: Folder name of the subject, e.g. ``"dog"``.
        class_name: Class noun from the subject table, e.g. ``"dog"`` or ``"stuffed animal"``.
        image_paths: The subject's real images, sorted by file name.
        is_live: Whether the subject is a live subject (class cat or dog) and uses the live-subject prompts.
        prompt_templates: Canonical prompt templates (with ``{unique_token}`` and ``{class_token}`` fields)
            read from ``prompts_and_classes.txt`` for this kind of subject.
    """

    name: str
    class_name: str
    image_paths: tuple[Path, ...]
    is_live: bool
    prompt_templates: tuple[str, ...] = ()

    def reference_image_path(self, index: int = 0) -> Path:
        """Path of the fixed reference image: the ``index``-th real image in sorted order."""
        if not -len(self.image_paths) <= index < len(self.image_paths):
            raise IndexError(f"Subject {self.name!r} has {len(self.image_paths)} images; no reference index {index}.")
        return self.image_paths[index]

    def load_reference_image(self, index: int = 0) -> Image.Image:
        """Load the fixed reference image as RGB."""
        return load_rgb(self.reference_image_path(index))

    def reference_image_paths(self, references: References = "first", index: int = 0) -> tuple[Path, ...]:
        """The photos the adapter is given: ``references`` of them, from the ``index``-th in sorted order.

        Args:
            references: ``"first"`` (the ``index``-th image alone), ``"all"`` (every image) or a count ``N`` (up to
                ``N`` images: a subject with fewer gives all it has).
            index: Position of the first photo; the others follow in sorted order, wrapping around.
        """
        count = reference_count(references, len(self.image_paths))
        start = self.image_paths.index(self.reference_image_path(index))
        return tuple(self.image_paths[(start + offset) % len(self.image_paths)] for offset in range(count))


@dataclass(frozen=True)
class DreamBenchPrompt:
    """One evaluation prompt of a subject.

    Attributes:
        text: The prompt with identifier, e.g. ``"a sks dog in the jungle"``.
        clip_text: The prompt without identifier, e.g. ``"a dog in the jungle"``: used for CLIP-T and, by
            default, as the prompt of encoder methods, which have no identifier token.
        kind: ``"recontextualization"`` or ``"edit"``, see :data:`PROMPT_KIND_RULES`.
        template: The canonical template the prompt was made from.
    """

    text: str
    clip_text: str
    kind: str
    template: str = ""


@dataclass(frozen=True)
class DreamBenchSpec:
    """Contents of ``prompts_and_classes.txt``."""

    class_by_subject: dict[str, str]
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]


def parse_references(value: str | int) -> References:
    """Validate a ``references`` setting: ``"first"``, ``"all"`` or a positive count (an int or its text)."""
    if value in REFERENCE_CHOICES:
        return value
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or isinstance(value, bool):
        raise ValueError(f"references must be 'first', 'all' or a positive number of photos, got {value!r}.")
    return count


def reference_count(references: References, available: int) -> int:
    """How many photos ``references`` gives for a subject with ``available`` photos."""
    references = parse_references(references)
    if references == "first":
        return 1
    if references == "all":
        return available
    return min(references, available)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file and convert it to RGB, closing the file."""
    with Image.open(path) as image:
        return image.convert("RGB")


def parse_prompts_and_classes(text: str) -> DreamBenchSpec:
    """Parse the text of ``prompts_and_classes.txt``.

    Args:
        text: The file's contents.

    Returns:
        The subject -> class table and the object and live-subject prompt templates.

    Raises:
        ValueError: If the table or either prompt list cannot be found or understood.
    """
    lines = text.splitlines()
    return DreamBenchSpec(
        class_by_subject=_parse_class_table(lines),
        object_templates=_parse_prompt_list(text, "Object Prompts"),
        live_templates=_parse_prompt_list(text, "Live Subject Prompts"),
    )


def _parse_class_table(lines: Sequence[str]) -> dict[str, str]:
    header = next((i for i, line in enumerate(lines) if line.strip().lower() == "subject_name,class"), None)
    if header is None:
        raise ValueError("No 'subject_name,class' table in the prompts file.")
    rows = []
    for line in lines[header + 1 :]:
        if not line.strip() or "," not in line:
            break
        rows.append(line)
    table = {name.strip(): class_name.strip() for name, class_name in csv.reader(rows)}
    if not table:
        raise ValueError("The 'subject_name,class' table of the prompts file is empty.")
    return table


def _parse_prompt_list(text: str, heading: str) -> tuple[str, ...]:
    match = re.search(rf"^\s*{re.escape(heading)}\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    if match is None:
        raise ValueError(f"No {heading!r} section in the prompts file.")
    start = text.find("[", match.end())
    if start < 0:
        raise ValueError(f"No prompt list after {heading!r}.")
    node = _first_parsable_list(text, start)
    if node is None:
        raise ValueError(f"Cannot parse the prompt list after {heading!r}.")
    templates = tuple(_template_from_node(element) for element in node.elts)
    if not templates:
        raise ValueError(f"The prompt list after {heading!r} is empty.")
    return templates


def _first_parsable_list(text: str, start: int) -> ast.List | None:
    # The list is parsed (never evaluated) as Python; trying each closing bracket in turn finds its end even if
    # a prompt itself contained a bracket.
    end = text.find("]", start)
    while end >= 0:
        try:
            node = ast.parse(text[start : end + 1], mode="eval").body
        except SyntaxError:
            end = text.find("]", end + 1)
            continue
        return node if isinstance(node, ast.List) else None
    return None


def _template_from_node(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    is_format_call = (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
    )
    if not is_format_call:
        raise ValueError(f"Unsupported prompt entry: {ast.unparse(node)!r}")
    fields = []
    for argument in node.args:
        if not isinstance(argument, ast.Name) or argument.id not in _FORMAT_ARGUMENTS:
            raise ValueError(f"Unsupported format argument in prompt entry: {ast.unparse(node)!r}")
        fields.append(_FORMAT_ARGUMENTS[argument.id])
    return node.func.value.value.format(*fields)


def classify_prompt(template: str) -> str:
    """Return the kind (``"recontextualization"`` or ``"edit"``) of a canonical prompt template."""
    for _, pattern, kind in PROMPT_KIND_RULES:
        if re.search(pattern, template):
            return kind
    return DEFAULT_PROMPT_KIND


def resolve_dataset_dir(root: str | os.PathLike) -> Path:
    """Find the folder holding ``prompts_and_classes.txt``: ``root`` itself or ``root/dataset``."""
    root = Path(root)
    for candidate in (root, root / "dataset"):
        if (candidate / PROMPTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"No {PROMPTS_FILE} in {root} or {root / 'dataset'}.")


def load_dreambench(
    root: str | os.PathLike,
    subjects: Iterable[str] | None = None,
    live_classes: Iterable[str] = LIVE_CLASSES,
) -> list[DreamBenchSubject]:
    """Load DreamBench subjects from a `google/dreambooth` checkout.

    Args:
        root: The repository folder (holding ``dataset/``) or the ``dataset`` folder itself.
        subjects: Names of the subjects to load, in this order. ``None`` loads every subject of the table that
            has a folder, in table order (a partial download is fine).
        live_classes: Classes whose subjects use the live-subject prompts.

    Returns:
        The subjects, each with its sorted real images and its prompt templates.

    Raises:
        ValueError: If a requested subject is not in the table, has no folder, or has no images.
    """
    dataset_dir = resolve_dataset_dir(root)
    spec = parse_prompts_and_classes((dataset_dir / PROMPTS_FILE).read_text(encoding="utf-8"))
    names = _select_subjects(dataset_dir, spec, subjects)
    live_classes = frozenset(live_classes)
    loaded = []
    for name in names:
        class_name = spec.class_by_subject[name]
        is_live = class_name in live_classes
        loaded.append(
            DreamBenchSubject(
                name=name,
                class_name=class_name,
                image_paths=_subject_images(dataset_dir / name),
                is_live=is_live,
                prompt_templates=spec.live_templates if is_live else spec.object_templates,
            )
        )
    logger.info("Loaded %d DreamBench subjects from %s", len(loaded), dataset_dir)
    return loaded


def _select_subjects(dataset_dir: Path, spec: DreamBenchSpec, subjects: Iterable[str] | None) -> list[str]:
    if subjects is not None:
        names = list(subjects)
        unknown = [name for name in names if name not in spec.class_by_subject]
        if unknown:
            raise ValueError(
                f"Subjects not in the DreamBench table: {unknown}; known: {sorted(spec.class_by_subject)}"
            )
        missing = [name for name in names if not (dataset_dir / name).is_dir()]
        if missing:
            raise ValueError(f"Subjects without an image folder in {dataset_dir}: {missing}")
        return names
    names = [name for name in spec.class_by_subject if (dataset_dir / name).is_dir()]
    if len(names) < len(spec.class_by_subject):
        logger.info("%d of %d DreamBench subjects have an image folder", len(names), len(spec.class_by_subject))
    if not names:
        raise ValueError(f"No subject folders in {dataset_dir}.")
    return names


def _subject_images(folder: Path) -> tuple[Path, ...]:
    images = tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
    if not images:
        raise ValueError(f"No images in {folder}.")
    return images


def dreambench_prompts(subject: DreamBenchSubject, unique_token: str = "sks") -> list[DreamBenchPrompt]:
    """The evaluation prompts of a subject, in file order.

    Args:
        subject: A subject from :func:`load_dreambench`.
        unique_token: The identifier placed before the class noun in :attr:`DreamBenchPrompt.text`.

    Returns:
        One :class:`DreamBenchPrompt` per template of the subject's prompt list.
    """
    if not subject.prompt_templates:
        raise ValueError(f"Subject {subject.name!r} has no prompt templates; load it with load_dreambench().")
    return [_make_prompt(template, subject.class_name, unique_token) for template in subject.prompt_templates]


def _make_prompt(template: str, class_name: str, unique_token: str) -> DreamBenchPrompt:
    return DreamBenchPrompt(
        text=_fill(template, unique_token, class_name),
        clip_text=_fill(template, "", class_name),
        kind=classify_prompt(template),
        template=template,
    )


def _fill(template: str, unique_token: str, class_name: str) -> str:
    # Collapsing whitespace removes the gap an empty identifier leaves ("a  dog" -> "a dog").
    return " ".join(template.format(unique_token=unique_token, class_token=class_name).split())
