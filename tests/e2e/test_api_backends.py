"""A black-box teacher and an LLM judge behind a real OpenAI-compatible HTTP server on loopback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pbkd_cli.data.gsm8k import extract_answer
from pbkd_cli.data.preferences import load_preferences
from pbkd_cli.generation.openai_api import ChatEndpoint
from pbkd_cli.io import PbkdError

from tests.chat_server import chat_server

from .conftest import PREFS, TINY, ok, pbkd, summary

STEPS = {"buys": "+", "finds": "+", "gets": "+", "gives away": "-", "loses": "-", "sells": "-"}


def solve(question: str) -> str:
    """The arithmetic task's exact solver: the ideal black-box teacher."""
    value = int(re.search(r"has (\d+)", question).group(1))
    equations = []
    for verb, n in re.findall(r"(buys|finds|gets|gives away|loses|sells) (\d+)", question):
        new = value + int(n) if STEPS[verb] == "+" else value - int(n)
        equations.append(f"{value} {STEPS[verb]} {n} = {new}.")
        value = new
    return " " + " ".join(equations) + f" #### {value}"


REQUESTS: list[dict] = []


def teacher_and_judge(body: dict, headers: dict) -> list[str]:
    REQUESTS.append({"auth": headers.get("Authorization"), "model": body["model"]})
    text = body["messages"][0]["content"]
    if text.startswith("You compare"):  # the judge: the answer with the right final number wins
        question = text.split("Question:\n")[1].split("\n\nAnswer A:")[0]
        a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        return ["A" if extract_answer(a) == extract_answer(solve(question)) else "B"]
    return [solve(text)] * body.get("n", 1)  # the teacher


@pytest.fixture(scope="module")
def api_url():
    with chat_server(teacher_and_judge) as url:
        yield url


def test_black_box_teacher_and_llm_judge_over_http(workdir, api_url, monkeypatch):
    monkeypatch.setenv("PBKD_TEST_KEY", "secret-key")
    run_dir = workdir / "prefs_api"
    ok(pbkd("collect-prefs", *TINY, *PREFS, "collect_prefs.labeler=llm_judge",
            f"model.teacher.api.base_url={api_url}", "model.teacher.api.model=teacher-model",
            "model.teacher.api.api_key_env=PBKD_TEST_KEY",
            f"collect_prefs.judge.base_url={api_url}", "collect_prefs.judge.model=judge-model",
            "collect_prefs.judge.api_key_env=PBKD_TEST_KEY", f"hydra.run.dir={run_dir}", cwd=workdir))
    pairs = load_preferences(run_dir / "prefs.jsonl")
    assert pairs and summary(run_dir)["teacher_sample_accuracy"] == 1.0
    # The judge put the right answer first whichever order it was shown.
    assert all(extract_answer(p.chosen) == p.answer for p in pairs if extract_answer(p.rejected) != p.answer)
    assert {r["model"] for r in REQUESTS} == {"teacher-model", "judge-model"}
    assert {r["auth"] for r in REQUESTS} == {"Bearer secret-key"}
    written = "".join(p.read_text() for p in run_dir.rglob("*") if p.is_file())
    assert "secret-key" not in written, "the key must never reach a file"


def test_unreachable_judge_is_one_line(workdir, trained_teacher):
    result = pbkd("collect-prefs", *TINY, *PREFS, "collect_prefs.labeler=llm_judge",
                  f"model.teacher.name_or_path={trained_teacher}", "collect_prefs.judge.base_url=http://127.0.0.1:9/v1",
                  "collect_prefs.judge.max_retries=0", "collect_prefs.judge.timeout_s=2",
                  f"hydra.run.dir={workdir / 'prefs_nojudge'}", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: collect_prefs.judge.base_url=http://127.0.0.1:9/v1")
    assert not (workdir / "prefs_nojudge" / "prefs.jsonl").exists()


def test_teacher_served_from_a_local_model_and_cached_so_a_rerun_asks_nothing(workdir, trained_teacher,
                                                                              monkeypatch):
    """`pbkd serve` puts the tiny teacher behind the OpenAI protocol, behind a key; the client's cache
    answers reruns."""
    monkeypatch.setenv("PBKD_TEST_SERVE_KEY", "serve-secret")
    monkeypatch.delenv("PBKD_TEST_NO_KEY", raising=False)
    log = workdir / "serve.log"
    with log.open("w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "pbkd_cli.cli", "serve", str(trained_teacher), "--port", "0",
                                   "--name", "tiny-teacher", "--api-key-env", "PBKD_TEST_SERVE_KEY"],
                                  stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        url = server.stdout.readline().strip().split(" at ")[-1]
        assert url.startswith("http://127.0.0.1:"), url
        # Without the key: a 401, and the client says why in its one line.
        no_key = ChatEndpoint(base_url=url, model="tiny-teacher", api_key_env="PBKD_TEST_NO_KEY", max_retries=0)
        with pytest.raises(PbkdError, match=r"\(HTTP 401: missing or wrong API key"):
            no_key.complete([{"role": "user", "content": "hi"}])
        cache = workdir / "api_cache"
        args = [*TINY, *PREFS, "collect_prefs.num_prompts=8", f"model.teacher.api.base_url={url}",
                "model.teacher.api.model=tiny-teacher", "model.teacher.api.api_key_env=PBKD_TEST_SERVE_KEY",
                f"model.teacher.api.cache_dir={cache}", "model.teacher.api.max_retries=0"]
        ok(pbkd("collect-prefs", *args, f"hydra.run.dir={workdir / 'prefs_served'}", cwd=workdir))
    finally:
        server.terminate()
        server.wait()
    assert "serve-secret" not in log.read_text(), "the server must never print the key"
    pairs = load_preferences(workdir / "prefs_served" / "prefs.jsonl")
    assert pairs and all(p.chosen_source == "teacher" for p in pairs)
    # The served text came through (a 6-step tiny teacher sampled at temperature 1 may also stop at once,
    # so an empty answer now and then is the model's, not the protocol's).
    assert any(p.chosen.strip() for p in pairs)
    assert len(list(cache.rglob("*.json"))) == 8  # one request (n=2 samples) per prompt

    # The server is gone: the rerun can only succeed from the cache, and gives the same pairs.
    ok(pbkd("collect-prefs", *args, f"hydra.run.dir={workdir / 'prefs_cached'}", cwd=workdir))
    again = load_preferences(workdir / "prefs_cached" / "prefs.jsonl")
    assert [(p.chosen, p.rejected) for p in again] == [(p.chosen, p.rejected) for p in pairs]
