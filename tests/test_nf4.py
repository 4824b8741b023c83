"""Our NF4 against the installed bitsandbytes 0.50 on CPU: bit-exact quantization, NF4Linear, state dicts."""

import json
import logging
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qdylora_cli.errors import QdyloraError
from qdylora_cli.quant import NF4_CODE, NF4Linear, NF4State, dequantize_nf4, import_bitsandbytes, quantize_nf4
from qdylora_cli.quant.nf4 import dynamic_map

bnb = import_bitsandbytes()
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")  # only the comparisons

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 172×64: bnb's CPU matmul fails on width 172; 64×96: its CPU dequantize kernel is wrong there.
SHAPES = [(172, 64), (64, 172), (7, 64), (33, 128), (64, 96), (1, 64), (512, 1024)]


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bytes (so -0.0 != 0.0, unlike torch.equal)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def bnb_quantize(w: torch.Tensor, double_quant: bool, blocksize: int = 64):
    return bnb.functional.quantize_4bit(
        w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )


def bnb_dequantize(packed: torch.Tensor, qs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """bnb's dequantize_4bit (to `dtype`, default the weight's), asked for whole blocks per row.

    Its CPU kernel indexes absmax per row (wrong when a row is not whole blocks, e.g. width 96);
    its CUDA kernel and its own pure-torch fallback use flat blocks, as we do.
    """
    flat = bnb.functional.QuantState(
        absmax=qs.absmax,
        shape=torch.Size((qs.shape.numel() // qs.blocksize, qs.blocksize)),
        code=qs.code,
        blocksize=qs.blocksize,
        quant_type="nf4",
        dtype=dtype or qs.dtype,
        offset=qs.offset,
        state2=qs.state2,
    )
    return bnb.functional.dequantize_4bit(packed, flat).view(qs.shape)


def assert_matches_bnb(w: torch.Tensor, double_quant: bool, blocksize: int = 64) -> NF4State:
    packed, qs = bnb_quantize(w, double_quant, blocksize)
    state = quantize_nf4(w, blocksize, double_quant)
    assert_bits_equal(state.packed, packed)
    assert_bits_equal(state.absmax, qs.absmax)
    assert_bits_equal(NF4_CODE, qs.code)
    if double_quant:
        assert_bits_equal(state.nested_absmax, qs.state2.absmax)
        assert_bits_equal(dynamic_map(), qs.state2.code)
        assert state.nested_offset == qs.offset.item()
    else:
        assert state.nested_absmax is None and qs.state2 is None
    if blocksize >= 2048:
        return state  # bnb's CPU dequantize hands these to a torch.compile'd fallback: too slow for a test
    expected = bnb_dequantize(packed, qs)
    assert_bits_equal(dequantize_nf4(state, backend="torch"), expected)
    assert_bits_equal(dequantize_nf4(state, backend="bnb"), expected)
    for dtype in DTYPES:  # straight to another dtype: one rounding, as bnb's matmul does
        assert_bits_equal(dequantize_nf4(state, dtype, backend="torch"), bnb_dequantize(packed, qs, dtype))
        assert_bits_equal(dequantize_nf4(state, dtype), bnb_dequantize(packed, qs, dtype))
    return state


# --- code books -------------------------------------------------------------------------------


@needs_bnb
def test_code_books_match_bitsandbytes():
    assert_bits_equal(NF4_CODE, bnb.functional.get_4bit_type("nf4", device="cpu"))
    assert_bits_equal(dynamic_map(), bnb.functional.create_dynamic_map())


# --- quantize / dequantize bit-exactness ------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bit_exact_random(shape, dtype, double_quant):
    torch.manual_seed(hash((shape, double_quant)) % 1000)
    assert_matches_bnb((torch.randn(shape) * 0.02).to(dtype), double_quant)


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_exact_special_blocks(dtype, double_quant):
    """Ties on midpoints, zeros, all-equal blocks, an all-zero block, tiny and huge ranges."""
    torch.manual_seed(1)
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    blocks = [
        torch.zeros(64),
        torch.full((64,), 0.5),
        torch.full((64,), -3.0),
        torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.zeros(64 - 31)]),  # exact ties
        torch.cat(
            [torch.tensor([-2.0]), 2 * midpoints, 2 * midpoints.nextafter(torch.tensor(1.0)), torch.zeros(33)]
        ),
        torch.randn(64) * 1e-6,
        torch.randn(64) * 1e3,
        torch.randint(-2, 3, (64,)).float(),  # many equal values
    ]
    w = torch.cat([torch.cat(blocks), torch.randn(64 * 300)]).view(-1, 128)
    assert_matches_bnb(w.to(dtype), double_quant)


@needs_bnb
def test_bit_exact_when_all_blocks_share_one_absmax():
    """absmax - mean(absmax) is all zero: every nested 256-group is zero (bnb writes code 0)."""
    w = torch.randn(600, 64).clamp(-0.9, 0.9)
    w[:, 0] = 1.0
    state = assert_matches_bnb(w, double_quant=True)
    assert state.nested_absmax.eq(0).all()


@needs_bnb
@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 2048, 4096])
def test_bit_exact_other_blocksizes(blocksize):
    torch.manual_seed(blocksize)
    assert_matches_bnb(torch.randn(64, 512).to(torch.bfloat16), double_quant=True, blocksize=blocksize)


