"""``python -m diffusers_customcontrast.evaluate``: DreamBench evaluation (see docs/evaluation.md)."""

from .evaluation.cli import main

if __name__ == "__main__":
    main()
