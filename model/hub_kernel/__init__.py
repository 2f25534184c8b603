"""A local Hub-kernel repository (the ``kernels`` package's layout: ``metadata.json`` beside this file) exposing
s1fast's layers; ``s1fast.model.hub_kernels`` points transformers and ``kernels`` here."""

from s1fast.model.hub_kernels import layers  # noqa: F401
