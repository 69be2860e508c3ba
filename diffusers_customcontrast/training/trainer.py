"""The training loop: ``train(config)`` with accelerate (one process, DDP, DeepSpeed or FSDP, from accelerate's config).

A step: the frozen encoders turn the batch into :class:`ObjectiveInputs` (:mod:`.batch`), the prepared
:class:`CustomContrastObjective` computes the losses, accelerate back-propagates (with accumulation and mixed
precision), clips and steps. Checkpoints, validation images and the final export happen at step boundaries.

Resuming continues the same run: the data order comes from the dataset's and sampler's ``set_epoch`` and
``accelerator.skip_first_batches``; every random draw of a step from a generator seeded by
``(seed, global step, micro-step, process)``; weights, optimizer, scheduler and position from the checkpoint.

Faults (:mod:`.faults`, docs/reliability.md): an unusable sample is replaced by the dataset and reported here; a step
with a non-finite loss makes no update (``max_consecutive_nonfinite`` in a row stop the run); SIGTERM makes the run
save a checkpoint after the current step and return; checkpoints are written atomically (:mod:`.checkpoints`).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .batch import BatchEncoder, step_generator
from .checkpoints import (
    TrainingProgress,
    checkpoint_step,
    list_checkpoints,
    register_checkpoint_hooks,
    remove_partial_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from .components import add_unet_lora, build_adapter, load_base_model, weight_dtype_for
from .config import ConfigError, TrainingConfig
from .dataset import build_training_data, load_training_subjects
from .export import LOSS_HISTORY_NAME, LossHistory, export_adapter, push_folder_to_hub
from .faults import NonFiniteLossError, StepFaults, StopRequest, agree_on_step
from .objective import CustomContrastObjective, ObjectiveSettings
from .validation import reference_to_image, run_validation

logger = get_logger(__name__)

__all__ = ["TrainingResult", "train"]

TRAINING_CONFIG_NAME = "training_config.yaml"
"""The run's configuration, written to ``output_dir`` at the start of a run."""

_NON_LOSS_KEYS = ("step", "lr", "seconds", "epoch", "skipped_samples", "nonfinite")


@dataclass
class TrainingResult:
    """What :func:`train` returns: where the adapter is and how the losses went.

    ``loss_history`` holds one entry per optimizer step of the whole run (resumed runs included), each with
    ``step``, ``epoch``, ``lr``, ``seconds`` (wall time of the step), ``skipped_samples`` (unusable samples replaced
    in the step's batches), ``nonfinite`` (1 if the step was skipped for a NaN / inf loss) and the loss terms
    averaged over accumulation micro-batches and processes (``diffusion``, ``cscl``, ``macl``, ``location``,
    ``total``, ``logit_scale``).

    ``skipped_samples`` and ``nonfinite_steps`` count over the whole run (resumed runs included) and all processes.
    ``interrupted`` is True when SIGTERM stopped the run: its state is in the last checkpoint, and the adapter was
    not exported (resume with ``resume_from_checkpoint="latest"`` to finish).
    """

    output_dir: Path
    global_step: int
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    interrupted: bool = False

    @property
    def final_losses(self) -> dict[str, float]:
        last = self.loss_history[-1] if self.loss_history else {}
        return {k: v for k, v in last.items() if k not in _NON_LOSS_KEYS}

    @property
    def seconds_per_step(self) -> float | None:
        """Median wall time of this run's steps, the first (warm-up) step excluded."""
        times = [e["seconds"] for e in self.loss_history[1:] if "seconds" in e]
        return statistics.median(times) if times else None


