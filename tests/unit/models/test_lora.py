"""LoRA through the real engine on tiny models: only the adapters (and a new value head) train, the
saved model is the merged one, which plain transformers loads and which gives the adapted model's
outputs, and the adapter-disabled reference is the model as it started."""

from __future__ import annotations

import pytest
import torch

from pbkd_cli.config.schema import LoraConfig, LrSchedule, RewardPooling, TrainerConfig
from pbkd_cli.data.prompts import collate
from pbkd_cli.engine import build_engine, save_model
from pbkd_cli.models import load_causal_lm
from pbkd_cli.models.factory import parameter_count
from pbkd_cli.models.lora import AdapterDisabled, is_lora, with_lora
from pbkd_cli.models.reward import load_reward_model, score
from pbkd_cli.objectives.language_modeling import response_nll_loss
from tests.unit.tiny import tiny_arch, tiny_tokenizer

pytest.importorskip("peft")

ARCH = tiny_arch(layers=2)
ZERO0 = {"zero_optimization": {"stage": 0}}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def batch_of(tokenizer):
    return collate(tokenizer(["12 + 30 =", "7 * 6 ="])["input_ids"],
                   [tokenizer(" 42")["input_ids"], tokenizer(" 42 = 7 * 6")["input_ids"]], tokenizer.pad_token_id)


def train(model, batch, loss_of, steps: int = 5):
    engine = build_engine(model, TrainerConfig(lr=1e-2, max_steps=steps, warmup_ratio=0.0,
                                               lr_schedule=LrSchedule.constant, micro_batch_size=2), ZERO0)
    for _ in range(steps):
        engine.backward(loss_of(engine))
        engine.step()
    return engine


def test_lora_trains_the_adapters_only_and_saves_the_merged_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = load_causal_lm(ARCH, tokenizer, "model.student")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = batch_of(tokenizer)
    with torch.no_grad():
        start_logits = base(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
    model = with_lora(base, LoraConfig(r=4, alpha=8), "model.student")
    assert is_lora(model) and parameter_count(model, trainable_only=True) < 0.2 * parameter_count(model)
    engine = train(model, ids, lambda e: response_nll_loss(
        e(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits, ids.input_ids, ids.response_mask)[0])
    with torch.no_grad():
        adapted = engine(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
        reference = AdapterDisabled(engine)(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
    assert not torch.allclose(adapted, start_logits, atol=1e-4)  # the adapters learnt
    assert torch.allclose(reference, start_logits, atol=1e-6)  # the base did not move
    assert engine.module.training  # the reference's forward leaves the policy's mode alone
    save_model(engine, tokenizer, tmp_path / "model")
    assert (tmp_path / "model" / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits, adapted, atol=1e-5)
    base_weights = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                    for k, v in engine.module.state_dict().items() if "lora" not in k}
    assert all(torch.equal(before[k], base_weights[k]) for k in before)


def test_a_lora_reward_model_trains_its_value_head_and_scores_the_same_once_merged(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    rm = with_lora(load_reward_model(ARCH, tokenizer, RewardPooling.last), LoraConfig(r=4), "model.rm")
    assert any("score" in n and p.requires_grad for n, p in rm.named_parameters())
    ids = batch_of(tokenizer)
    engine = train(rm, ids, lambda e: -(score(e, ids)[0] - score(e, ids)[1]))
    save_model(engine, tokenizer, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        ours = score(engine.module.eval(), ids)
        theirs = plain(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits.squeeze(-1)
    assert ours[0] > ours[1] and torch.allclose(ours, theirs, atol=1e-5)


def test_lora_settings_that_cannot_work_are_one_line():
    from pbkd_cli.config.compose import ConfigError, compose, to_typed

    with pytest.raises(ConfigError, match=r"^model.student.lora.r=8: LoRA runs on ZeRO stages 0-2"):
        to_typed(compose(["stage=sft", "deepspeed=zero3", "model.student.lora.r=8"]))
    with pytest.raises(ConfigError, match=r"^model.teacher.lora.r=8: the teacher is never trained"):
        to_typed(compose(["stage=sft", "model.teacher.lora.r=8"]))
    from pbkd_cli.io import PbkdError

    with pytest.raises(PbkdError, match=r"^model.student.lora"):
        with_lora(load_causal_lm(ARCH, tiny_tokenizer(), "model.student"),
                  LoraConfig(r=2, target_modules=["no_such_module"]), "model.student")
