"""A local Replicate: the HTTP API subset the service uses, signed webhooks and fault switches.

`scripts/replicate_sim.py` is the entry point (CLI and `start_simulator`); the modules here
are its parts: wire formats, the model catalog, the prediction engine, webhook deliveries,
faults, generated PNG outputs and the HTTP surface.
"""