# --- errors -----------------------------------------------------------------------------------------


def test_shape_not_a_multiple_of_the_blocksize_is_a_one_line_error():
    with pytest.raises(QdyloraError) as err:
        quantize_nf4(torch.randn(3, 5))
    message = str(err.value)
    assert "(3, 5)" in message and "64" in message and "\n" not in message
    with pytest.raises(QdyloraError, match=r"\(5, 3\)"):
        NF4Linear(3, 5)


def test_bad_blocksize_dtype_and_values_are_errors():
    with pytest.raises(QdyloraError, match="blocksize"):
        quantize_nf4(torch.randn(8, 64), blocksize=48)
    with pytest.raises(QdyloraError, match="float64"):
        quantize_nf4(torch.randn(8, 64, dtype=torch.float64))
    w = torch.randn(8, 64)
    w[3, 5] = float("nan")
    with pytest.raises(QdyloraError, match="NaN"):
        quantize_nf4(w)
    with pytest.raises(ValueError, match="backend"):
        dequantize_nf4(quantize_nf4(torch.randn(8, 64)), backend="cuda")


# --- NF4Linear -------------------------------------------------------------------------------------


def make_linear(in_features=128, out_features=64, bias=True, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def bnb_linear(linear: nn.Linear, double_quant: bool, compute_dtype: torch.dtype):
    """bnb.nn.Linear4bit quantized from the same weights (left in training mode: eval mode on an
    AVX512-BF16 CPU repacks the weight for a different, approximate kernel)."""
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    weight = linear.weight.detach().clone()
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=double_quant, quant_type="nf4", module=layer
    ).to("cpu")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def bnb_linear_from_state_dict(sd: dict, in_features: int, out_features: int, compute_dtype: torch.dtype):
    """Load a Linear4bit checkpoint the way transformers does (Linear4bit has no load hook of its own)."""
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias="bias" in sd, compute_dtype=compute_dtype, quant_type="nf4"
    )
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    if "bias" in sd:
        layer.bias = nn.Parameter(sd["bias"].clone(), requires_grad=False)
    return layer


@needs_bnb
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_matches_dequantized_matmul_and_bitsandbytes(compute_dtype, bias):
    linear = make_linear(bias=bias)
    layer = NF4Linear.from_linear(linear, compute_dtype=compute_dtype)
    assert (layer.in_features, layer.out_features) == (128, 64)
    x = torch.randn(3, 5, 128, dtype=compute_dtype)
    w = layer.dequantize()
    assert w.shape == (64, 128) and w.dtype == compute_dtype
    b = None if layer.bias is None else layer.bias.to(compute_dtype)
    expected = x.float() @ w.float().T + (0 if b is None else b.float())
    tolerance = 1e-5 if compute_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(layer(x).float(), expected, rtol=tolerance, atol=tolerance)
    assert_bits_equal(layer(x), F.linear(x, w, b))
    assert_bits_equal(layer(x), bnb_linear(linear, True, compute_dtype)(x))


