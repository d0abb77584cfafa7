"""The white-box KD settings reach the divergence they parametrise."""

import pytest

from pbkd_cli.config.schema import Divergence, KDConfig
from pbkd_cli.stages.sft import divergence_parameters


@pytest.mark.parametrize("loss, expected", [
    (Divergence.jsd, {"beta": 0.3}),
    (Divergence.skl, {"alpha": 0.2}),
    (Divergence.srkl, {"alpha": 0.2}),
    (Divergence.fkl, {}),
    (Divergence.rkl, {}),
    (Divergence.tvd, {}),
])
def test_each_divergence_gets_its_own_parameter(loss, expected):
    assert divergence_parameters(KDConfig(loss=loss, jsd_beta=0.3, skew_alpha=0.2)) == expected


@pytest.mark.parametrize("loss", [Divergence.fkl, Divergence.jsd])
def test_kd_from_hidden_states_is_the_kd_of_the_whole_logits_in_loss_metrics_and_gradients(loss):
    import copy

    import torch

    from pbkd_cli.data.prompts import collate
    from pbkd_cli.models.logits import hidden_state_head
    from pbkd_cli.stages.sft import sft_loss
    from tests.unit.tiny import tiny_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    student, teacher = tiny_lm(tokenizer, seed=0), tiny_lm(tokenizer, seed=1).eval()
    assert hidden_state_head(student) is not None
    ids = tokenizer(["12 + 30 =", "7 * 6 ="])["input_ids"]
    batch = collate(ids, [tokenizer(" 42")["input_ids"], tokenizer(" 42 = 7 * 6")["input_ids"]], tokenizer.pad_token_id)
    results = {}
    for chunk_size in (None, 2):  # the whole logits; the fused path, two positions at a time
        model = copy.deepcopy(student)
        kd = KDConfig(loss=loss, ce_weight=0.5, chunk_size=chunk_size, temperature=1.3)
        value, metrics = sft_loss(model, batch, teacher, kd, len(tokenizer))
        value.backward()
        results[chunk_size] = value.item(), metrics, [p.grad for p in model.parameters()]
    (whole, whole_metrics, whole_grads), (fused, fused_metrics, fused_grads) = results[None], results[2]
    assert fused == pytest.approx(whole, rel=1e-5)
    assert fused_metrics == pytest.approx(whole_metrics, rel=1e-5)
    for a, b in zip(whole_grads, fused_grads):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_projects_only_the_response_positions_and_equals_the_whole_logits_loss(lora):
    import copy

    import torch

    from pbkd_cli.config.schema import LoraConfig
    from pbkd_cli.data.prompts import collate
    from pbkd_cli.models.lora import unwrapped, with_lora
    from pbkd_cli.objectives.language_modeling import response_nll_loss
    from pbkd_cli.stages.sft import sft_loss
    from tests.unit.tiny import tiny_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    base = tiny_lm(tokenizer, seed=0).double()
    if lora:
        base = with_lora(base, LoraConfig(r=4, alpha=8), "model.student")
        for p in base.parameters():  # adapters start at zero; move them off it so their gradients are tested
            if p.requires_grad:
                torch.nn.init.normal_(p.data, std=0.1)
    ids = tokenizer(["12 + 30 =", "7 * 6 =", "1 + 2 ="])["input_ids"]
    batch = collate(ids, [tokenizer(s)["input_ids"] for s in (" 42", " 42 = 7 * 6", " 3")], tokenizer.pad_token_id)
    results = []
    for path in ("hidden", "whole"):
        model = copy.deepcopy(base)
        if path == "hidden":
            # The output layer is applied to the response positions' hidden states, not run as a module
            # over every position.
            head_calls = []
            unwrapped(model).get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
            value, metrics = sft_loss(model, batch)
            assert not head_calls
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            value, metrics = response_nll_loss(logits, batch.input_ids, batch.response_mask)
        value.backward()
        results.append((value, metrics, [p.grad for p in model.parameters() if p.requires_grad]))
    (hidden, hidden_metrics, hidden_grads), (whole, whole_metrics, whole_grads) = results
    response_tokens = int(batch.response_mask[:, 1:].sum())
    assert hidden_metrics["response_tokens"] == response_tokens
    assert torch.isclose(hidden, whole, rtol=1e-12, atol=0)
    assert hidden_metrics == pytest.approx(whole_metrics, rel=1e-12)
    assert len(hidden_grads) == len(whole_grads) > 0
    for a, b in zip(hidden_grads, whole_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_an_engine_that_partitions_weights_or_autocasts_in_its_forward_gets_no_hidden_state_path():
    from pbkd_cli.models.logits import hidden_state_head
    from tests.unit.tiny import tiny_lm, tiny_tokenizer

    class Engine:  # what hidden_state_head reads of a DeepSpeed engine
        def __init__(self, module, **flags):
            self.module, self.flags = module, flags

        def zero_optimization_partition_weights(self):
            return self.flags.get("zero3", False)

        def torch_autocast_enabled(self):
            return self.flags.get("autocast", False)

    model = tiny_lm(tiny_tokenizer())
    assert hidden_state_head(Engine(model)) is not None
    assert hidden_state_head(Engine(model, zero3=True)) is None
    assert hidden_state_head(Engine(model, autocast=True)) is None
