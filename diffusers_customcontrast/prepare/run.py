"""``prepare_dataset``: raw inputs to a training set, on one process or split over ``accelerate launch`` processes.

Per subject: read candidate frames, keep sharp and distinct ones covering the views (:mod:`.frames`), mask the subject
(:mod:`.masking`) and drop frames whose mask fails a check (:mod:`.filters`), caption (:mod:`.captioning`), write the
subject folder and its record (:mod:`.output`). Subjects are dealt to the processes in turn; a subject that has a
record is finished and not done again, so a stopped run continues where it stopped. When every process is done, the
main process packs shards (``output_format="shards"``) and writes the summary and the contact sheet
(:mod:`.report`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data import load_subject_folder, load_subjects, write_subject_shards
from .captioning import Captioner, ImageTextCaptioner, name_class
from .config import PrepareConfig, PrepareConfigError
from .filters import NO_DETECTION, TOO_FEW_FRAMES, UNREADABLE_INPUT, check_mask
from .frames import Candidate, read_candidates, select_frames
from .masking import SubjectMask, SubjectMasker, build_masker
from .output import STATE_DIR, PreparedFrame, RecordStore, SubjectRecord, write_subject_folder
from .report import CONTACT_SHEET_NAME, SUMMARY_NAME, PrepareSummary, contact_sheet
from .sources import InputError, SubjectSource, discover_subjects

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
"""The settings of the run that made an output, in its ``.prepare`` folder."""

# Settings that do not change what is written: a resumed run may use other values.
_RUNTIME_SETTINGS = ("batch_size", "device", "progress", "contact_sheet_subjects")

T = TypeVar("T")


def prepare_dataset(
    config: PrepareConfig,
    masker: SubjectMasker | None = None,
    captioner: Captioner | None = None,
    state: Any = None,
) -> PrepareSummary:
    """Prepare ``config.input`` into ``config.output`` (see the module docstring and ``docs/data_preparation.md``).

    Args:
        config: The run's settings.
        masker: Masks the subjects; default: the models ``config`` names (none for ``masker="none"``).
        captioner: Captions the frames when ``config.caption_template`` is not set; default: ``config.captioner``.
        state: An ``accelerate.PartialState`` (or ``Accelerator``) giving the process split; default: accelerate's
            state of this process (one process unless started by ``accelerate launch``).

    Returns:
        The summary of the whole run (every process returns it).

    Raises:
        PrepareConfigError: if a setting is invalid, or the output was started with other settings.
        InputError: if the input holds no subject it can read.
    """
    config = config.validate().resolved()
    if state is None:
        from accelerate import PartialState

        # No accelerator device: the processes of `accelerate launch --multi_gpu` are one gloo group on CPUs.
        state = PartialState(cpu=not _has_accelerator())
    discovered = discover_subjects(config.input, config.input_kind, config.class_name, config.domain)
    output = Path(config.output)
    records = RecordStore(output)
    _claim_output(output, config, write=state.is_main_process)
    finished = records.finished()
    state.wait_for_everyone()  # every process has listed the finished subjects before any writes a new one

    todo = [source for source in discovered.subjects if source.subject_id not in finished]
    mine = todo[state.process_index :: state.num_processes]
    if mine:
        device = torch.device(config.device) if config.device else state.device
        dtype = _dtype(config.dtype, device)
        if masker is None and config.masker != "none":
            masker = build_masker(config, device, dtype)
        if captioner is None and config.caption_template is None:
            captioner = ImageTextCaptioner.from_pretrained(
                config.captioner, config.caption_prompt, config.max_caption_tokens, device=device, dtype=dtype
            )
    folders = output if config.output_format == "folders" else output / STATE_DIR / "subjects"
    staging = output / STATE_DIR / "partial"
    description = "prepare" if state.num_processes == 1 else f"prepare (process {state.process_index})"
    for source in tqdm(
        mine, desc=description, unit="subject", position=state.process_index, disable=not config.progress
    ):
        records.write(prepare_subject(source, config, masker, captioner, folders, staging))
    state.wait_for_everyone()

    all_records = [records.read(source.subject_id) for source in discovered.subjects]
    ignored = [str(p) for p in discovered.ignored] + [str(p) for s in discovered.subjects for p in s.ignored]
    summary = PrepareSummary.from_records(output, all_records, ignored)
    if state.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # the finished subjects left it empty
        if config.output_format == "shards":
            _pack_shards(output, folders, config)
        summary.save(output / SUMMARY_NAME)
        if summary.subjects_kept:
            sheet = contact_sheet(load_subjects(output), max_subjects=config.contact_sheet_subjects)
            sheet.save(output / CONTACT_SHEET_NAME, quality=90)
    state.wait_for_everyone()
    return summary


def prepare_subject(
    source: SubjectSource,
    config: PrepareConfig,
    masker: SubjectMasker | None,
    captioner: Captioner | None,
    folders: Path,
    staging: Path,
) -> SubjectRecord:
    """Select, mask, caption and write one subject; returns its record (not yet saved)."""
    record = SubjectRecord(source.subject_id, source.class_name, str(source.location), kept=False)
    drops: Counter = Counter()
    try:
        candidates = read_candidates(
            source, config.max_frames, config.candidates_per_frame, config.max_side, drops, record.notes
        )
    except InputError as error:
        record.reason, record.message = UNREADABLE_INPUT, str(error)
        record.frame_drops = dict(drops)
        return record
    record.candidates = len(candidates)
    chosen = select_frames(
        candidates,
        ordered=source.kind != "photos",
        max_frames=config.max_frames,
        min_sharpness=config.min_sharpness,
        sharpness_ratio=config.sharpness_ratio,
        duplicate_distance=config.duplicate_distance,
        drops=drops,
    )
    kept = (
        _masked(chosen, source.class_name, masker, config, drops)
        if masker is not None
        else [(c, None) for c in chosen]
    )
    record.frame_drops = dict(drops)
    if len(kept) < config.min_frames:
        record.reason = TOO_FEW_FRAMES
        return record

    images = [candidate.image for candidate, _ in kept]
    if config.caption_template is not None:
        captions: list[str | None] = [None] * len(kept)
    else:
        captions = []
        for caption in _batched(lambda chunk: captioner(chunk, source.class_name), images, config.batch_size):
            named, changed = name_class(caption, source.class_name, config.caption_policy)
            captions.append(named)
            record.captions_fixed += changed
    frames = [
        PreparedFrame(
            image=candidate.image,
            mask=None if mask is None else mask.mask,
            caption=caption,
            lossless=candidate.lossless,
            origin=candidate.origin,
            sharpness=candidate.sharpness,
            score=None if mask is None else mask.score,
        )
        for (candidate, mask), caption in zip(kept, captions)
    ]
    names = write_subject_folder(
        source.subject_id, source.class_name, frames, config.caption_template, folders, staging
    )
    record.kept = True
    record.frames = [
        {"file": name, "origin": frame.origin, "sharpness": round(frame.sharpness, 2), "score": frame.score}
        for name, frame in zip(names, frames)
    ]
    return record


def _masked(
    chosen: list[Candidate], class_name: str, masker: SubjectMasker, config: PrepareConfig, drops: Counter
) -> list[tuple[Candidate, SubjectMask]]:
    """The frames whose subject was found and whose mask passes the checks, with their masks."""
    masks = _batched(lambda chunk: masker(chunk, class_name), [c.image for c in chosen], config.batch_size)
    kept = []
    for candidate, mask in zip(chosen, masks):
        if mask is None:
            drops[NO_DETECTION] += 1
            continue
        expected = (candidate.image.height, candidate.image.width)
        if mask.mask.shape != expected:
            raise ValueError(
                f"expected the masker to return {expected} masks (the frame's height x width), got {mask.mask.shape}"
            )
        reason = check_mask(mask.mask, config.min_mask_area, config.max_mask_area, config.max_border_touch)
        if reason is not None:
            drops[reason] += 1
            continue
        kept.append((candidate, SubjectMask(np.asarray(mask.mask, dtype=bool), mask.score)))
    return kept


def _batched(function: Callable[[list[Image.Image]], Sequence[T]], images: list[Image.Image], size: int) -> list[T]:
    """``function`` applied to ``images`` in chunks of ``size``, the results concatenated."""
    results: list[T] = []
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        outputs = list(function(chunk))
        if len(outputs) != len(chunk):
            raise ValueError(f"expected one result per image from the model, got {len(outputs)} for {len(chunk)}")
        results += outputs
    return results


def _has_accelerator() -> bool:
    device_module = getattr(torch, "accelerator", None)  # torch >= 2.6; older ones know CUDA only
    return torch.cuda.is_available() or (device_module is not None and device_module.is_available())


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _claim_output(output: Path, config: PrepareConfig, write: bool) -> None:
    """Check that a resumed run uses the settings the output was started with; record them (``write``) if new."""
    path = output / STATE_DIR / CONFIG_NAME
    settings = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_SETTINGS}
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise PrepareConfigError(
                f"expected the settings '{output}' was started with, got other values of {', '.join(changed)}: "
                "continue with the same settings, or prepare into another output folder"
            )
    elif write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def _pack_shards(output: Path, folders: Path, config: PrepareConfig) -> None:
    """Append the finished subject folders to the shards, then remove them (the shards now hold them)."""
    if not folders.is_dir() or not any(p.is_dir() for p in folders.iterdir()):
        return
    written = write_subject_shards(load_subject_folder(folders), output, config.subjects_per_shard, config.seed)
    logger.info("Wrote %d shards to %s.", len(written), output)
    shutil.rmtree(folders)
