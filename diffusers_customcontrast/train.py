"""``python -m diffusers_customcontrast.train --config run.yaml``: train a CustomContrast adapter (docs/training.md)."""

from .training.cli import main

if __name__ == "__main__":
    main()
