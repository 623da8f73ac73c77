"""spectraqlora's Optuna sweeper for Hydra: `hydra/sweeper=spectraqlora_optuna`. Only the shim Hydra
discovers lives here; the implementation is spectraqlora/sweep/."""
from spectraqlora.sweep import schema  # noqa: F401  registers hydra/sweeper=spectraqlora_optuna and its groups
