"""The fused LoRA layers: exact maths, gradients, gates, inject/remove, export; merged banks with low-rank
gradients (issue 9 item 4) and LoRA layers under CPU autocast (item 9)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from cstoolkit.lora import FusedLoRAFunction, LoRASet, lora_state_dict_to_layers, token_segments


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


def test_fused_function_matches_autograd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, up: FusedLoRAFunction.apply(x, w, b, a, up), (x, a, up))
    ref = x @ w.t() + b + (x @ a.t()) @ up.t()
    assert torch.allclose(FusedLoRAFunction.apply(x, w, b, a, up), ref)


def test_inject_prepare_gates_and_remove():
    net = Net()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    base_out = net(x)
    loras = LoRASet(net, ["a", "b", "c"], rank=2, adapters=("content", "style"),
                    generator=torch.Generator().manual_seed(3)).inject()
    assert set(loras.banks) == {"8x8", "8x6"}  # a and c share one bank
    frozen_before = {k: v.clone() for k, v in net.state_dict().items() if ".base." in k}
    gates_zero = lambda key, bank: {"content": torch.zeros(len(bank.names), bank.out_features),  # noqa: E731
                                    "style": torch.zeros(len(bank.names), bank.out_features)}
    loras.prepare(torch.float32, gates_zero)
    assert torch.allclose(net(x), base_out)  # all columns gated off = base model
    loras.prepare(torch.float32)
    out = net(x)
    out.sum().backward()
    bank = loras.banks["8x8"]
    assert bank.lora_A.grad is not None and bank.lora_B.grad is not None
    # reference: explicit W0 + Σ B A
    w_a = net.a.base.weight + sum(bank.lora_B[0][:, s] @ bank.lora_A[0][s] for s in (slice(0, 2), slice(2, 4)))
    assert torch.allclose(net.a(x), x @ w_a.t() + net.a.base.bias, atol=1e-5)
    loras.remove()
    assert isinstance(net.a, nn.Linear) and torch.equal(net(x), base_out)
    after = net.state_dict()
    assert all(torch.equal(after[k.replace(".base", "")], v) for k, v in frozen_before.items())  # frozen never moved


def test_export_folds_gates_and_loads_back():
    net = Net()
    loras = LoRASet(net, ["a", "c"], rank=2, adapters=("content", "style"),
                    generator=torch.Generator().manual_seed(4)).inject()
    gate = torch.tensor([[1.0] * 4 + [0.0] * 4, [0.5] * 8])
    gates = lambda key, bank: {"content": gate, "style": None}  # noqa: E731
    sd = loras.export("content", gates)
    assert set(sd) == {"unet.a.lora_A.weight", "unet.a.lora_B.weight", "unet.c.lora_A.weight", "unet.c.lora_B.weight"}
    assert torch.all(sd["unet.a.lora_B.weight"][4:] == 0)
    layers = lora_state_dict_to_layers(sd)
    x = torch.randn(3, 8)
    loras.prepare(torch.float32, lambda key, bank: {"content": gate, "style": torch.zeros(2, 8)})
    a, b = layers["c"]
    assert torch.allclose(net.c(x), net.c.base(x) + (x @ a.t()) @ b.t(), atol=1e-5)
    meta = loras.diffusers_metadata()
    assert '"unet.r": 2' in meta["lora_adapter_metadata"]


def test_split_input_bank_and_record_delta():
    net = Net()
    loras = LoRASet(net, ["b", "a"], rank=2, adapters=("content", "style"), split_input=["b"],
                    generator=torch.Generator().manual_seed(5)).inject()
    assert loras.banks["8x6_split"].split_input and not loras.banks["8x8"].split_input
    layer = loras.layers["b"]
    xc, xs, x = (torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i in (6, 7, 8))
    layer.lora_input = torch.cat([xc, xs], -1)
    bank = loras.banks["8x6_split"]
    loras.prepare(torch.float32)
    a, b = bank.lora_A[0], bank.lora_B[0]
    ref = layer.base(x) + (xc @ a[:2].t()) @ b[:, :2].t() + (xs @ a[2:].t()) @ b[:, 2:].t()
    out = layer(x)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    grad_fused = bank.lora_A.grad.clone()
    bank.lora_A.grad = None
    ref.sum().backward()
    assert torch.allclose(grad_fused, bank.lora_A.grad, atol=1e-5)  # block-diagonal A: no cross terms
    loras.set_record_delta(True)
    loras.prepare(torch.float32)
    out = layer(x)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    deltas = bank._deltas[0]
    assert len(deltas) == 2 and deltas[0].grad.shape == (6, 8)


def test_merged_banks_match_unmerged_and_restore_the_base():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))
    results = {}
    for merge in (False, True):
        net = Net()
        base_out = net(x)
        loras = LoRASet(net, ["a", "b", "c"], rank=2, adapters=("content", "style"), merge=merge,
                        generator=torch.Generator().manual_seed(3)).inject()
        gate = lambda key, bank: {"content": torch.rand(len(bank.names), bank.out_features,  # noqa: E731
                                                        generator=torch.Generator().manual_seed(1)), "style": None}
        loras.prepare(torch.float32, gate)
        out = net(x)
        out.sum().backward()
        results[merge] = (out.detach(), *(b.lora_A.grad.clone() for b in loras.banks.values()),
                          *(b.lora_B.grad.clone() for b in loras.banks.values()))
        loras.remove()
        assert torch.equal(net(x), base_out)
    for unmerged, merged in zip(results[False], results[True]):
        assert torch.allclose(unmerged, merged, atol=1e-5)


@pytest.mark.parametrize("merge_grad", ["dense", "lowrank"])
def test_merged_bank_prepared_in_float32_runs_a_bf16_base(merge_grad):
    """Sampling on a GPU: bf16 frozen weights, no autocast, banks prepared in float32 (as sample_scalewise did,
    which made `cstoolkit run` on switti-ar fail with "self and mat2 must have the same dtype"): the layer
    computes in the base's dtype and matches the bf16 unmerged layer."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(9)).bfloat16()
    outs = {}
    for merge in (False, True):
        net = Net().bfloat16()
        loras = LoRASet(net, ["a", "b", "c"], rank=2, adapters=("content",), merge=merge, merge_grad=merge_grad,
                        generator=torch.Generator().manual_seed(3)).inject()
        for bank in loras.banks.values():
            torch.nn.init.normal_(bank.lora_B, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            loras.prepare(torch.float32 if merge else torch.bfloat16)
            outs[merge] = net(x)
    assert outs[True].dtype == torch.bfloat16
    torch.testing.assert_close(outs[True], outs[False], atol=0.1, rtol=0.05)


def test_shared_input_bank_matches_per_layer_split_inputs():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(11))
    xl = torch.randn(3, 16, generator=torch.Generator().manual_seed(12))
    outs, grads = [], []
    for shared in (False, True):
        net = Net()
        loras = LoRASet(net, ["a", "c"], rank=2, adapters=("content", "style"), split_input=["a", "c"],
                        generator=torch.Generator().manual_seed(13)).inject()
        if shared:
            loras.set_shared_input(["a", "c"], xl)
            assert loras.banks["8x8_split"].shared_input is xl
        else:
            for name in ("a", "c"):
                loras.layers[name].lora_input = xl
        loras.prepare(torch.float32)
        out = net.a(x) + net.c(x)
        out.sum().backward()
        outs.append(out.detach())
        grads.append((loras.banks["8x8_split"].lora_A.grad.clone(), loras.banks["8x8_split"].lora_B.grad.clone()))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert all(torch.allclose(g0, g1, atol=1e-5) for g0, g1 in zip(grads[0], grads[1]))


