"""Command line for the DreamBench evaluation.

Usage (one process, or several with ``accelerate launch``)::

    python -m diffusers_customcontrast.evaluate --dreambench_root dreambooth --pretrained_model \\
        stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter path/to/customcontrast --output_dir eval/cc

:func:`main` parses the arguments, builds the pipeline and the metric models and calls :func:`run_evaluation`,
which can also be called directly with any pipeline object.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .dreambench import load_dreambench, parse_references
from .imagereward import DEFAULT_IMAGE_REWARD_TOKENIZER, ImageRewardScorer
from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, DreamBenchScorer
from .paper import PAPER_TABLES
from .processes import ProcessSplitter, SingleProcess
from .report import load_results_json, write_report
from .sources import check_model_source
from .sweep import evaluate_pipeline, scale_sweep

logger = logging.getLogger(__name__)

PIPELINE_CLASSES = {
    "auto": "DiffusionPipeline",
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class _HelpFormatter(argparse.HelpFormatter):
    """Ends each option's help with its default, unless the help already says what the default does."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or any(word in text.lower() for word in ("default", "required")):
            return text
        default = "off" if isinstance(action, argparse._StoreTrueAction) else "%(default)s"
        return f"{text.rstrip('.')} (default: {default})."


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the evaluation command."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_customcontrast.evaluate",
        description="DreamBench evaluation (CLIP-T, ImageReward, CLIP-I, DINO) of a CustomContrast or IP-Adapter "
        "pipeline, reported beside the CustomContrast paper's table. See docs/evaluation.md.",
        formatter_class=_HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dreambench_root", required=True, help="google/dreambooth checkout or its dataset/ folder (required)."
    )
    data.add_argument(
        "--subjects", nargs="+", help="Subjects to evaluate, space or comma separated (default: all subjects)."
    )
    data.add_argument(
        "--reference_index", type=int, default=0, help="The reference photo: its index in sorted file-name order."
    )
    data.add_argument(
        "--references",
        type=_references,
        default="first",
        help="Photos the adapter is given per subject: first (the reference photo alone, the DreamBench "
        "protocol), all, or a number N (up to N photos from the reference photo on).",
    )

    model = parser.add_argument_group("pipeline")
    model.add_argument("--pretrained_model", help="Base pipeline: hub id or local folder (required).")
    model.add_argument(
        "--pipeline_class",
        choices=sorted(PIPELINE_CLASSES),
        default="auto",
        help="auto: DiffusionPipeline.from_pretrained; sd15 / sdxl: the Stable Diffusion (XL) pipeline class.",
    )
    adapters = model.add_mutually_exclusive_group()
    adapters.add_argument(
        "--adapter", help="CustomContrast adapter (hub id or folder) for pipe.load_customcontrast() (default: none)."
    )
    adapters.add_argument(
        "--ip_adapter",
        nargs=3,
        metavar=("REPO", "SUBFOLDER", "WEIGHT_NAME"),
        help="Plain IP-Adapter baseline for pipe.load_ip_adapter(), e.g. h94/IP-Adapter models "
        "ip-adapter-plus_sd15.safetensors (default: none).",
    )
    model.add_argument(
        "--ip_adapter_image_encoder_folder",
        help="image_encoder_folder for load_ip_adapter() (default: the one load_ip_adapter() picks).",
    )
    model.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="Pipeline dtype; auto: float16 on CUDA."
    )
    model.add_argument("--device", help="Device (default: the accelerate process's device).")
    model.add_argument("--local_files_only", action="store_true", help="Never contact the hub.")
    model.add_argument("--cache_dir", help="Hub cache folder (default: the hub's own).")

    generation = parser.add_argument_group("generation")
    generation.add_argument("--images_per_prompt", type=_positive_int, default=4, help="Images per (subject, prompt).")
    generation.add_argument("--num_inference_steps", type=_positive_int, default=50, help="Sampling steps.")
    generation.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    generation.add_argument("--height", type=_positive_int, help="Image height (default: the pipeline's).")
    generation.add_argument("--width", type=_positive_int, help="Image width (default: the pipeline's).")
    generation.add_argument("--batch_size", type=_positive_int, default=4, help="Images per pipeline call.")
    generation.add_argument("--seed", type=int, default=0, help="Run seed; every image gets its own seed from it.")
    generation.add_argument(
        "--scales",
        type=_float_list,
        help="Comma-separated adapter scales for a scale sweep (default: one run at the adapter's own scale).",
    )
    generation.add_argument("--use_identifier", action="store_true", help="Prompt 'a sks dog ...' not 'a dog ...'.")
    generation.add_argument("--unique_token", default="sks", help="Identifier used with --use_identifier.")

    metrics = parser.add_argument_group("metrics and report")
    metrics.add_argument(
        "--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP for CLIP-T / CLIP-I: hub id or folder."
    )
    metrics.add_argument("--dino_model", default=DEFAULT_DINO_MODEL, help="DINO ViT: hub id or folder.")
    metrics.add_argument(
        "--imagereward_model",
        help="ImageReward: hub id (THUDM/ImageReward, downloaded only when given), a folder holding "
        "ImageReward.safetensors or ImageReward.pt, or the file itself (default: ImageReward not computed).",
    )
    metrics.add_argument(
        "--imagereward_tokenizer",
        default=DEFAULT_IMAGE_REWARD_TOKENIZER,
        help="BERT tokenizer of the reward model: hub id or folder.",
    )
    metrics.add_argument(
        "--imagereward_med_config", help="med_config.json of the reward model (default: the one beside it)."
    )
    metrics.add_argument("--metric_batch_size", type=_positive_int, default=32, help="Images per metric forward pass.")
    metrics.add_argument(
        "--output_dir", required=True, help="Folder for images, manifests, scores and report (required)."
    )
    metrics.add_argument(
        "--method_name", help="Name in the tables and plot (default: CustomContrast, or IP-Adapter with --ip_adapter)."
    )
    metrics.add_argument(
        "--compare_results", nargs="*", default=[], help="results.json of other runs to include (default: none)."
    )
    metrics.add_argument(
        "--paper_table",
        choices=["auto", *PAPER_TABLES, "none"],
        default="auto",
        help="The paper's table to print the run under; auto: sdxl for a pipeline with two text encoders.",
    )
    return parser


