"""ROME's token roles and the subject of a clean/corrupt fact pair."""

from __future__ import annotations

import pytest

from patchserve.text.roles import ROLES, differing_words, token_roles


def test_roles_follow_rome_read_knowledge():
    # BOS The capital of [Den kel mam] , the seat is   (subject 4..6 of 11 tokens)
    roles = token_roles([4, 5, 6], 11)
    assert list(roles) == list(ROLES)
    assert roles == {
        "first subject token": [4],
        "middle subject tokens": [5],
        "last subject token": [6],
        "first subsequent token": [7],
        "further tokens": [8, 9],
        "last token": [10],
    }


def test_one_token_subject_right_before_the_last_token():
    roles = token_roles([3], 5)
    assert roles["first subject token"] == roles["last subject token"] == [3]
    assert roles["middle subject tokens"] == [] and roles["further tokens"] == []
    assert roles["first subsequent token"] == roles["last token"] == [4]
    assert token_roles([4], 5)["first subsequent token"] == []  # subject is the last token


def test_bad_subjects_are_refused():
    with pytest.raises(ValueError, match="no token"):
        token_roles([], 5)
    with pytest.raises(ValueError, match="outside"):
        token_roles([5], 5)


@pytest.mark.parametrize(
    ("clean", "corrupt", "subject"),
    [
        ("The capital of Rorsun is", "The capital of Sunror is", "Rorsun"),
        ("By profession, Sisnus is a", "By profession, Rornus is a", "Sisnus"),  # shared "nus"
        ("Foskel's capital city is", "Sisves's capital city is", "Foskel"),
        ("Every suskindos is painted", "Every lusmamzis is painted", "suskindos"),
    ],
)
def test_the_subject_is_the_differing_words(clean, corrupt, subject):
    assert differing_words(clean, corrupt) == subject


def test_identical_prompts_have_no_subject():
    with pytest.raises(ValueError, match="do not differ"):
        differing_words("same", "same")
