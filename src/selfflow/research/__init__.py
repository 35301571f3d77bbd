"""The research loop around the trainer: choosing sampling settings and EMA after training
(``selfflow sweep``) and looking inside the network (``selfflow probe``).

It stands beside ``train/`` and ``batch/`` and calls their public functions; it never
re-implements sampling, evaluation or the training objective.
"""
