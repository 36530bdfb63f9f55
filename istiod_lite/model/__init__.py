"""istiod_lite's model: Kubernetes objects -> ztunnel resources, pure and incremental.

`Translator.apply(event)` takes one `ObjectEvent` and returns a `ResourceDelta` (type URL ->
upserts and removals) holding only the resources whose content changed. No I/O, no trio:
the xDS server and the CA call it and read from it.
"""

from istiod_lite.model.errors import TranslationError, TranslationWarning
from istiod_lite.model.translator import ResourceDelta, Translator, TypeDelta
from istiod_lite.model.workloads import Pod

__all__ = [
    "Pod",
    "ResourceDelta",
    "TranslationError",
    "TranslationWarning",
    "Translator",
    "TypeDelta",
]
