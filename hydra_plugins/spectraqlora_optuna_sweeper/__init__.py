"""spectraqlora's Optuna sweeper for Hydra: `hydra/sweeper=spectraqlora_optuna`."""
