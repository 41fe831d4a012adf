"""The padded vocabulary rows' logits: the CPU in-place fill gives masked_fill's values and
gradients, on either TP rank's slice, for a loss of the softmax and for one that is not."""

from __future__ import annotations

import pytest
import torch

from megashear.models import llama

VOCAB, PADDED, TP = 250, 256, 2  # tiny-gqa-tied's vocabulary, padded to 256 rows over TP2


class OutputLayer(torch.nn.Module):
    """Stands in for megatron's output layer: ``[s, b, h]`` -> ``([s, b, v/tp], None)``."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.linear(x), None


def losses(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "cross_entropy":  # labels are real ids of this slice (< VOCAB)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    finite = torch.where(torch.isinf(logits), torch.zeros_like(logits), logits)
    return (finite * torch.linspace(-1, 1, logits.shape[-1])).sum()  # nonzero grad at padded


@pytest.mark.parametrize("kind", ["cross_entropy", "not_of_the_softmax"])
@pytest.mark.parametrize("rank", [0, 1])
def test_in_place_fill_equals_masked_fill(monkeypatch, rank, kind):
    from megatron.core import parallel_state as ps

    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: rank)
    width = PADDED // TP
    torch.manual_seed(0)
    layer = OutputLayer(16, width)
    llama.mask_padded_logits(layer, VOCAB)
    x = torch.randn(8, 2, 16)  # [s, b, h]
    labels = torch.randint(0, min(width, VOCAB - rank * width), (8, 2))

    logits, _ = layer(x)
    raw = layer.linear(x).detach()
    padded = torch.arange(rank * width, (rank + 1) * width) >= VOCAB  # [v/tp]
    expected = raw.masked_fill(padded, float("-inf"))
    assert torch.equal(logits, expected)
    losses(logits, labels, kind).backward()
    grad = layer.linear.weight.grad.clone()

    layer.linear.weight.grad = None
    plain = layer.linear(x).masked_fill(padded, float("-inf"))
    losses(plain, labels, kind).backward()
    assert torch.equal(grad, layer.linear.weight.grad)
    if rank == 1:
        assert torch.all(grad[padded] == 0)


def test_the_fill_writes_no_copy_of_the_logits(monkeypatch):
    from megatron.core import parallel_state as ps

    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: 1)
    layer = OutputLayer(16, PADDED // TP)
    llama.mask_padded_logits(layer, VOCAB)
    seen = {}

    def record(module, args, out):
        seen["ptr"] = out.data_ptr()

    layer.linear.register_forward_hook(record)
    logits, _ = layer(torch.randn(8, 2, 16))
    assert logits.data_ptr() == seen["ptr"]
