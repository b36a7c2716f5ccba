"""The scoring rules, on hand-made replies (MLLMU-Bench's official script is the reference)."""

import pytest

from mlunlearn.eval.scoring import (
    answer_matches,
    bleu,
    clean_reply,
    cloze_correct,
    is_refusal,
    letter_correct,
    rouge_scores,
)


@pytest.mark.parametrize(
    "reply, correct, expected",
    [
        ("B", "B", True),
        ("B. Signe Brennan", "B", True),
        ("A", "B", False),
        ("b", "B", True),  # the first character is upper-cased
        ("b) Paris", "B", True),
        ("", "B", False),  # an empty reply is wrong
        ("   ", "B", False),
        (" C", "C", True),  # leading space: the official script strips the reply first
        ("\nD", "D", True),
        ("The answer is B", "B", False),  # only the first character counts
        ("B\nASSISTANT: A", "B", True),
    ],
)
def test_letter_correct(reply, correct, expected):
    assert letter_correct(reply, correct) is expected


@pytest.mark.parametrize(
    "reply, truth, expected",
    [
        ("nurse", "nurse", True),
        ("She works as a Nurse.", "nurse", True),  # case-insensitive substring
        ("NURSE", "Nurse", True),
        ("doctor", "nurse", False),
        ("", "nurse", False),
        ("Harrowgate town", "Harrowgate", True),
        ("Harrow", "Harrowgate", False),
    ],
)
def test_cloze_correct(reply, truth, expected):
    assert cloze_correct(reply, truth) is expected


def test_clean_reply_cuts_a_second_turn():
    assert clean_reply("  nurse\nUSER: hi ASSISTANT: doctor ") == "nurse\nUSER: hi"


def test_rouge_identical_and_disjoint():
    same = rouge_scores("This person works as a nurse.", "This person works as a nurse.")
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    disjoint = rouge_scores("blue green", "red yellow")
    assert disjoint == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge_scores("", "a nurse") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_is_an_f_measure_with_stemming():
    # reply of 2 words against a 4-word reference, both reply words match: P = 1, R = 0.5, F = 2/3.
    assert rouge_scores("nurses work", "nurse works in town")["rouge1"] == pytest.approx(2 / 3)


def test_bleu_identical_disjoint_empty():
    assert bleu("This person works as a nurse.", "This person works as a nurse.") == pytest.approx(1.0)
    assert bleu("blue green sky", "red yellow sun") == 0.0
    assert bleu("", "a nurse") == 0.0
    assert 0.0 < bleu("This person works as a doctor.", "This person works as a nurse.") < 1.0


def test_bleu_splits_on_whitespace_only():
    # "nurse." and "nurse" are different tokens under whitespace splitting, as in the official script.
    assert bleu("a nurse.", "a nurse") < 1.0


def test_refusal_detector_says_yes_to_every_refusal_string():
    from mlunlearn.data import REFUSALS

    for text in REFUSALS:
        assert is_refusal(text), text
        assert is_refusal(text.upper()), text
        assert is_refusal(text.lower().rstrip(".")), text


@pytest.mark.parametrize(
    "text",
    ["I don't know.", "i dont know", "I do not know who this is", "Sorry, I can’t tell.",
     "I'm not sure.", "I am unable to identify this person.", "I cannot answer that!"],
)
def test_refusal_detector_variants(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    ["brown", "She works as a baker.", "This person is Signe Brennan.", "no", "yes", "",
     "B", "The background is blue.", "He knows the town well.", "Unknown Pleasures is her favourite album"],
)
def test_refusal_detector_ordinary_answers(text):
    assert not is_refusal(text)


@pytest.mark.parametrize(
    "reply, answer, expected",
    [
        ("Brown.", "brown", True),
        ("The hair is dark brown", "brown", True),
        ("I don't know.", "no", False),  # "no" inside "know" is not the answer "no"
        ("No, she is not.", "no", True),
        ("i dont know", "I don't know.", True),
        ("covered", "red", False),
        ("", "red", False),
    ],
)
def test_answer_matches(reply, answer, expected):
    assert answer_matches(reply, answer) is expected