def _recorded(merge: bool, shared: bool) -> dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(bank, layer, adapter) -> (ΔW, ∂L/∂ΔW) from delta_gradients after one recorded backward."""
    net = Net()
    loras = LoRASet(net, ["a", "b", "c"], rank=2, adapters=("content", "style"), split_input=["b"], merge=merge,
                    init="gaussian", generator=torch.Generator().manual_seed(4)).inject()
    lora_input = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    if shared:
        loras.set_shared_input(["b"], lora_input)
    else:
        loras.layers["b"].lora_input = lora_input
    loras.set_record_delta(True)
    loras.prepare(torch.float32)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    (net(x) ** 2).sum().backward()
    out = {}
    for key, bank in loras.banks.items():
        for rows, adapter, delta, grad in bank.delta_gradients(max_elements=64):  # one layer per chunk
            for k, i in enumerate(range(rows.start, rows.stop)):
                out[key, i, adapter] = (delta[k], grad[k])
    return out


def test_delta_gradients_agree_for_merged_shared_and_per_layer_banks():
    """UnZipLoRA's column importance reads ΔW and ∂L/∂ΔW: the merged weight's gradient (GPU) and the shared LoRA
    output's gradient give what per-layer recorded ΔW give (CPU)."""
    ref = _recorded(merge=False, shared=False)
    assert len(ref) == 6  # 3 layers x 2 adapters
    for merge, shared in ((True, False), (False, True), (True, True)):
        got = _recorded(merge, shared)
        assert got.keys() == ref.keys()
        for k, (delta, grad) in ref.items():
            assert torch.allclose(got[k][0], delta, atol=1e-5), (merge, shared, k)
            assert torch.allclose(got[k][1], grad, atol=1e-4), (merge, shared, k)
            assert grad.abs().sum() > 0