def test_forward_on_a_width_bitsandbytes_cannot_multiply():
    layer = NF4Linear.from_linear(make_linear(172, 64), compute_dtype=torch.float32)
    x = torch.randn(4, 172)
    assert_bits_equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_input_gradient_and_no_weight_gradient(compute_dtype):
    layer = NF4Linear.from_linear(make_linear(), compute_dtype=compute_dtype)
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(6, 128, dtype=compute_dtype, requires_grad=True)
    grad_out = torch.randn(6, 64, dtype=compute_dtype)
    layer(x).backward(grad_out)

    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, layer.dequantize(), layer.bias.to(compute_dtype)).backward(grad_out)
    assert_bits_equal(x.grad, x_ref.grad)
    assert all(t.grad is None for t in [*layer.buffers(), *layer.parameters()])


def test_trainable_bias_gets_its_gradient():
    layer = NF4Linear.from_linear(make_linear(), compute_dtype=torch.float32)
    layer.bias.requires_grad_(True)
    grad_out = torch.randn(2, 3, 64)
    layer(torch.randn(2, 3, 128)).backward(grad_out)
    torch.testing.assert_close(layer.bias.grad, grad_out.sum((0, 1)))


@pytest.mark.parametrize("shape", [(96, 256), (64, 96), (48, 172)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_slab_by_slab_matmuls_match_the_whole_weight(monkeypatch, shape):
    """Forward (slabs of rows) and backward (slabs of columns, or whole W when rows straddle blocks)."""
    monkeypatch.setattr("qdylora_cli.quant.linear._SLAB", 2048)
    layer = NF4Linear.from_linear(make_linear(shape[1], shape[0]), compute_dtype=torch.float32)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 7, shape[1], requires_grad=True)
    grad_out = torch.randn(2, 7, shape[0])
    layer(x).backward(grad_out)

    x_ref = x.detach().clone().requires_grad_()
    bias_ref = layer.bias.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, layer.dequantize(), bias_ref)
    y_ref.backward(grad_out)
    torch.testing.assert_close(layer(x), y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.bias.grad, bias_ref.grad)


