"""Prompt-completion data in TRL's formats (`data.task=custom`), and preference pairs with
conversational prompts: each format becomes the same kind of example, the chat template is applied
to them as to the math tasks' prompts, and a bad row is one line naming its file line and key."""

from __future__ import annotations

import json

import pytest

from pbkd_cli.config.schema import DataConfig, TaskName
from pbkd_cli.data.examples import DataError
from pbkd_cli.data.preferences import load_preferences
from pbkd_cli.data.prompt_completion import example_from_row
from pbkd_cli.data.prompts import encode_pairs, encode_prompts, format_prompt, gold_response, pair_examples
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.io import PbkdError
from pbkd_cli.models import build_bpe_tokenizer

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_bpe_tokenizer(["Add 2 and 3. 2 + 3 = 5. #### 5", "<user><assistant><system>"] * 20, 120)
    tok.chat_template = TEMPLATE
    return tok


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_three_formats_give_one_kind_of_example():
    standard = example_from_row({"prompt": "Add 2 and 3.", "completion": " 2 + 3 = 5. #### 5"}, "f line 1", "x-0")
    messages = example_from_row({"messages": [SYSTEM, {"role": "user", "content": "Add 2 and 3."},
                                              {"role": "assistant", "content": " 2 + 3 = 5. #### 5"}]}, "f line 2", "x-1")
    conversational = example_from_row({"id": "q7", "prompt": [SYSTEM, {"role": "user", "content": "Add 2 and 3."}],
                                       "completion": [{"role": "assistant", "content": " 2 + 3 = 5. #### 5"}],
                                       "answer": 5}, "f line 3", "x-2")
    assert standard.messages == (("user", "Add 2 and 3."),) and standard.id == "x-0"
    assert messages.messages == conversational.messages == (("system", "Be brief."), ("user", "Add 2 and 3."))
    for ex in (standard, messages, conversational):
        assert ex.question == "Add 2 and 3." and ex.solution == " 2 + 3 = 5. #### 5" and ex.answer == "5"
        assert gold_response(ex) == " 2 + 3 = 5. #### 5"  # the completion verbatim
    assert conversational.id == "q7"
    assert example_from_row({"prompt": "Say hi.", "completion": "Hi!"}, "f", "x").answer == ""


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p"}, "expected 'prompt' and 'completion', or 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "'messages' must end in the assistant's response"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "'messages'[1] must be"),
    ({"prompt": [], "completion": "x"}, "'prompt' must be a non-empty list"),
    ({"prompt": "p", "completion": [{"role": "user", "content": "x"}]}, "'completion' may hold assistant messages only"),
    ({"prompt": "p", "completion": "x", "answer": [1]}, "'answer' must be a string or a number"),
])
def test_a_bad_row_is_one_line_naming_where_it_is(row, message):
    with pytest.raises(DataError) as err:
        example_from_row(row, "data.train_path=t.jsonl line 4", "x")
    assert str(err.value).startswith("data.train_path=t.jsonl line 4: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_custom_task_reads_local_files_per_split(tmp_path):
    cfg = DataConfig(task=TaskName.custom,
                     train_path=write(tmp_path / "train.jsonl", [{"prompt": f"Add {n} and 1.", "completion": f" #### {n + 1}"}
                                                                 for n in range(3)]),
                     test_path=write(tmp_path / "test.jsonl", [{"messages": [{"role": "user", "content": "Add 9 and 1."},
                                                                             {"role": "assistant", "content": "10"}]}]))
    train, test = load_examples(cfg, "train"), load_examples(cfg, "test")
    assert [ex.answer for ex in train] == ["1", "2", "3"] and [ex.id for ex in train][0] == "custom-train-0"
    assert test[0].answer == "10"
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(DataError, match=r"^data.train_path=.*bad.jsonl line 2: expected 'prompt' and 'completion'"):
        load_examples(DataConfig(task=TaskName.custom, train_path=bad), "train")


def test_prompts_keep_their_turns_verbatim_or_go_through_the_chat_template(tokenizer):
    ex = example_from_row({"prompt": [SYSTEM, {"role": "user", "content": "Add 2 and 3."}], "completion": "5"}, "f", "x")
    assert format_prompt(ex, DataConfig(), tokenizer) == "Be brief.\n\nAdd 2 and 3."  # no prompt_template
    assert (format_prompt(ex, DataConfig(use_chat_template=True), tokenizer)
            == "<system>Be brief.</s><user>Add 2 and 3.</s><assistant>")


def test_conversational_and_hand_written_pairs_get_the_chat_template_sft_and_eval_apply(tmp_path, tokenizer):
    path = write(tmp_path / "prefs.jsonl", [
        {"prompt": [SYSTEM, {"role": "user", "content": "Add 2 and 3."}],
         "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]},
        {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"},
    ])
    conversational, plain = load_preferences(path, "train_rm.prefs_path")
    assert conversational.chosen == "5" and conversational.rejected == "6"
    assert conversational.prompt == "Be brief.\n\nAdd 2 and 3." and conversational.messages[0] == SYSTEM
    chat = DataConfig(use_chat_template=True)
    prompts, chosen, rejected = encode_pairs([conversational, plain], chat, tokenizer)
    assert prompts == encode_prompts(pair_examples([conversational, plain]), chat, tokenizer)
    assert tokenizer.decode(prompts[1]) == "<user>Add 2 and 3.</s><assistant>"
    assert tokenizer.decode(prompts[0]).startswith("<system>Be brief.</s><user>")
    with pytest.raises(PbkdError, match=r"line 1: 'chosen' may hold assistant messages only"):
        load_preferences(write(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": [{"role": "user", "content": "x"}],
                                                         "rejected": "y"}]), "train_rm.prefs_path")
