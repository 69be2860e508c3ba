"""``python -m diffusers_customcontrast.convert``: warm-start an adapter from an IP-Adapter checkpoint (see
:mod:`diffusers_customcontrast.loaders.convert`)."""

from .loaders.convert import main

if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    main()
