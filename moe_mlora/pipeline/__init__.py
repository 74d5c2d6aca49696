"""The run, split by job: ``build`` (config to objects), ``trainer`` (each phase's Trainer),
``loggers``, ``results`` (results.json, model.pt, tables), ``schema`` (results.json's typed
record) and ``runner`` (one run, with its folder and resume: ``train_and_evaluate``).
``moe_mlora.run`` is only the command-line entry point around them.
"""
