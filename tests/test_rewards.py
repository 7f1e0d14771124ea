"""Rule rewards: \\boxed{} and final-number extraction, numeric comparison, format."""
import pytest

from grpo_fast.rewards import (accuracy_reward, answers_match, boxed_format_reward, extract_answer, extract_boxed,
                               extract_final_number, format_reward, make_format_reward, parse_number)


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
    (r"\boxed{{a}+{b}}", "{a}+{b}"),
    (r"\boxed{unbalanced", None),
    ("no box", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("I think 3 apples and then 1,234 pears", "1,234"),
    ("it is -3.5 degrees", "-3.5"),
    ("half is 1/2", "1/2"),
    ("nothing", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_extract_answer_prefers_box_then_tag_then_number():
    assert extract_answer(r"7 ... \boxed{8} ... 9") == "8"
    assert extract_answer("<think>2+2 is 4, not 5</think><answer> 4 </answer> 6") == "4"
    assert extract_answer("first 3 then 12") == "12"
    assert extract_answer([{"role": "assistant", "content": r"\boxed{5}"}]) == "5"


@pytest.mark.parametrize("s, value", [
    ("42", 42.0), ("1,000", 1000.0), ("-3.50", -3.5), ("3/4", 0.75), (r"\frac{3}{4}", 0.75),
    (r"\$5", 5.0), ("50\\%", 50.0), ("x+1", None), ("", None), (None, None), (7, 7.0),
])
def test_parse_number(s, value):
    assert parse_number(s) == value


def test_answers_match_numerically():
    assert answers_match("0.5", "1/2")
    assert answers_match("1,000", "1000.0")
    assert answers_match("12", r"\boxed{12}")
    assert not answers_match("13", "12")
    assert answers_match("x = 12", "12")          # expression: its final number
    assert answers_match(r"\pi r^2", r"\pi r ^2")  # non-numeric: whitespace-insensitive
    assert not answers_match(None, "1")


def test_accuracy_reward():
    completions = [r"\boxed{19}", "the sum is 19", "19.0", "18", "", r"\boxed{20} no wait 19"]
    assert accuracy_reward(["p"] * 6, completions, None, answer=["19"] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # TRL's column name, chat-form completions, and missing references -> None
    chat = [[{"role": "assistant", "content": "it is 4"}], [{"role": "assistant", "content": "5"}]]
    assert accuracy_reward(["p", "q"], chat, None, solution=["4", None]) == [1.0, None]
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(["p"], ["1"], None)


def test_format_rewards():
    good = "<think>add the units</think>\n<answer>19</answer>"
    bad = ["<answer>19</answer>", "<think>x</think> 19", "19"]
    assert format_reward(["p"] * 4, [good] + bad, None) == [1.0, 0.0, 0.0, 0.0]
    assert boxed_format_reward(["p", "p"], [r"so \boxed{3}", "3"], None) == [1.0, 0.0]
    digits = make_format_reward(r"^\d+$", "digits_only")
    assert digits.__name__ == "digits_only"
    assert digits(["p", "p"], ["123", "12a"], None) == [1.0, 0.0]
