"""Tooling the trainer and its tests import: the demo, tiny models, the hub layout, plots, export and
the trained Solver's infer/eval."""