def _float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _references(text: str) -> str | int:
    try:
        return parse_references(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--subjects`` is flattened from space- and comma-separated names."""
    args = build_parser().parse_args(argv)
    if args.subjects:
        args.subjects = [name for item in args.subjects for name in item.split(",") if name]
    if args.method_name is None:
        args.method_name = "IP-Adapter" if args.ip_adapter else "CustomContrast"
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Check every input that can be checked without loading a model, so that a typo fails in a second.

    Raises:
        FileNotFoundError: A data set, file or local-looking model path that does not exist.
        ValueError: Unknown subjects, a reference index a subject does not have, an unreadable compared run.
    """
    subjects = load_dreambench(args.dreambench_root, args.subjects)
    for subject in subjects:
        try:
            subject.reference_image_paths(args.references, args.reference_index)
        except IndexError as error:
            raise ValueError(f"--reference_index {args.reference_index}: {error}") from error
    models = {
        "--pretrained_model": args.pretrained_model,
        "--adapter": args.adapter,
        "--ip_adapter": args.ip_adapter[0] if args.ip_adapter else None,
        "--clip_model": args.clip_model,
        "--dino_model": args.dino_model,
        "--imagereward_model": args.imagereward_model,
    }
    if args.imagereward_model:
        models["--imagereward_tokenizer"] = args.imagereward_tokenizer
    for option, value in models.items():
        if value:
            check_model_source(value, option)
    if args.imagereward_med_config and not Path(args.imagereward_med_config).is_file():
        raise FileNotFoundError(f"--imagereward_med_config: {args.imagereward_med_config!r} is not a file.")
    for path in args.compare_results:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--compare_results: {path!r} is not a file.")
        try:
            load_results_json(path)
        except ValueError as error:
            raise ValueError(f"--compare_results: {path!r} is not a results.json ({error}).") from error
    if Path(args.output_dir).is_file():
        raise FileNotFoundError(f"--output_dir: {args.output_dir!r} is a file, expected a folder.")


def paper_table_for(pipe: Any) -> str:
    """The paper's table a pipeline's row belongs under: ``sdxl`` with two text encoders, else ``sd15``."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Pipeline dtype from its name; ``auto`` is float16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def build_pipeline(
    pretrained_model: str | os.PathLike,
    pipeline_class: str = "auto",
    adapter: str | os.PathLike | None = None,
    ip_adapter: Sequence[str] | None = None,
    ip_adapter_image_encoder_folder: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """Load a diffusers pipeline and its subject adapter, on ``device`` in ``dtype``.

    Args:
        pretrained_model: Hub id or folder of the base pipeline.
        pipeline_class: ``auto`` (``DiffusionPipeline``), ``sd15`` or ``sdxl``.
        adapter: A CustomContrast adapter for ``pipe.load_customcontrast``.
        ip_adapter: ``(repo, subfolder, weight_name)`` of a plain IP-Adapter for ``pipe.load_ip_adapter``.
        ip_adapter_image_encoder_folder: ``image_encoder_folder`` for ``load_ip_adapter`` when not the default.
        device: Device of the pipeline.
        dtype: Dtype of the pipeline.
        local_files_only: Never contact the hub.
        cache_dir: Hub cache folder.
    """
    import diffusers

    hub_kwargs = {"local_files_only": local_files_only, "cache_dir": cache_dir}
    pipe = getattr(diffusers, PIPELINE_CLASSES[pipeline_class]).from_pretrained(pretrained_model, **hub_kwargs)
    if adapter is not None:
        if not hasattr(pipe, "load_customcontrast"):
            raise RuntimeError("pipe.load_customcontrast is missing: `import diffusers_customcontrast` must have run.")
        pipe.load_customcontrast(adapter)
    if ip_adapter is not None:
        repo, subfolder, weight_name = ip_adapter
        extra = {"image_encoder_folder": ip_adapter_image_encoder_folder} if ip_adapter_image_encoder_folder else {}
        pipe.load_ip_adapter(repo, subfolder=subfolder, weight_name=weight_name, **hub_kwargs, **extra)
    # Cast after loading, so the adapter's modules (image encoder, projections) get the same dtype.
    pipe.to(device=device, dtype=dtype)
    # Our own tqdm bar counts images; the per-call sampling bars would drown it.
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_evaluation(
    pipe: Any,
    scorer: DreamBenchScorer | None,
    dreambench_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    method_name: str = "CustomContrast",
    subjects: Sequence[str] | None = None,
    scales: Sequence[float] | None = None,
    accelerator: ProcessSplitter | None = None,
    compare_results: Sequence[str | os.PathLike] = (),
    config: dict[str, Any] | None = None,
    paper_table: str | None = "sd15",
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a pipeline on DreamBench and write the report.

    Args:
        pipe: The pipeline (anything :func:`~.generate.generate_dreambench` accepts).
        scorer: The metric models; only needed on the main process.
        dreambench_root: The google/dreambooth checkout or its ``dataset`` folder.
        output_dir: Folder for images, manifests, scores and report.
        method_name: Name of the method in the tables and plot.
        subjects: Subject names; ``None`` for all.
        scales: Adapter scales for a sweep into ``output_dir/scale_<s>/``; ``None`` for one run at the pipe's scale.
        accelerator: Optional process splitter.
        compare_results: ``results.json`` files of other runs added to the tables and plot.
        config: Settings recorded in ``results.json``.
        paper_table: The paper's table (``sd15`` or ``sdxl``) ``results.md`` prints the run under; ``None`` for none.
        **generate_kwargs: Passed to :func:`~.generate.generate_dreambench` (``references``, ``images_per_prompt``...).

    Returns:
        On the main process ``{"method", "config", "metric_models", "paper_table", "summary", "sweep", "files"}``;
        ``{}`` on the others.
    """
    state = accelerator if accelerator is not None else SingleProcess()
    loaded = load_dreambench(dreambench_root, subjects)
    summary, sweep = None, []
    if scales:
        sweep = scale_sweep(pipe, loaded, scales, output_dir, scorer, accelerator=state, **generate_kwargs)
    else:
        summary = evaluate_pipeline(pipe, loaded, output_dir, scorer, accelerator=state, **generate_kwargs)
    if not state.is_main_process:
        return {}
    results: dict[str, Any] = {
        "method": method_name,
        "config": config or {},
        "metric_models": scorer.model_names,
        "paper_table": paper_table,
        "summary": summary,
        "sweep": sweep,
    }
    compare = [load_results_json(path) for path in compare_results]
    results["files"] = write_report(output_dir, results, compare)
    return results


def main(argv: Sequence[str] | None = None, *, pipe: Any = None, scorer: DreamBenchScorer | None = None) -> dict:
    """Run the evaluation command.

    Every input that can be checked without a model (data set, subjects, files, local model paths) is checked
    before the pipeline and the metric models are loaded.

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.
        pipe: A ready pipeline to use instead of loading ``--pretrained_model`` (for tests and scripts).
        scorer: Ready metric models to use instead of loading ``--clip_model`` / ``--dino_model`` /
            ``--imagereward_model``.

    Returns:
        The results object of :func:`run_evaluation`.
    """
    parser = build_parser()
    args = parse_args(argv)
    if pipe is None and not args.pretrained_model:
        parser.error("--pretrained_model is required")
    try:
        check_inputs(args)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    from accelerate import PartialState

    # PartialState only splits CPU processes (torchrun / `accelerate launch --cpu`) when told it runs on CPU.
    state = PartialState(cpu=args.device == "cpu" or _env_flag("ACCELERATE_USE_CPU"))
    logging.basicConfig(
        level=logging.INFO if state.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    device = torch.device(args.device) if args.device else state.device
    if pipe is None:
        pipe = build_pipeline(
            args.pretrained_model,
            pipeline_class=args.pipeline_class,
            adapter=args.adapter,
            ip_adapter=args.ip_adapter,
            ip_adapter_image_encoder_folder=args.ip_adapter_image_encoder_folder,
            device=device,
            dtype=resolve_dtype(args.dtype, device),
            local_files_only=args.local_files_only,
            cache_dir=args.cache_dir,
        )
    if scorer is None and state.is_main_process:
        # Metrics stay in float32: the models are small, and scores should not depend on the pipeline's dtype.
        scorer = DreamBenchScorer(
            args.clip_model,
            args.dino_model,
            image_reward=_image_reward(args, device),
            device=device,
            batch_size=args.metric_batch_size,
            local_files_only=args.local_files_only,
            cache_dir=args.cache_dir,
        )
    paper_table = {"auto": paper_table_for(pipe), "none": None}.get(args.paper_table, args.paper_table)
    return run_evaluation(
        pipe,
        scorer,
        dreambench_root=args.dreambench_root,
        output_dir=Path(args.output_dir),
        method_name=args.method_name,
        subjects=args.subjects,
        scales=args.scales,
        accelerator=state,
        compare_results=args.compare_results,
        config=dict(vars(args)),
        paper_table=paper_table,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        use_identifier=args.use_identifier,
        unique_token=args.unique_token,
        reference_index=args.reference_index,
        references=args.references,
    )


def _image_reward(args: argparse.Namespace, device: torch.device) -> ImageRewardScorer | None:
    if not args.imagereward_model:
        return None
    return ImageRewardScorer.from_pretrained(
        args.imagereward_model,
        med_config=args.imagereward_med_config,
        tokenizer=args.imagereward_tokenizer,
        device=device,
        local_files_only=args.local_files_only,
        cache_dir=args.cache_dir,
    )