def _needs_cpu_flag() -> bool:
    """Several processes on a machine without an accelerator device: accelerate must be told to use CPUs (gloo).

    ``accelerate launch --multi_gpu`` starts the processes with torchrun but, without ``ACCELERATE_USE_CPU``, each
    would train alone on the CPU; this makes them one gloo group instead.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    device_module = getattr(torch, "accelerator", None)
    has_device = torch.cuda.is_available() or (device_module is not None and device_module.is_available())
    return not has_device


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """Deterministic algorithms for the run's duration (restored afterwards: it is process-wide state)."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def train(config: TrainingConfig) -> TrainingResult:
    """Train a CustomContrast adapter as ``config`` says and export it to ``config.output_dir``.

    Returns a :class:`TrainingResult` on every process (the files are written by the main process).
    """
    config.validate()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=config.trackers,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir),
            logging_dir=str(output_dir / config.logging_dir),
            total_limit=config.checkpoints_total_limit,
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)],
        **({"cpu": True} if _needs_cpu_flag() else {}),
    )
    with _deterministic(config.deterministic), StopRequest() as stop:
        try:
            return _Run(config, accelerator, stop).run()
        finally:
            accelerator.end_training()
            # accelerate keeps its settings in process-wide singletons: forget this run's (mixed precision, gradient
            # accumulation) so that a later train() in the same process may choose others. The distributed setup
            # itself (PartialState, the process group) is kept.
            AcceleratorState._reset_state()
            GradientState._reset_state()


