"""ImageNet's 1000 class names, shipped with the package (no download).

``resources/imagenet_classes.tsv`` holds ``index, wnid, name`` in sorted-wnid order, the order in
which ImageFolder, ADM and DiT number the classes, so class ``i`` here is label ``i`` of the
released model. Data preparation checks WordNet-id folders against this list; sampling accepts
a class by number or by name.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from selfflow.errors import ConfigurationError

NUM_IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str
    name: str


@functools.cache
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 classes in label order, read once from the packaged table."""
    text = resources.files("selfflow").joinpath("resources/imagenet_classes.tsv").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    classes = tuple(ImageNetClass(int(i), wnid, name) for i, wnid, name in rows)
    if [c.index for c in classes] != list(range(NUM_IMAGENET_CLASSES)):
        raise RuntimeError("the packaged imagenet_classes.tsv is damaged: indices are not 0..999")
    return classes


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 WordNet ids (``n01440764`` …) in label order."""
    return tuple(c.wnid for c in imagenet_classes())


def find_classes(query: str) -> list[ImageNetClass]:
    """Classes whose number, WordNet id or name matches ``query`` (names: case-insensitive
    substring; an exact name, number or wnid is returned alone)."""
    query = query.strip()
    classes = imagenet_classes()
    if query.isdigit():
        index = int(query)
        return [classes[index]] if index < NUM_IMAGENET_CLASSES else []
    lowered = query.lower()
    exact = [c for c in classes if lowered in (c.wnid.lower(), c.name.lower())]
    if exact:
        return exact
    return [c for c in classes if lowered in c.name.lower()]


def class_index(query: str | int) -> int:
    """One label from a number, a WordNet id or a name; an ambiguous or unknown name is refused
    with the candidates listed."""
    if isinstance(query, int):
        if not 0 <= query < NUM_IMAGENET_CLASSES:
            raise ConfigurationError(f"class {query} is out of range: expected 0..999")
        return query
    matches = find_classes(str(query))
    if len(matches) == 1:
        return matches[0].index
    if not matches:
        raise ConfigurationError(
            f"no ImageNet class matches {query!r}: give a number 0..999, a WordNet id "
            f"(n01440764) or part of a name (`selfflow classes QUERY` lists them)"
        )
    shown = ", ".join(f"{c.index} {c.name}" for c in matches[:8])
    more = f" and {len(matches) - 8} more" if len(matches) > 8 else ""
    raise ConfigurationError(
        f"{query!r} matches {len(matches)} ImageNet classes ({shown}{more}); be more specific "
        f"or give the number"
    )
