"""The packaged ImageNet class table: label order and lookups by number, wnid or name."""

from __future__ import annotations

import pytest

from selfflow.base.classes import class_index, find_classes, imagenet_classes, imagenet_wnids
from selfflow.base.errors import ConfigurationError


def test_labels_follow_sorted_wordnet_ids_as_imagefolder_numbers_them():
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000
    assert list(wnids) == sorted(wnids)  # ImageFolder / ADM / DiT: index = rank in sorted order
    assert all(w.startswith("n") and len(w) == 9 for w in wnids)
    # Two well-known ImageNet labels.
    assert (imagenet_classes()[0].wnid, imagenet_classes()[0].name) == ("n01440764", "tench")
    assert imagenet_classes()[207].name == "golden retriever"


def test_class_index_accepts_number_wnid_and_unique_name():
    assert class_index(207) == class_index("207") == class_index("golden retriever") == 207
    assert class_index("N02099601") == 207
    assert class_index("Golden Retr") == 207  # unique substring, any case


@pytest.mark.parametrize(
    ("query", "pattern"),
    [("1000", "no ImageNet class"), ("zzz-no-such", "no ImageNet class"), ("shark", "matches")],
)
def test_unknown_or_ambiguous_class_is_refused_with_candidates(query, pattern):
    with pytest.raises(ConfigurationError, match=pattern):
        class_index(query)
    if pattern == "matches":
        assert len(find_classes(query)) > 1
