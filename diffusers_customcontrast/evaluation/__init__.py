"""DreamBench evaluation of subject adapters: data set reader, generation, CLIP/DINO metrics, report and sweep."""

from .cli import run_evaluation
from .dreambench import (
    EDIT,
    LIVE_CLASSES,
    PROMPT_KIND_RULES,
    RECONTEXTUALIZATION,
    DreamBenchPrompt,
    DreamBenchSubject,
    classify_prompt,
    dreambench_prompts,
    load_dreambench,
    parse_prompts_and_classes,
)
from .generate import generate_dreambench, image_seed, set_adapter_scale, uses_customcontrast
from .manifest import read_manifest, write_manifest
from .metrics import DreamBenchScorer, dino_preprocess, score_generations, summarize
from .report import markdown_table, plot_scale_sweep, write_report
from .sweep import evaluate_pipeline, scale_sweep

__all__ = [
    "EDIT",
    "LIVE_CLASSES",
    "PROMPT_KIND_RULES",
    "RECONTEXTUALIZATION",
    "DreamBenchPrompt",
    "DreamBenchScorer",
    "DreamBenchSubject",
    "classify_prompt",
    "dino_preprocess",
    "dreambench_prompts",
    "evaluate_pipeline",
    "generate_dreambench",
    "image_seed",
    "load_dreambench",
    "markdown_table",
    "parse_prompts_and_classes",
    "plot_scale_sweep",
    "read_manifest",
    "run_evaluation",
    "scale_sweep",
    "score_generations",
    "set_adapter_scale",
    "summarize",
    "write_manifest",
    "uses_customcontrast",
    "write_report",
]
