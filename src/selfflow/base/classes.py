"""Class names: ImageNet's 1000, shipped with the package (no download), and a trained model's own.

``resources/imagenet_classes.tsv`` holds ``index, wnid, name`` in sorted-wnid order, the order in
which ImageFolder, ADM and DiT number the classes, so class ``i`` here is label ``i`` of the
released model. Data preparation checks WordNet-id folders against this list; sampling accepts
a class by number or by name. A model trained on a user's folders records their names
(:mod:`selfflow.model.card`); :func:`classes_from_names` turns them into the same rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from selfflow.base.errors import ConfigurationError

NUM_IMAGENET_CLASSES = 1000
_SHOWN = 8  # candidates named in an error


@dataclass(frozen=True)
class ImageNetClass:
    """One class of a model's label space: its label, WordNet id ("" for a class that is not
    one of ImageNet's) and name. The released model's classes are ImageNet's 1000."""

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


def classes_from_names(names: Sequence[str] | None) -> tuple[ImageNetClass, ...]:
    """A model's classes from the class names it records (``None``: ImageNet's 1000).

    A dataset made from WordNet-id folders records the ids (``n01440764``); those read back as
    ImageNet's names, so captions and ``--class`` say "tench", not the folder name. Any other
    name (a user's folder, "boat") is its own name and has no WordNet id.
    """
    if names is None:
        return imagenet_classes()
    by_wnid = {c.wnid: c for c in imagenet_classes()}
    return tuple(
        ImageNetClass(i, name, by_wnid[name].name)
        if name in by_wnid
        else ImageNetClass(i, "", str(name))
        for i, name in enumerate(names)
    )


def _words(text: str) -> set[str]:
    return set(text.lower().replace("-", " ").replace(",", " ").split())


def find_classes(query: str, classes: Sequence[ImageNetClass] | None = None) -> list[ImageNetClass]:
    """Classes whose number, WordNet id or name matches ``query`` (default: ImageNet's).

    Names match case-insensitively: an exact name, number or wnid is returned alone; else every
    name containing ``query``; else every name whose words are all words of ``query`` (so
    "tabby cat" finds "tabby", the class's name in the table).
    """
    query = query.strip()
    classes = imagenet_classes() if classes is None else tuple(classes)
    if query.isdigit():
        index = int(query)
        return [classes[index]] if index < len(classes) else []
    lowered = query.lower()
    exact = [c for c in classes if lowered in (c.wnid.lower(), c.name.lower()) and lowered]
    if exact:
        return exact
    found = [c for c in classes if lowered in c.name.lower()]
    if found or not lowered:
        return found
    words = _words(lowered)
    return [c for c in classes if _words(c.name) and _words(c.name) <= words]


def class_index(query: str | int, classes: Sequence[ImageNetClass] | None = None) -> int:
    """One label from a number, a WordNet id or a name among ``classes`` (default: ImageNet's);
    an ambiguous or unknown name is refused with the candidates listed."""
    classes = imagenet_classes() if classes is None else tuple(classes)
    imagenet = classes == imagenet_classes()
    what, whats = (
        ("ImageNet class", "ImageNet classes")
        if imagenet
        else ("class of this model", "classes of this model")
    )
    if isinstance(query, int):
        if not 0 <= query < len(classes):
            raise ConfigurationError(
                f"class {query} is out of range: expected 0..{len(classes) - 1}"
            )
        return query
    matches = find_classes(str(query), classes)
    if len(matches) == 1:
        return matches[0].index
    if not matches:
        if imagenet:
            hint = (
                "give a number 0..999, a WordNet id (n01440764) or part of a name "
                "(`selfflow classes QUERY` lists them)"
            )
        else:
            shown = ", ".join(f"{c.index} {c.name}" for c in classes[:_SHOWN])
            more = f" and {len(classes) - _SHOWN} more" if len(classes) > _SHOWN else ""
            hint = (
                f"its {len(classes)} classes are {shown}{more} "
                f"(`selfflow classes --ckpt CKPT` lists them)"
            )
        raise ConfigurationError(f"no {what} matches {query!r}: {hint}")
    shown = ", ".join(f"{c.index} {c.name}" for c in matches[:_SHOWN])
    more = f" and {len(matches) - _SHOWN} more" if len(matches) > _SHOWN else ""
    raise ConfigurationError(
        f"{query!r} matches {len(matches)} {whats} ({shown}{more}); be more specific "
        f"or give the number"
    )