# ------------------------------------------------------------------ merged banks, low-rank gradients, autocast
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


def _token_gated_expression(x, w0, bias, a, b, token_weights, rank):
    """What LoRALinear computed for token-weighted gates before TokenGatedLoRAFunction: plain autograd."""
    y = torch.nn.functional.linear(x, w0, bias)
    h = x.to(y.dtype) @ a.to(y.dtype).t()
    w = token_weights.to(y.dtype).repeat_interleave(rank, dim=-1)
    return y + torch.cat([h, h * w], dim=-1) @ b.to(y.dtype).t()


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_token_gated_function_is_bitwise_the_autograd_expression(autocast, bias):
    """The one-node token-gated LoRA layer gives bitwise the output and the x, A, B gradients of autograd
    through the plain expression (fp32, and under CPU autocast to bf16 with fp32 inputs: each cast and its
    gradient as before)."""
    g = torch.Generator().manual_seed(4)
    k, r, n_tok, fin, fout = 2, 3, 11, 8, 6
    x = torch.randn(1, n_tok, fin, generator=g)
    w0, b0 = torch.randn(fout, fin, generator=g), (torch.randn(fout, generator=g) if bias else None)
    a = torch.randn(k * r, fin, generator=g)
    b = torch.randn(fout, 2 * k * r, generator=g)
    tw = (torch.rand(1, n_tok, k, generator=g) > 0.5).float()
    net = nn.Linear(fin, fout, bias=bias)
    net.requires_grad_(False)
    net.weight.data = w0
    if bias:
        net.bias.data = b0
    loras = LoRASet(nn.Sequential(net), ["0"], r, ("c", "s"))
    loras.inject()
    bank = next(iter(loras.banks.values()))
    bank.lora_A.data = a[None].clone()
    bank.lora_B.data = b[None, :, : k * r].clone()
    loras.set_token_weights(tw)
    layer = loras.layers["0"]
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    results = []
    for fused in (False, True):
        xs = x.clone().requires_grad_(True)
        bank.prepare(torch.float32, None, {"c": torch.ones(1, fout), "s": torch.ones(1, fout)})
        with ctx:
            if fused:
                out = layer(xs)
            else:
                la, lb = bank.layer_weights(0)
                out = _token_gated_expression(xs, w0, b0, la, lb, tw, r)
        (out.float() * torch.linspace(-1, 1, fout)).sum().backward()
        results.append((out, xs.grad, bank.lora_A.grad, bank.lora_B.grad))
        bank.lora_A.grad = bank.lora_B.grad = None
    loras.remove()
    assert results[1][0].dtype == (autocast or torch.float32) and results[1][1].dtype == torch.float32
    for ref, got in zip(*results):
        assert ref.dtype == got.dtype and torch.equal(ref, got)


