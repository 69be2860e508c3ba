"""Training of CustomContrast adapters (multilevel contrastive learning, docs/method.md).

```python
from diffusers_customcontrast.training import TrainingConfig, train

result = train(TrainingConfig.from_yaml("run.yaml", max_train_steps=100))
print(result.output_dir, result.final_losses)
```

Modules, one concept each: :mod:`.config` (the settings), :mod:`.components` (the frozen base model and the
trainable modules), :mod:`.dataset` (subjects and batches), :mod:`.batch` (frozen encoders, dropout, per-step
randomness), :mod:`.objective` (the loss composition, one training step), :mod:`.trainer` (the accelerate loop),
:mod:`.checkpoints` (atomic saves, resuming), :mod:`.faults` (SIGTERM, non-finite losses), :mod:`.validation`,
:mod:`.export` (adapter folder, model card, Hub) and :mod:`.cli`.
"""

from .batch import BatchEncoder, ConditioningDropout, ObjectiveInputs, step_generator
from .components import BaseModel, add_unet_lora, build_adapter, load_base_model
from .config import ConfigError, TrainingConfig, parse_args
from .faults import NonFiniteLossError
from .objective import CustomContrastObjective, LogitScale, ObjectiveOutput, ObjectiveSettings
from .trainer import TrainingResult, train

__all__ = [
    "BaseModel",
    "BatchEncoder",
    "ConditioningDropout",
    "ConfigError",
    "CustomContrastObjective",
    "LogitScale",
    "NonFiniteLossError",
    "ObjectiveInputs",
    "ObjectiveOutput",
    "ObjectiveSettings",
    "TrainingConfig",
    "TrainingResult",
    "add_unet_lora",
    "build_adapter",
    "load_base_model",
    "parse_args",
    "step_generator",
    "train",
]
