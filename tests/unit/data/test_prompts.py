import torch

from pbkd_cli.data.prompts import collate
from pbkd_cli.models import build_bpe_tokenizer


def test_collate_right_pads_and_masks_exactly_the_response():
    batch = collate([[5, 6], [7]], [[8, 9, 1], [10, 1]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 8, 9, 1], [7, 10, 1, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]


def test_local_bpe_tokenizer_round_trips_and_reloads(tmp_path):
    texts = ["Question: Mia has 12 apples.\nAnswer: 12 + 5 = 17. #### 17"] * 20
    tokenizer = build_bpe_tokenizer(texts, vocab_size=300)
    text = " 12 + 5 = 17. #### 17"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2, "frequent words and numbers are merged into single tokens"
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.pad_token == "<pad>" and reloaded.eos_token == "</s>"
    assert torch.tensor(ids).max() < len(tokenizer)


def test_a_huge_question_is_cut_before_tokenising_and_keeps_the_same_last_tokens():
    from pbkd_cli.config.schema import DataConfig
    from pbkd_cli.data.examples import Example
    from pbkd_cli.data.prompts import encode_prompts, overlong

    corpus = ["Question: what is 12 + 7?\nAnswer: 12 + 7 = 19 #### 19", "the cat sat on the mat " * 20]
    tokenizer = build_bpe_tokenizer(corpus, vocab_size=300)
    cfg = DataConfig(max_prompt_tokens=16)
    huge = Example("big", "the cat sat on the mat " * 5_000 + "what is 12 + 7?", "19 #### 19", "19")
    small = Example("small", "what is 12 + 7?", "19 #### 19", "19")
    lengths = []
    real_call = type(tokenizer).__call__

    class Recording(type(tokenizer)):
        def __call__(self, texts, **kw):
            lengths.extend(len(t) for t in texts)
            return real_call(self, texts, **kw)

    tokenizer.__class__ = Recording
    ids = encode_prompts([huge, small], cfg, tokenizer)
    assert overlong([huge, small], cfg, tokenizer) == [True, False]
    full = real_call(tokenizer, ["Question: " + huge.question + "\nAnswer:"], add_special_tokens=True)["input_ids"][0]
    assert ids[0] == full[-16:] and len(ids[1]) < 16
    assert max(lengths) < 16 * max(map(len, tokenizer.get_vocab())) + 20    # not the 115k-character question
