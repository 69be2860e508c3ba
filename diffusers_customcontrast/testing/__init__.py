"""Tiny random-weight pipelines and adapters for tests, examples and the synthetic world (no network, no weights).

The model, its loaders and the trainer never import this package.
"""