def _token_gated_pair(merge: bool, bias: bool, n_tok: int, fin: int, fout: int, r: int) -> LoRASet:
    layers = nn.Sequential(nn.Linear(fin, fout, bias=bias), nn.Linear(fin, fout, bias=bias))
    torch.manual_seed(8)
    for p in layers.parameters():
        p.requires_grad_(False).normal_()
    return LoRASet(layers, ["0", "1"], r, ("c", "s"), init="gaussian", init_std=0.3,
                   generator=torch.Generator().manual_seed(9), merge=merge).inject()


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_token_gated_bank_merged_per_run_matches_unmerged(batch, bias, autocast):
    """Merged (merge=True), a token-gated bank whose token weights are constant over runs of tokens merges one
    weight per distinct row (W0 + B (g + w e) A) and runs one GEMM per run: the output and the gradients of x,
    A, B and every gate (g, e) are those of the unmerged layers within fp32 rounding (rel. 1e-5; under CPU
    autocast to bf16, bf16's)."""
    n_tok, fin, fout, r = 13, 8, 6, 3
    tw = torch.zeros(1, n_tok, 2)
    tw[0, :4, 1] = 1  # runs: style tokens, content tokens, style again (the first row's weight reused)
    tw[0, 4:10, 0] = 1
    tw[0, 10:, 1] = 1
    g = torch.Generator().manual_seed(10)
    x0 = torch.randn(batch, n_tok, fin, generator=g)
    gates0 = {a: torch.rand(2, fout, generator=g) for a in ("c", "s", "ec", "es")}
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    results = []
    for merge in (False, True):
        loras = _token_gated_pair(merge, bias, n_tok, fin, fout, r)
        loras.set_token_weights(tw)
        bank = next(iter(loras.banks.values()))
        gates = {k: v.clone().requires_grad_(True) for k, v in gates0.items()}
        x = x0.clone().requires_grad_(True)
        loras.prepare(torch.float32, lambda k, b, gates=gates: {"c": gates["c"], "s": gates["s"]},
                      lambda k, b, gates=gates: {"c": gates["ec"], "s": gates["es"]})
        assert (bank._seg_w is not None) == merge and (bank._a is None) == merge
        with ctx:
            out = torch.stack([loras.layers["0"](x), loras.layers["1"](x)])
        (out.float() * torch.linspace(-1, 1, fout)).sum().backward()
        if merge:
            assert bank._segments == ((0, 4, 0), (4, 10, 1), (10, 13, 0))
            assert bank._segment_rows == ((0.0, 1.0), (1.0, 0.0))
        results.append([out.detach().float(), x.grad, bank.lora_A.grad, bank.lora_B.grad,
                        *(gates[k].grad for k in gates)])
        loras.remove()
    for ref, got in zip(*results):
        if autocast is None:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        else:
            assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999


def test_token_gated_bank_merged_per_run_checks_the_token_count():
    loras = _token_gated_pair(True, True, 5, 4, 4, 2)
    loras.set_token_weights(torch.tensor([[[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 3]))
    loras.prepare(torch.float32, None, lambda k, b: {"c": torch.ones(2, 4), "s": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="6 tokens, the token weights have 5"):
        loras.layers["0"](torch.randn(1, 6, 4))
    loras.remove()


def test_token_segments_are_runs_of_equal_rows():
    w = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0], [0.0, 1.0]]])
    assert token_segments(w) == (((0, 2, 0), (2, 3, 1), (3, 4, 2), (4, 5, 0)),
                                 ((0.0, 1.0), (1.0, 0.0), (0.5, 0.0)))


def test_bank_load_zero_pads_lower_ranks_and_zeros_missing_layers():
    """LoRABank.load: a lower-rank adapter is zero-padded (its B A unchanged), a layer left out gets no update,
    and a higher rank than the bank's is refused."""
    net = Net()
    loras = LoRASet(net, ["a", "c"], rank=3, adapters=("content",), init="zeros").inject()
    bank = next(iter(loras.banks.values()))
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 8, generator=g), torch.randn(8, 1, generator=g)
    bank.lora_A.data.normal_(generator=g)  # stale values that load must clear
    bank.load("content", {"a": (a, b)})
    out = bank.export("content")
    torch.testing.assert_close(out["a"][1] @ out["a"][0], b @ a)
    assert out["c"][0].abs().max() == 0 and out["c"][1].abs().max() == 0
    with pytest.raises(ValueError, match="rank-4"):
        bank.load("content", {"a": (torch.zeros(4, 8), torch.zeros(8, 4))})
