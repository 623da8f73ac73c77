"""One training run: plan and execute (recipe), the load sequence (build), 4-bit base and adapters
(modeling), the Trainer and its callbacks (loop), losses, launch, metrics and telemetry.
Imports store/, spectrum/, data/ and the top level."""