def saved_for_backward(fn) -> list[torch.Tensor]:
    """Every tensor autograd saves while fn() runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("pass_weight", [False, True])
def test_graph_holds_no_float_weight(pass_weight):
    layer = NF4Linear.from_linear(make_linear(256, 128), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    w = layer.dequantize() if pass_weight else None
    saved, out = saved_for_backward(lambda: layer(x, weight=w))
    assert saved, "the packed weight should be saved"
    assert all(t.dtype == torch.uint8 or t.numel() < 256 * 128 // 8 for t in saved), [
        (t.dtype, tuple(t.shape)) for t in saved
    ]
    if pass_weight:
        assert_bits_equal(out, layer(x))
        alive = weakref.ref(w)
        del w
        assert alive() is None, "the graph must not keep the weight passed to forward"
    out.sum().backward()
    assert x.grad is not None


def test_weight_that_needs_grad_is_refused():
    layer = NF4Linear.from_linear(make_linear())
    with pytest.raises(ValueError, match="frozen"):
        layer(torch.randn(2, 128), weight=layer.dequantize().requires_grad_())


def test_buffers_move_and_statistics_stay_float32():
    for double_quant in (True, False):
        layer = NF4Linear.from_linear(make_linear(), double_quant=double_quant)
        before = layer.dequantize()
        layer.to(torch.float16)
        assert layer.bias.dtype == torch.float16
        stats = [layer.absmax] + ([layer.nested_absmax] if double_quant else [])
        assert all(
            t.dtype == (torch.uint8 if t is layer.absmax and double_quant else torch.float32) for t in stats
        )
        assert_bits_equal(layer.dequantize(), before)
        layer.to("meta")
        assert all(t.is_meta for t in [*layer.buffers(), *layer.parameters()])


# --- state dicts -----------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_is_bitsandbytes_layout(double_quant, bias):
    linear = make_linear(bias=bias, dtype=torch.bfloat16)
    ours = NF4Linear.from_linear(linear, double_quant=double_quant).state_dict()
    theirs = bnb_linear(linear, double_quant, torch.bfloat16).state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert_bits_equal(ours[key], theirs[key])
    info = json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert info["dtype"] == "bfloat16" and info["shape"] == [64, 128]


@needs_bnb
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_checkpoint_loads_into_nf4linear(double_quant, bias):
    linear = make_linear(bias=bias)
    theirs = bnb_linear(linear, double_quant, torch.float32)
    ours = NF4Linear(128, 64, bias=bias, compute_dtype=torch.float32, double_quant=not double_quant)
    ours.load_state_dict(theirs.state_dict())  # strict; the checkpoint's double_quant wins
    assert (ours.nested_absmax is not None) == double_quant
    assert_bits_equal(
        dequantize_nf4(ours.state), bnb.functional.dequantize_4bit(theirs.weight, theirs.quant_state)
    )
    x = torch.randn(5, 128)
    assert_bits_equal(ours(x), theirs(x))


@needs_bnb
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4linear_checkpoint_loads_into_bitsandbytes(double_quant, bias):
    ours = NF4Linear.from_linear(
        make_linear(bias=bias), double_quant=double_quant, compute_dtype=torch.bfloat16
    )
    theirs = bnb_linear_from_state_dict(ours.state_dict(), 128, 64, torch.bfloat16)
    assert_bits_equal(
        bnb.functional.dequantize_4bit(theirs.weight, theirs.quant_state), dequantize_nf4(ours.state)
    )
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    assert_bits_equal(theirs(x), ours(x))
    again = NF4Linear(128, 64, bias=bias)
    again.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_bad_checkpoints_are_refused():
    sd = NF4Linear.from_linear(make_linear()).state_dict()
    with pytest.raises(QdyloraError, match="64×256"):
        NF4Linear(256, 64).load_state_dict(sd)
    fp4 = dict(sd)
    info = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    fp4["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(
        list(json.dumps({**info, "quant_type": "fp4"}).encode())
    )
    with pytest.raises(QdyloraError, match="fp4"):
        NF4Linear(128, 64).load_state_dict(fp4)
    with pytest.raises(RuntimeError, match="weight.absmax"):
        NF4Linear(128, 64).load_state_dict({k: v for k, v in sd.items() if k != "weight.absmax"})


@pytest.mark.parametrize("double_quant, bits", [(True, 4.127), (False, 4.5)])
def test_bits_per_parameter(double_quant, bits):
    """weight + absmax + nested_absmax bytes; the 16/256-entry code maps, the JSON and the bias are fixed costs."""
    layer = NF4Linear.from_linear(nn.Linear(2048, 1024, bias=False), double_quant=double_quant)
    sd = layer.state_dict()
    counted = ["weight", "weight.absmax"] + (["weight.nested_absmax"] if double_quant else [])
    stored = sum(sd[k].numel() * sd[k].element_size() for k in counted)
    assert round(8 * stored / (2048 * 1024), 3) == bits


# --- the bitsandbytes import helper ---------------------------------------------------------------


def test_import_bitsandbytes_is_quiet_and_optional(monkeypatch, tmp_path, caplog):
    # A stand-in package that logs what bitsandbytes' CPU backend logs without `kernels`.
    (tmp_path / "bitsandbytes").mkdir()
    (tmp_path / "bitsandbytes" / "__init__.py").write_text(
        "import logging\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('No module named kernels')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    with caplog.at_level(logging.DEBUG):
        module = import_bitsandbytes.__wrapped__()
    assert module.__file__.startswith(str(tmp_path))
    assert not caplog.records
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.NOTSET

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    assert import_bitsandbytes.__wrapped__() is None
