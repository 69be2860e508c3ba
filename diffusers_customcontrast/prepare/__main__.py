"""``python -m diffusers_customcontrast.prepare``: see :mod:`diffusers_customcontrast.prepare.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
