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
