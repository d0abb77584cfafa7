import math

import torch

from pbkd_cli.objectives.language_modeling import response_nll_loss


def test_loss_counts_only_response_tokens_against_a_hand_computation():
    vocab = 4
    logits = torch.zeros(1, 4, vocab, dtype=torch.float64)
    logits[0, 1, 2] = math.log(3.0)  # p(token 2 | position 1) = 3/6 = 1/2
    logits[0, 2, 3] = math.log(7.0)  # p(token 3 | position 2) = 7/10
    input_ids = torch.tensor([[1, 0, 2, 3]])
    response_mask = torch.tensor([[0, 0, 1, 1]])  # prompt = first two tokens
    loss, metrics = response_nll_loss(logits, input_ids, response_mask)
    expected = -(math.log(0.5) + math.log(0.7)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    assert metrics["response_tokens"] == 2


def test_prompt_and_padding_logits_get_no_gradient():
    logits = torch.randn(2, 5, 6, requires_grad=True)
    input_ids = torch.randint(0, 6, (2, 5))
    response_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    loss, _ = response_nll_loss(logits, input_ids, response_mask)
    loss.backward()
    # logits[:, t] predicts token t + 1, so position t has a gradient iff token t + 1 is a response token.
    has_grad = logits.grad.abs().sum(-1) > 0
    expected = torch.zeros(2, 5, dtype=torch.bool)
    expected[:, :-1] = response_mask[:, 1:].bool()
    assert torch.equal(has_grad, expected)


def test_loss_is_the_token_mean_over_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    input_ids = torch.randint(0, 5, (2, 4))
    response_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    loss, _ = response_nll_loss(logits, input_ids, response_mask)
    logp = torch.log_softmax(logits, -1)
    terms = [-logp[b, t - 1, input_ids[b, t]] for b in range(2) for t in range(1, 4) if response_mask[b, t]]
    assert torch.isclose(loss, torch.stack(terms).mean())


def test_nll_from_hidden_states_is_the_nll_of_their_whole_logits_in_value_and_gradients():
    from pbkd_cli.objectives.language_modeling import response_nll_loss_from_hidden

    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    input_ids = torch.randint(0, 5, (2, 5))
    response_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    padded_logits = torch.cat([hidden @ weight.T, torch.zeros(2, 1, 5, dtype=torch.float64)], dim=1)
    whole, whole_metrics = response_nll_loss(padded_logits, input_ids, response_mask)
    whole_grads = torch.autograd.grad(whole, (hidden, weight))
    fused, fused_metrics = response_nll_loss_from_hidden(hidden, weight, input_ids, response_mask)
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    assert torch.isclose(fused, whole, rtol=1e-12, atol=0)
    assert fused_metrics["response_tokens"] == whole_metrics["response_tokens"] == 5
    for a, b in zip(fused_grads, whole_grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    # Prompt and padding positions get no gradient.
    assert torch.equal(fused_grads[0].abs().sum(-1) > 0, response_mask[:, 1:].bool())
