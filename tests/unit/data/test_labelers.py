import random

import pytest

from pbkd_cli.data.labelers import Candidate, correctness, judge_pairs, parse_verdict, teacher_preferred
from pbkd_cli.generation.openai_api import ChatEndpoint
from pbkd_cli.io import PbkdError
from tests.chat_server import chat_server

T = [Candidate("5 + 3 = 8. #### 8", "teacher"), Candidate("5 + 3 = 8. #### 8!", "teacher")]
S = [Candidate("5 + 3 = 9. #### 9", "student"), Candidate("5 + 3 = 8. #### 8 ok", "student"),
     Candidate("#### 7", "student")]


def test_teacher_preferred_pairs_each_student_sample_with_a_teacher_sample():
    pairs = teacher_preferred(T, S, max_pairs=3)
    assert [(p.chosen.source, p.rejected.source) for p in pairs] == [("teacher", "student")] * 3
    assert pairs[2].chosen is T[0] and pairs[2].rejected is S[2]
    assert len(teacher_preferred(T, S, max_pairs=1)) == 1


def test_teacher_preferred_never_pairs_a_student_sample_that_is_a_teacher_sample():
    copy = Candidate(T[1].text, "student")  # the student wrote what the teacher wrote: no preference
    pairs = teacher_preferred(T, [copy, S[0], copy, S[2]], max_pairs=4)
    assert [p.rejected for p in pairs] == [S[0], S[2]]
    assert all(p.chosen.text != p.rejected.text for p in pairs)
    assert teacher_preferred(T, [copy], max_pairs=2) == []


def test_correctness_prefers_right_answers_whoever_wrote_them():
    pairs = correctness(T + S, answer="8", max_pairs=4)
    assert pairs and all(p.chosen.text.endswith(("8", "8!", "8 ok")) for p in pairs)
    assert all(p.rejected.text.endswith(("9", "7")) for p in pairs)
    assert len(pairs) == 3  # three right, two wrong: max(3, 2) pairs
    assert correctness(T, answer="8", max_pairs=4) == []  # nothing wrong to contrast with
    assert correctness(S[:1], answer="8", max_pairs=4) == []


def test_parse_verdict():
    assert parse_verdict("A") == "A" and parse_verdict(" b.") == "B" and parse_verdict("Answer B") == "B"
    assert parse_verdict("neither") is None


def judge(body: dict, headers: dict) -> list[str]:
    """Prefers the answer that ends in the right number (8)."""
    text = body["messages"][0]["content"]
    a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
    return ["A" if a.rstrip("!ok ").endswith("8") else "B"]


@pytest.fixture()
def judge_url():
    with chat_server(judge) as url:
        yield url


def test_llm_judge_over_http_ranks_whatever_order_it_is_shown(judge_url):
    endpoint = ChatEndpoint(base_url=judge_url, model="judge", concurrency=2)
    pairs = [(T[0], S[0]), (S[0], T[0]), (S[2], S[1])]
    ranked = judge_pairs(endpoint, ["q"] * 3, pairs, random.Random(0))
    assert [r.chosen.text for r in ranked] == [T[0].text, T[0].text, S[1].text]


def test_unreachable_endpoint_fails_with_one_line_naming_the_key():
    endpoint = ChatEndpoint(base_url="http://127.0.0.1:9/v1", model="m", max_retries=1, timeout_s=2,
                            config_key="collect_prefs.judge")
    with pytest.raises(PbkdError, match=r"^collect_prefs.judge.base_url=http://127.0.0.1:9/v1: request failed "
                                        r"after 2 attempt\(s\)") as err:
        endpoint.complete([{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value)


def test_correctness_also_checks_the_written_steps():
    lucky = Candidate("18 + 12 = 31. 31 - 16 = 14. #### 14", "student")  # right answer, wrong step
    right = Candidate("18 + 12 = 30. 30 - 16 = 14. #### 14", "teacher")
    pairs = correctness([lucky, right], answer="14", max_pairs=2)
    assert [(p.chosen, p.rejected) for p in pairs] == [(right, lucky)]
    assert correctness([lucky, right], answer="14", max_pairs=2, check_equations=False) == []
