"""The run, split by job: ``build`` (config to objects), ``trainer`` (each phase's Trainer),
``loggers``, ``results`` (results.json, model.pt, tables) and ``runner`` (one run, with
its folder and resume). ``moe_mlora.run`` is only the command-line entry point around them.
"""

from moe_mlora.pipeline.runner import train_and_evaluate

__all__ = ["train_and_evaluate"]
