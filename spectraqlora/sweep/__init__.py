"""Optuna: the study a run reports to (study) and the Hydra sweeper's implementation (schema,
space, sweeper, lifecycle, workers, results, repeats, confirm); hydra_plugins/ holds only the
shim Hydra discovers. Imports run/, analysis/, store/ and the top level."""
