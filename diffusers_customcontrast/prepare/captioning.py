"""Captions of the frames: an image-to-text model (BLIP, Florence-2, ...) whose captions are made to name the class.

The trainer's captions are the prompts of the reconstruction targets, and evaluation prompts name the class noun
(``a dog on the beach``), so a caption that does not name it is fixed (:func:`name_class`). A caption template
(``caption_template``) replaces the model altogether.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from PIL import Image

from ..data import DEFAULT_CAPTION_TEMPLATE

CLASS_PREFIX = "a photo of a {class_name}, "
"""What ``caption_policy="prefix"`` puts before a caption that does not name the class."""


class Captioner(Protocol):
    """Captions images of a subject of class ``class_name``."""

    def __call__(self, images: Sequence[Image.Image], class_name: str) -> list[str]:
        """One caption per image."""


class ImageTextCaptioner:
    """Captions from a transformers image-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``).

    Decoding is greedy, so that a run and its resume write the same captions.

    Args:
        model: The model (in eval mode, on its device and dtype).
        processor: Its processor.
        prompt: Text given with each image (BLIP continues it, Florence-2 reads it as the task, e.g.
            ``<CAPTION>``); it is removed from the front of the output when the model repeats it.
        max_new_tokens: Length limit of a caption.
    """

    def __init__(self, model: Any, processor: Any, prompt: str | None = None, max_new_tokens: int = 40):
        self.model = model
        self.processor = processor
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        prompt: str | None = None,
        max_new_tokens: int = 40,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImageTextCaptioner:
        """Load the captioner ``model`` (hub id or folder) on ``device``."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device or "cpu").eval()
        return cls(loaded, AutoProcessor.from_pretrained(model), prompt, max_new_tokens)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], class_name: str) -> list[str]:
        kwargs: dict[str, Any] = {"images": list(images), "return_tensors": "pt"}
        if self.prompt is not None:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs)
        parameter = next(self.model.parameters())
        inputs = {
            name: value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)
            for name, value in inputs.items()
            if isinstance(value, torch.Tensor)
        }
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        captions = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [_without_prompt(caption.strip(), self.prompt) for caption in captions]


def _without_prompt(caption: str, prompt: str | None) -> str:
    if prompt and caption.lower().startswith(prompt.lower()):
        return caption[len(prompt) :].strip()
    return caption


def names_class(caption: str, class_name: str) -> bool:
    """Whether ``caption`` names ``class_name`` as a whole word (or its plural), ignoring case."""
    pattern = r"\b" + r"\s+".join(re.escape(word) for word in class_name.lower().split()) + r"(s|es)?\b"
    return re.search(pattern, caption.lower()) is not None


def name_class(caption: str, class_name: str, policy: str = "prefix") -> tuple[str, bool]:
    """A caption that names the class, and whether ``caption`` had to be changed for it.

    ``policy="prefix"`` keeps the model's words after :data:`CLASS_PREFIX`; ``"check"`` replaces a caption that does
    not name the class (or an empty one) by the default template.
    """
    if caption and names_class(caption, class_name):
        return caption, False
    if policy == "prefix" and caption:
        return CLASS_PREFIX.replace("{class_name}", class_name) + caption, True
    return DEFAULT_CAPTION_TEMPLATE.replace("{class_name}", class_name), True
