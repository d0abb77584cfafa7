import pytest
import torch

from pbkd_cli.config.compose import compose, to_typed
from pbkd_cli.config.schema import ModelConfig, RewardPooling, TinyLlamaConfig, TrainRMConfig
from pbkd_cli.data.prompts import collate
from pbkd_cli.engine import save_model
from pbkd_cli.models import build_bpe_tokenizer
from pbkd_cli.models.reward import load_reward_model, score

TEXTS = ["Question: Mia has 3 apples.\nAnswer: 3 + 2 = 5. #### 5"] * 10


def tiny_rm(pooling: RewardPooling):
    torch.manual_seed(0)
    tokenizer = build_bpe_tokenizer(TEXTS, vocab_size=280)
    cfg = ModelConfig(tiny=TinyLlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=2, intermediate_size=32))
    return tokenizer, load_reward_model(cfg, tokenizer, pooling).eval()


def test_mean_pooling_averages_the_head_over_response_tokens_only():
    tokenizer, rm = tiny_rm(RewardPooling.mean)
    batch = collate([[5, 6, 7], [8]], [[9, 10, 1], [11, 1]], tokenizer.pad_token_id)
    rewards = score(rm, batch)
    hidden = rm.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    per_token = rm.score(hidden).squeeze(-1)
    expected = torch.stack([per_token[0, 3:6].mean(), per_token[1, 1:3].mean()])
    assert torch.allclose(rewards, expected, atol=1e-6)


def test_last_pooling_is_the_sequence_classifier_output_and_pooling_survives_saving(tmp_path):
    tokenizer, rm = tiny_rm(RewardPooling.last)
    batch = collate([[5, 6, 7], [8]], [[9, 10, 1], [11, 1]], tokenizer.pad_token_id)
    hidden = rm.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    per_token = rm.score(hidden).squeeze(-1)
    assert torch.allclose(score(rm, batch), torch.stack([per_token[0, 5], per_token[1, 2]]), atol=1e-6)
    rm.save_pretrained(tmp_path)
    reloaded = load_reward_model(ModelConfig(name_or_path=str(tmp_path)), tokenizer, RewardPooling.mean)
    assert reloaded.config.reward_pooling == "last", "a trained RM keeps the pooling it was fitted with"
    assert torch.allclose(score(reloaded.eval(), batch), score(rm, batch), atol=1e-6)


def test_likelihood_reward_is_the_mean_response_logprob_of_the_rm_language_model(tmp_path):
    tokenizer, rm = tiny_rm(RewardPooling.likelihood)
    batch = collate([[5, 6, 7], [8]], [[9, 10, 1], [11, 1]], tokenizer.pad_token_id)
    logits = rm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    logp = torch.log_softmax(logits, -1)
    # Row 0: response tokens at positions 3..5, predicted from positions 2..4; row 1: positions 1..2.
    expected = torch.stack([
        sum(logp[0, t - 1, batch.input_ids[0, t]] for t in range(3, 6)) / 3,
        sum(logp[1, t - 1, batch.input_ids[1, t]] for t in range(1, 3)) / 2,
    ])
    torch.testing.assert_close(score(rm, batch).double(), expected, atol=1e-5, rtol=1e-5)
    rm.save_pretrained(tmp_path)
    reloaded = load_reward_model(ModelConfig(name_or_path=str(tmp_path)), tokenizer, RewardPooling.mean)
    assert reloaded.config.reward_pooling == "likelihood" and hasattr(reloaded, "lm_head")
    torch.testing.assert_close(score(reloaded.eval(), batch), score(rm, batch))


def test_a_backbone_checkpoint_takes_the_configured_pooling(tmp_path):
    tokenizer, lm = tiny_rm(RewardPooling.likelihood)
    del lm.config.reward_pooling  # a plain causal LM, as vanilla KD saves the student
    lm.save_pretrained(tmp_path)
    rm = load_reward_model(ModelConfig(name_or_path=str(tmp_path)), tokenizer, RewardPooling.mean)
    assert rm.config.reward_pooling == "mean" and hasattr(rm, "score")


def test_the_default_pooling_is_the_one_other_tools_read():
    assert TrainRMConfig().pooling is RewardPooling.last
    assert to_typed(compose(["stage=train_rm"])).train_rm.pooling is RewardPooling.last


def plain_transformers_scores(model_dir, batch) -> torch.Tensor:
    """The RM's rewards as transformers (and TRL, vLLM) read a saved sequence classifier, no pbkd code."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)


def test_a_saved_last_rm_scores_the_same_outside_pbkd_and_a_mean_rm_does_not(tmp_path):
    # Rows of three lengths, right-padded as pbkd batches them.
    batch = collate([[5, 6, 7], [8], [12, 13]], [[9, 10, 1], [11, 1], [1]], 0)
    assert batch.attention_mask[:, -1].tolist() == [1, 0, 0] and batch.input_ids[1, -1] == 0
    for pooling, same in ((TrainRMConfig().pooling, True), (RewardPooling.mean, False)):
        tokenizer, rm = tiny_rm(pooling)
        assert tokenizer.pad_token_id == 0
        save_model(rm, tokenizer, tmp_path / pooling.value)
        with torch.no_grad():
            ours = score(rm, batch)
        outside = plain_transformers_scores(tmp_path / pooling.value, batch)
        assert torch.allclose(outside, ours, atol=1e-5) is same, (pooling, outside, ours)


def test_likelihood_reward_is_scaled_and_the_scale_survives_saving(tmp_path):
    tokenizer, rm = tiny_rm(RewardPooling.likelihood)
    batch = collate([[5, 6, 7], [8]], [[9, 10, 1], [11, 1]], tokenizer.pad_token_id)
    at_one = score(rm, batch)
    rm.config.reward_scale = 30.0
    torch.testing.assert_close(score(rm, batch), 30.0 * at_one)
    rm.save_pretrained(tmp_path)
    reloaded = load_reward_model(ModelConfig(name_or_path=str(tmp_path)), tokenizer, RewardPooling.likelihood,
                                 likelihood_scale=2.0)
    assert reloaded.config.reward_scale == 30.0, "a trained RM keeps the scale it was fitted with"
    torch.testing.assert_close(score(reloaded.eval(), batch), score(rm, batch))


def test_a_fresh_likelihood_rm_takes_the_configured_scale_and_an_older_fitted_one_reads_at_one(tmp_path):
    tokenizer, lm = tiny_rm(RewardPooling.likelihood)
    del lm.config.reward_pooling, lm.config.reward_scale  # a plain causal LM, as vanilla KD saves the student
    lm.save_pretrained(tmp_path / "backbone")
    fresh = load_reward_model(ModelConfig(name_or_path=str(tmp_path / "backbone")), tokenizer,
                              RewardPooling.likelihood, likelihood_scale=30.0)
    assert fresh.config.reward_scale == 30.0
    lm.config.reward_pooling = "likelihood"  # fitted before the scale existed
    lm.save_pretrained(tmp_path / "older")
    older = load_reward_model(ModelConfig(name_or_path=str(tmp_path / "older")), tokenizer,
                              RewardPooling.likelihood, likelihood_scale=30.0)
    assert older.config.reward_scale == 1.0


def test_the_likelihood_scale_is_read_from_the_config_and_must_be_positive():
    assert to_typed(compose(["stage=train_rm", "train_rm.likelihood_scale=30"])).train_rm.likelihood_scale == 30.0
    with pytest.raises(Exception, match="train_rm.likelihood_scale"):
        to_typed(compose(["stage=train_rm", "train_rm.likelihood_scale=0"]))