class _Run:
    """One training run: setup, loop, checkpoints, validation and export (split in methods for readability)."""

    def __init__(self, config: TrainingConfig, accelerator: Accelerator, stop: StopRequest | None = None) -> None:
        self.config = config
        self.accelerator = accelerator
        self.stop = stop or StopRequest()
        self.output_dir = Path(config.output_dir)
        self.validation_images: list[Path] = []

    # ------------------------------------------------------------------------------------------------ setup

    def _setup(self) -> None:
        config, accelerator = self.config, self.accelerator
        _quiet_libraries(accelerator.is_local_main_process)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # Seeds the adapter's (and LoRA's) initialisation; per-step draws use their own generators.
        set_seed(config.seed)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.to_yaml(self.output_dir / TRAINING_CONFIG_NAME)
            remove_partial_checkpoints(self.output_dir)
        # Names this run's temporary checkpoint folders; the same on every process.
        self.save_token = broadcast_object_list([uuid.uuid4().hex[:8]])[0]

        base = load_base_model(config)
        weight_dtype = weight_dtype_for(accelerator.mixed_precision)
        # SDXL's VAE overflows in fp16 (NaN latents) unless it is the fp16-fix VAE: keep it in fp32 then.
        vae_dtype = torch.float32 if (base.is_sdxl and weight_dtype == torch.float16) else weight_dtype
        if config.pretrained_vae_model_name_or_path:
            vae_dtype = weight_dtype
        base.freeze(accelerator.device, weight_dtype, vae_dtype)
        if config.use_lora:
            add_unet_lora(base.unet, config)  # before the adapter lives in the UNet (LoRA targets match by name)
        if config.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        adapter = build_adapter(config, base)
        objective = CustomContrastObjective(
            base.unet, adapter, base.noise_scheduler, ObjectiveSettings.from_config(config)
        )
        objective.train()
        self.base = base

        index = load_training_subjects(config)
        self.num_subjects = len(index)
        self.data = build_training_data(config, index, reference_size=base.image_encoder.config.image_size)
        self.encoder = BatchEncoder.from_config(base, config, adapter.adapter_config)

        learning_rate = config.learning_rate
        if config.scale_lr:
            learning_rate *= config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        optimizer = _make_optimizer(config, objective, learning_rate)
        # accelerate steps a prepared scheduler once per process per optimizer step.
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=config.max_train_steps * accelerator.num_processes,
            num_cycles=config.lr_num_cycles,
            power=config.lr_power,
        )
        self.objective, self.optimizer, self.loader, self.lr_scheduler = accelerator.prepare(
            objective, optimizer, self.data.loader, lr_scheduler
        )
        self.trainable = objective.trainable_parameters()
        self.progress = TrainingProgress()
        accelerator.register_for_checkpointing(self.progress)
        register_checkpoint_hooks(accelerator)
        if config.trackers:
            accelerator.init_trackers(config.tracker_project_name, config=config.tracker_config())

    def _resume(self) -> int | None:
        """Load the checkpoint to resume from, if any; returns its step."""
        path = resolve_resume_checkpoint(self.output_dir, self.config.resume_from_checkpoint)
        if path is None:
            if self.config.resume_from_checkpoint is not None:
                logger.info("No checkpoint in %s: starting a new run.", self.output_dir)
            return None
        logger.info("Resuming from %s.", path)
        self.accelerator.load_state(str(path))
        return self.progress.global_step

    def _validation_reference(self) -> tuple[Any, str]:
        config = self.config
        if config.validation_reference:
            return reference_to_image(config.validation_reference), config.validation_class_name or "object"
        dataset = self.data.dataset
        epoch = dataset.epoch
        dataset.set_epoch(0)  # the first subject's reference of epoch 0, whatever epoch the run starts at
        item = dataset.__getitems__([0])[0]  # another subject's if the first one's sample is unusable
        dataset.set_epoch(epoch)
        return reference_to_image(item["reference"]), config.validation_class_name or item["class_name"]

    # ------------------------------------------------------------------------------------------------ loop

    def run(self) -> TrainingResult:
        self._setup()
        config, accelerator = self.config, self.accelerator
        resumed_step = self._resume()
        global_step = resumed_step or 0
        self.history = LossHistory(
            self.output_dir / LOSS_HISTORY_NAME if accelerator.is_main_process else None, resume_step=resumed_step
        )
        if len(self.loader) == 0:
            raise ConfigError(
                f"{self.num_subjects} subjects make no full batch of {config.train_batch_size} for each of the "
                f"{accelerator.num_processes} processes: lower train_batch_size or raise repeats_per_epoch."
            )
        steps_per_epoch = math.ceil(len(self.loader) / config.gradient_accumulation_steps)
        num_epochs = math.ceil(config.max_train_steps / steps_per_epoch)
        first_epoch = global_step // steps_per_epoch
        # Resumes happen at optimizer-step boundaries, so the batches already used are whole accumulation cycles.
        batches_to_skip = (global_step % steps_per_epoch) * config.gradient_accumulation_steps
        validating = config.validation_steps is not None and accelerator.is_main_process
        if validating:
            self.validation_reference, class_name = self._validation_reference()
            self.validation_prompts = [p.replace("{class_name}", class_name) for p in config.validation_prompts]

        total_batch = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        self.effective_batch_size = total_batch
        logger.info(
            "Training on %d subjects: %d steps (from %d), %d per epoch, total batch %d (%d x %d accumulation x %d "
            "processes), %d trainable parameters.",
            self.num_subjects,
            config.max_train_steps,
            global_step,
            steps_per_epoch,
            total_batch,
            config.train_batch_size,
            config.gradient_accumulation_steps,
            accelerator.num_processes,
            sum(p.numel() for p in self.trainable),
        )
        progress_bar = tqdm(
            total=config.max_train_steps,
            initial=global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        sums: dict[str, torch.Tensor] = {}
        micro_count = 0  # micro-batches of the current optimizer step
        step_skipped = 0  # unusable samples replaced in the current optimizer step's batches (this process)
        step_nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        last_time = time.perf_counter()
        last_validated = last_saved = None
        for epoch in range(first_epoch, num_epochs):
            if global_step >= config.max_train_steps:
                break
            # The prepared loader re-applies its own epoch counter to the sampler and dataset at every __iter__ (and
            # a resumed run's counter starts at 0): set it too, so that all of them agree on this epoch.
            self.loader.set_epoch(epoch)
            self.data.set_epoch(epoch)
            loader = self.loader
            if epoch == first_epoch and batches_to_skip:
                loader = accelerator.skip_first_batches(self.loader, batches_to_skip)
            for batch in loader:
                step_skipped += self._report_skipped(batch.pop("skipped", None), global_step + 1)
                generator = step_generator(
                    config.seed, global_step, micro_count, accelerator.process_index, accelerator.device
                )
                inputs = self.encoder(batch, generator)
                with accelerator.accumulate(self.objective):
                    output = self.objective(inputs, step=global_step)
                    step_nonfinite = step_nonfinite | ~torch.isfinite(output.loss.detach())
                    accelerator.backward(output.loss)  # on every process even when NaN: DDP reduces in backward
                    update = True
                    if accelerator.sync_gradients:
                        faults = agree_on_step(accelerator, self.stop.requested, step_nonfinite, step_skipped)
                        update = not faults.nonfinite
                        if update and config.max_grad_norm > 0:
                            norm = accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm)
                            # A finite loss can still have a NaN / inf gradient; the norm is global (gradients
                            # are reduced before clipping), so every process skips the same step.
                            if norm is not None and not torch.isfinite(torch.as_tensor(norm)):
                                faults = replace(faults, nonfinite=True)
                                update = False
                    if update:  # between accumulation boundaries both are no-ops (accelerate)
                        self.optimizer.step()
                        self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for name, value in output.terms.items():
                    sums[name] = sums.get(name, 0.0) + value
                micro_count += 1
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                self._count_faults(global_step, faults)
                step_skipped, step_nonfinite = 0, torch.zeros_like(step_nonfinite)
                logs = self._reduce(sums, micro_count)
                sums, micro_count = {}, 0
                now = time.perf_counter()
                logs.update(lr=self.lr_scheduler.get_last_lr()[0], seconds=now - last_time, epoch=epoch)
                logs.update(skipped_samples=faults.skipped_samples, nonfinite=int(faults.nonfinite))
                last_time = now
                self.history.append({"step": global_step, **logs})
                accelerator.log(logs, step=global_step)
                progress_bar.update(1)
                progress_bar.set_postfix(
                    {k: f"{logs[k]:.4g}" for k in ("total", "diffusion", "cscl", "macl", "location") if k in logs}
                )

                if self.progress.consecutive_nonfinite >= config.max_consecutive_nonfinite:
                    progress_bar.close()
                    self._stop_nonfinite(global_step)
                if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                    self._save_checkpoint(global_step)
                    last_saved = global_step
                if faults.stop:
                    progress_bar.close()
                    return self._stop_for_signal(global_step, saved=last_saved == global_step)
                if config.validation_steps and global_step % config.validation_steps == 0:
                    self._validate(global_step, validating)
                    last_validated = global_step
                    last_time = time.perf_counter()  # validation time is not training time
                if global_step >= config.max_train_steps:
                    break
        progress_bar.close()

        if config.validation_steps and last_validated != global_step:
            self._validate(global_step, validating)
        return self._finish(global_step)

    def _reduce(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Average the logged terms over accumulation micro-batches and processes."""
        names = sorted(sums)
        stacked = (
            torch.stack([torch.as_tensor(sums[n], device=self.accelerator.device).float() for n in names]) / count
        )
        stacked = self.accelerator.reduce(stacked, reduction="mean")
        return dict(zip(names, stacked.tolist()))

    def _report_skipped(self, skipped: list[list[str]] | None, step: int) -> int:
        """Log the unusable samples the dataset replaced in a batch (every process its own); returns their number."""
        messages = [message for item in skipped or [] for message in item]
        for message in messages:
            logger.warning("Step %d: skipped an unusable training sample: %s", step, message, main_process_only=False)
        return len(messages)

    def _count_faults(self, global_step: int, faults: StepFaults) -> None:
        progress = self.progress
        progress.global_step = global_step
        progress.skipped_samples += faults.skipped_samples
        if not faults.nonfinite:
            progress.consecutive_nonfinite = 0
            return
        progress.nonfinite_steps += 1
        progress.consecutive_nonfinite += 1
        logger.warning(
            "Step %d: the loss or its gradient is not finite (NaN or infinite): the step is skipped, with no update (%d in a row, "
            "the run stops at %d).",
            global_step,
            progress.consecutive_nonfinite,
            self.config.max_consecutive_nonfinite,
        )

    def _stop_nonfinite(self, step: int) -> None:
        count = self.progress.consecutive_nonfinite
        checkpoints = list_checkpoints(self.output_dir, complete_only=True)
        latest = f"{checkpoints[-1]} (step {checkpoint_step(checkpoints[-1])})" if checkpoints else "none was saved"
        raise NonFiniteLossError(
            f"The loss or its gradient was NaN or infinite at {count} optimizer steps in a row (steps {step - count + 1} to {step}; "
            f"max_consecutive_nonfinite={self.config.max_consecutive_nonfinite}): stopping. Those steps made no "
            f"update, so the weights are the last good ones; latest checkpoint: {latest}. Lower the learning rate, "
            "keep max_grad_norm on, or check the data and mixed precision, then resume with "
            "--resume_from_checkpoint latest."
        )

    def _stop_for_signal(self, step: int, saved: bool) -> TrainingResult:
        """SIGTERM (on any process): save the state of this step (unless just saved) and return, without export."""
        if not saved:
            self._save_checkpoint(step)
        logger.warning(
            "Stopped by %s after step %d: the training state is in %s; rerun with --resume_from_checkpoint latest "
            "to continue.",
            self.stop.received or "a signal on another process",
            step,
            self.output_dir / f"checkpoint-{step}",
        )
        return self._result(step, interrupted=True)

    def _save_checkpoint(self, step: int) -> None:
        path = save_checkpoint(
            self.accelerator, self.output_dir, step, self.save_token, self.config.checkpoints_total_limit
        )
        logger.info("Saved the training state to %s.", path)

    def _validate(self, step: int, on_this_process: bool) -> None:
        config = self.config
        if on_this_process:
            unet = self.accelerator.unwrap_model(self.objective).unet
            path = run_validation(
                self.accelerator,
                self.base,
                unet,
                self.validation_reference,
                self.validation_prompts,
                self.output_dir,
                step,
                resolution=config.resolution,
                num_inference_steps=config.validation_num_inference_steps,
                guidance_scale=config.validation_guidance_scale,
                images_per_prompt=config.validation_images_per_prompt,
                seed=config.seed,
            )
            self.validation_images.append(path)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------ end

    def _result(self, global_step: int, interrupted: bool = False) -> TrainingResult:
        progress = self.progress
        log = logger.warning if progress.skipped_samples or progress.nonfinite_steps else logger.info
        log(
            "The run skipped %d unusable samples (replaced by other subjects' samples; the warnings above name the "
            "files) and %d steps with a non-finite loss.",
            progress.skipped_samples,
            progress.nonfinite_steps,
        )
        return TrainingResult(
            output_dir=self.output_dir,
            global_step=global_step,
            loss_history=list(self.history.entries),
            checkpoints=list_checkpoints(self.output_dir),
            validation_images=list(self.validation_images),
            skipped_samples=progress.skipped_samples,
            nonfinite_steps=progress.nonfinite_steps,
            interrupted=interrupted,
        )

    def _finish(self, global_step: int) -> TrainingResult:
        config, accelerator = self.config, self.accelerator
        accelerator.wait_for_everyone()
        objective = accelerator.unwrap_model(self.objective)
        result = self._result(global_step)
        if accelerator.is_main_process:
            export_adapter(
                objective,
                self.base,
                config,
                self.output_dir,
                global_step,
                result.final_losses,
                self.num_subjects,
                self.effective_batch_size,
                skipped_samples=result.skipped_samples,
                nonfinite_steps=result.nonfinite_steps,
            )
            if config.push_to_hub:
                push_folder_to_hub(self.output_dir, config.hub_model_id, global_step)
        if config.debug_save_rank_states:
            folder = self.output_dir / "rank_states"
            folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous().clone() for k, v in objective.trainable_state_dict().items()}
            save_file(state, folder / f"rank-{accelerator.process_index}.safetensors")
        accelerator.wait_for_everyone()
        result.checkpoints = list_checkpoints(self.output_dir)
        return result


def _make_optimizer(config: TrainingConfig, objective: CustomContrastObjective, learning_rate: float):
    """AdamW over the trainable parameters; the CSCL temperature gets no weight decay (as CLIP's)."""
    temperature = [p for p in objective.logit_scale.parameters() if p.requires_grad]
    temperature_ids = {id(p) for p in temperature}
    weights = [p for p in objective.trainable_parameters() if id(p) not in temperature_ids]
    groups = [{"params": weights, "weight_decay": config.adam_weight_decay}]
    if temperature:
        groups.append({"params": temperature, "weight_decay": 0.0})
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(
        groups, lr=learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon
    )


def _quiet_libraries(main_process: bool) -> None:
    """Warnings from the libraries once, on the main process; errors only elsewhere."""
    import diffusers
    import transformers

    if main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
