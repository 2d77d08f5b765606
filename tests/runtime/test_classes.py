"""Class requests resolved against a classifier's class names: names, synonyms, ids, 'top-K'.

Torch-free: the packaged ImageNet-1k names and hand-made lists are the whole input.
"""

from __future__ import annotations

import numpy as np
import pytest

from legrad_runtime.classes import ClassIndex, imagenet1k_classes, parse_top_k, short_name
from legrad_runtime.errors import PromptError

IMAGENET = ClassIndex(imagenet1k_classes())


def test_the_packaged_imagenet_names_are_in_index_order():
    names = imagenet1k_classes()
    assert len(names) == 1000 and len(set(names)) == 999  # 'crane' is listed twice: the bird, the machine
    assert (
        names[0] == "tench, Tinca tinca"
        and names[281] == "tabby, tabby cat"
        and names[999].startswith("toilet")
    )


@pytest.mark.parametrize(
    "name", ["tabby cat", "tabby", "Tabby Cat", "  tabby   cat ", "tabby, tabby cat", "TABBY,TABBY CAT"]
)
def test_a_name_matches_the_whole_class_name_or_any_synonym_in_any_case(name):
    assert IMAGENET.resolve(name) == [281]
    assert IMAGENET.resolve([name]) == [281]


def test_names_and_ids_mix_in_order_and_repeats_are_kept():
    ids = IMAGENET.resolve(["golden retriever", 281, np.int64(0), "Egyptian cat", 281])
    assert ids == [207, 281, 0, 285, 281]
    assert IMAGENET.resolve(np.array([3, 1])) == [3, 1]
    assert IMAGENET.resolve(7) == [7]


def test_every_class_resolves_from_its_own_name_unless_another_class_shares_it():
    names = imagenet1k_classes()
    ambiguous = set()
    for i, name in enumerate(names):
        others = [other for j, other in enumerate(names) if j != i]
        if any(_shares(name, other) for other in others):
            ambiguous.add(i)
            with pytest.raises(PromptError, match="ambiguous"):
                IMAGENET.resolve(name)
        else:
            assert IMAGENET.resolve(name) == [i] and IMAGENET.resolve(name.upper()) == [i]
        first = name.split(",")[0]
        if not any(_shares(first, other) for other in others):
            assert IMAGENET.resolve(first) == [i]
    # 'crane' twice; 'partridge', 'cardigan', 'harp', 'maillot', 'missile' also another class's synonym
    assert ambiguous == {86, 134, 474, 517, 594, 638, 657}


def _shares(name: str, other: str) -> bool:
    """Whether `name` is `other`'s whole name or one of its synonyms (an independent reading)."""
    lowered = name.strip().lower()
    return lowered == other.lower() or lowered in [s.strip().lower() for s in other.split(",")]


@pytest.mark.parametrize("name, ids", [("crane", (134, 517)), ("maillot", (638, 639)), ("Crane", (134, 517))])
def test_an_ambiguous_name_is_refused_with_the_ids_to_use(name, ids):
    with pytest.raises(PromptError, match="ambiguous") as info:
        IMAGENET.resolve([name])
    message = str(info.value)
    assert all(str(i) in message for i in ids) and "pass the class id instead" in message


def test_an_unknown_name_is_refused_with_close_matches():
    with pytest.raises(PromptError, match="unknown class 'tabbycat'") as info:
        IMAGENET.resolve(["tabbycat"])
    assert "'tabby cat' (281)" in str(info.value) and "[0, 1000)" in str(info.value)
    with pytest.raises(PromptError, match="golden retriever' \\(207\\)"):
        IMAGENET.resolve(["golden retreiver"])
    with pytest.raises(PromptError, match="legrad info --classes"):
        IMAGENET.resolve(["zzzqqqxxx"])


@pytest.mark.parametrize("bad", [1000, -1, 10**12, np.int64(1000)])
def test_an_id_out_of_range_is_refused(bad):
    with pytest.raises(
        PromptError, match=r"out of range: this model has 1,000 classes; pass an id in \[0, 1000\)"
    ):
        IMAGENET.resolve([bad])


@pytest.mark.parametrize(
    "bad, words",
    [
        ([], "class list is empty"),
        ("", "class name is empty"),
        (["  "], "class name is empty"),
        (["top-3"], "pass it alone, classes='top-3'"),
        (["281"], "pass the number 281 as an int"),
        (np.zeros((2, 2), np.int64), "1-D"),
    ],
)
def test_unusable_class_requests_are_refused_with_the_fix(bad, words):
    with pytest.raises(PromptError) as info:
        IMAGENET.resolve(bad)
    assert words in str(info.value)


@pytest.mark.parametrize("bad", [True, 2.0, None, [b"tabby"], {281}])
def test_a_class_of_the_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError):
        IMAGENET.resolve(bad if isinstance(bad, (list, set)) else [bad])


@pytest.mark.parametrize("text, k", [("top-5", 5), ("TOP-3", 3), (" top-1 ", 1), ("top-1000", 1000)])
def test_top_k_requests_are_read(text, k):
    assert parse_top_k(text, 1000) == k


@pytest.mark.parametrize("text", ["tabby", "top", "topaz", 5, None, ["top-3"]])
def test_anything_else_is_not_a_top_k_request(text):
    assert parse_top_k(text, 1000) is None


@pytest.mark.parametrize(
    "text, words",
    [
        ("top-0", "K must be 1 to 1,000"),
        ("top-1001", "K must be 1 to 1,000"),
        ("top-x", "K must be a whole number"),
        ("top--3", "K must be a whole number"),
        ("top-", "K must be a whole number"),
        ("top-٣", "K must be a whole number"),  # an Arabic-Indic digit: not ASCII
    ],
)
def test_bad_top_k_requests_are_refused_with_the_fix(text, words):
    with pytest.raises(PromptError) as info:
        parse_top_k(text, 1000)
    assert words in str(info.value) and "'top-5'" in str(info.value)


def test_a_hand_made_class_list_resolves_the_same_way():
    index = ClassIndex(["cat, house cat", "dog", "hot dog, dog", "Cat"])
    assert index.resolve(["house cat", "hot dog", 1]) == [0, 2, 1]
    with pytest.raises(PromptError, match=r"1 \('dog'\), 2 \('hot dog, dog'\)"):
        index.resolve("dog")
    with pytest.raises(PromptError, match="ambiguous"):
        index.resolve("CAT")  # a synonym of 0 and the whole name of 3


@pytest.mark.parametrize(
    "name, short",
    [("tabby, tabby cat", "tabby"), ("throne", "throne"), (" space , x", "space"), (", odd", ", odd")],
)
def test_the_short_name_is_the_first_synonym(name, short):
    assert short_name(name) == short
