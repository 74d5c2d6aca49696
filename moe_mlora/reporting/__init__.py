"""Reporting many runs: tables (:mod:`.report`, ``python -m moe_mlora.report``) and plots
(:mod:`.plots`)."""
