"""DreamBench evaluation of subject adapters: data set reader, generation, metrics (CLIP-T, ImageReward, CLIP-I,
DINO), the paper's table and the scale sweep."""

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
    parse_references,
)
from .generate import generate_dreambench, image_seed, set_adapter_scale, subject_condition, uses_customcontrast
from .imagereward import ImageReward, ImageRewardScorer, convert_image_reward_checkpoint, image_reward_preprocess
from .manifest import read_manifest, write_manifest
from .metrics import DreamBenchScorer, dino_preprocess, score_generations, summarize
from .paper import PAPER_TABLES, READINGS, paper_row
from .report import markdown_table, paper_layout_table, plot_scale_sweep, write_report
from .sweep import evaluate_pipeline, scale_sweep

__all__ = [
    "EDIT",
    "LIVE_CLASSES",
    "PAPER_TABLES",
    "PROMPT_KIND_RULES",
    "READINGS",
    "RECONTEXTUALIZATION",
    "DreamBenchPrompt",
    "DreamBenchScorer",
    "DreamBenchSubject",
    "ImageReward",
    "ImageRewardScorer",
    "classify_prompt",
    "convert_image_reward_checkpoint",
    "dino_preprocess",
    "dreambench_prompts",
    "evaluate_pipeline",
    "generate_dreambench",
    "image_reward_preprocess",
    "image_seed",
    "load_dreambench",
    "markdown_table",
    "paper_layout_table",
    "paper_row",
    "parse_prompts_and_classes",
    "parse_references",
    "plot_scale_sweep",
    "read_manifest",
    "run_evaluation",
    "scale_sweep",
    "score_generations",
    "set_adapter_scale",
    "subject_condition",
    "summarize",
    "uses_customcontrast",
    "write_manifest",
    "write_report",
]
