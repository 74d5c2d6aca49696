"""Benchmarks that print the figures the README and experiments/ report.

``python -m moe_mlora.bench [NAME] [options]``; NAME defaults to ``core``.
Each benchmark is a module here with a ``main(argv)``.
"""
