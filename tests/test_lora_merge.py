"""Merged LoRA banks with low-rank gradients (issue 9 item 4) and LoRA layers under CPU autocast (item 9)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cstoolkit.lora import LoRASet


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 6, bias=False)
        self.c = nn.Linear(8, 8)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)
        self.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + self.c(x))


def _step(merge: bool, merge_grad: str = "lowrank", freeze_a: bool = False, autocast: torch.dtype | None = None):
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(9), requires_grad=True)
    net = Net()
    loras = LoRASet(net, ["a", "b", "c"], rank=2, adapters=("content", "style"), merge=merge, merge_grad=merge_grad,
                    generator=torch.Generator().manual_seed(3)).inject()
    for bank in loras.banks.values():
        bank.lora_B.data.normal_(generator=torch.Generator().manual_seed(4))
        if freeze_a:
            bank.trainable_A = False
    gate = lambda key, bank: {"content": torch.rand(len(bank.names), bank.out_features,  # noqa: E731
                                                    generator=torch.Generator().manual_seed(1)), "style": None}
    loras.prepare(torch.float32, gate)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = net(x)
    (out.float() ** 2).sum().backward()
    grads = [x.grad] + [getattr(b, n).grad for b in loras.banks.values() for n in ("lora_A", "lora_B")]
    return out.detach().float(), grads


@pytest.mark.parametrize("freeze_a", [False, True])
def test_lowrank_merge_matches_dense_merge_and_unmerged(freeze_a):
    ref_out, ref_grads = _step(False, freeze_a=freeze_a)
    for merge_grad in ("dense", "lowrank"):
        out, grads = _step(True, merge_grad, freeze_a=freeze_a)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        for g, ref in zip(grads, ref_grads):
            if ref is None:
                assert g is None or not g.any()  # frozen A: no gradient
            else:
                torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", [False, True])
def test_lora_layers_under_cpu_autocast(merge, dtype):
    """fp32 frozen weights, fp32 LoRA, autocast to bf16/fp16 (mixed precision on a CPU): runs, close to fp32."""
    ref_out, ref_grads = _step(merge)
    out, grads = _step(merge, autocast=dtype)
    torch.testing.assert_close(out, ref_out, atol=0.3, rtol=0.05)
    for g, ref in zip(grads[1:], ref_grads[1:]):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0) > 0.99
