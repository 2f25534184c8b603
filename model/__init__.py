"""The patched training model: ``patch`` / ``unpatch`` / ``load`` (fused kernels in transformers' Qwen2/2.5/3),
FSDP2 wrapping, the reasoning chat formats and the model shapes (``s1fast.model.shapes``); the same layers as
transformers Hub kernels (``s1fast.model.hub_kernels``).

``Decoder`` and ``BudgetForcing`` moved to ``s1fast.decode``; ``from s1fast.model import Decoder`` still works for
one release, with a DeprecationWarning (imported lazily: the model room does not import the decode room).
"""

import warnings

from s1fast.model.patch import load, patch, patched, unpatch

__all__ = ["load", "patch", "patched", "unpatch"]

_MOVED = {"Decoder": "s1fast.decode", "BudgetForcing": "s1fast.decode"}  # deprecated names, removed next release


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"s1fast.model.{name} moved to {_MOVED[name]}.{name}; import it from there (the old name goes "
                  "away in the next release)", DeprecationWarning, stacklevel=2)
    from s1fast import decode

    return getattr(decode, name)
