"""The package's version, in a module of its own.

The modules that record it in the files they write (the FID batch's manifest, ``metrics.json``,
a dataset's manifest) read it here instead of from the package's face (``selfflow/__init__``),
which is the users' entry point to the network, the checkpoints and the pipeline.
"""

__version__ = "0.1.0"
