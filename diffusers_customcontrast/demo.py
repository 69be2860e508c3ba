"""``python -m diffusers_customcontrast.demo``: the offline demo on the synthetic world (see
:mod:`diffusers_customcontrast.world.demo`)."""

from .world.demo import main

if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
