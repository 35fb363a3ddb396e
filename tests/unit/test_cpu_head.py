"""The CPU decode head: same logits as the model's own head, same parameters, installed only
where it applies (float32 nn.Linear heads on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from transformers import GPT2Config, GPT2LMHeadModel

from eft_serve.engine.cpu_head import FEW_ROWS, CpuDecodeHead, enable_cpu_decode_head


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=503, n_positions=32, n_embd=48, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (FEW_ROWS, 48), (FEW_ROWS + 1, 48), (2, 3, 48), (1, 1, 48)])
def test_logits_match_linear(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(48, 503, bias=bias)
    x = torch.randn(*shape)
    got = CpuDecodeHead(linear)(x)
    want = F.linear(x, linear.weight, linear.bias)
    assert got.shape == want.shape
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_installed_on_cpu_float32_keeping_tied_weights_and_state_dict() -> None:
    model = tiny_gpt2()
    keys = set(model.state_dict())
    ids = torch.tensor([[5, 17, 300, 2, 9]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    assert enable_cpu_decode_head(model)
    head = model.get_output_embeddings()
    assert isinstance(head, CpuDecodeHead)
    # Still tied to the input embedding (one tensor), and the state dict names are unchanged.
    assert head.weight is model.get_input_embeddings().weight
    assert set(model.state_dict()) == keys
    with torch.inference_mode():
        after = model(input_ids=ids).logits
        last = model(input_ids=ids, logits_to_keep=1).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last[:, -1], before[:, -1], rtol=1e-5, atol=1e-5)
    assert enable_cpu_decode_head(model)  # idempotent
    assert isinstance(model.get_output_embeddings(), CpuDecodeHead)


def test_not_installed_where_it_does_not_apply() -> None:
    half = tiny_gpt2().to(torch.bfloat16)
    assert not enable_cpu_decode_head(half)
    assert type(half.get_output_embeddings()) is torch.nn.Linear

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self) -> None:
            return None

    assert not enable_cpu_decode_head(NoHead())
