"""The MoE-Tuning pipeline as DVC and Prefect run it: its parameter files (``params/``)."""
