"""From training to deployment, on real converted models (issue 13: compile, export, ONNX,
autocast).

The models: mmaction2's I3D-NL ``ResNet3d`` (depth 50, base width 8), timm's ``resnet18`` with
``attn_layer='nl'``, a pytorchvideo model (its ResNet stem, two ``create_nonlocal`` blocks, its
ResNet head), each converted with ``nonlocal_kernels.convert``, and this library's own
``NonLocal3d``. The Non-local blocks get random weights (tests/test_convert.randomize); the
rest keeps its initialisation.

- torch.compile(fullgraph=True) of the whole model, forward and backward, in float64 and
  float32, against the unconverted model in eager mode by the tolerance rule; the attention is
  one op per block in the compiled forward and backward graphs. The compiler backend is
  ``aot_eager`` (dynamo's whole-graph capture, AOTAutograd, the ops' fakes and autograd):
  inductor's C++ code generation takes minutes per model on CI's 2 cores, and is exercised on
  a block by tests/test_conformance.py. A second and third input size compile once more, not
  twice.
- torch.export of the model (eval mode, dynamic batch and spatial sizes): one forward op node
  per block, the exported program matches eager at the export size and at another one.
- ONNX: nonlocal_kernels.onnx.export, run by ONNX Runtime: float32 within the tolerance rule
  and within 1e-5 relative of eager.
- torch.autocast: bf16 on CPU, outputs and gradients against the same model on
  backend='reference' under the same autocast by the tolerance rule (float16, CUDA and the
  float16 overflow of the naive path: tests/test_mixed_precision.py).
"""

import copy
from collections import Counter

import pytest
import torch
from torch import nn

import nonlocal_kernels as nk
import nonlocal_kernels.onnx  # noqa: F401  (loads nk.onnx)
from nonlocal_kernels import ops
from nonlocal_kernels.testing import assert_all_ok, check_close, max_abs, max_abs_diff

# The peers, onnx and onnxruntime are test dependencies (`make test` installs them); a machine
# without them (the GPU machine) skips this file, as tests/test_convert.py.
from peers import randomize
from test_convert import mmaction2_i3d_nl  # noqa: E402
from test_mixed_precision import (assert_autocast_matches_reference_path, checks,  # noqa: E402
                                  fwd_bwd, upstream)

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SOFTMAX_FWD = ops.op("nonlocal_kernels::softmax_fwd")
SOFTMAX_BWD = ops.op("nonlocal_kernels::softmax_bwd")
# A graph on the cpu backend runs its whole-batch pair where the scores fit the budget and the
# family's tiled pair above it (docs/cpu.md): one of the two ops per block, each way. An export
# holds the family's ops only.
CPU_FWD = (SOFTMAX_FWD, ops.op("nonlocal_kernels::softmax_keep_fwd"))
CPU_BWD = (SOFTMAX_BWD, ops.op("nonlocal_kernels::softmax_keep_bwd"))


# ------------------------------------------------------------------------------------------
# The models: (original, input shape, number of Non-local blocks)
# ------------------------------------------------------------------------------------------
def mmaction2_i3d():
    return mmaction2_i3d_nl(), (2, 3, 4, 64, 64), 5


def timm_resnet18():
    import timm
    model = timm.create_model("resnet18", block_args=dict(attn_layer="nl"), num_classes=3)
    return model, (2, 3, 64, 64), 8


def pytorchvideo_net():
    from pytorchvideo.layers.nonlocal_net import create_nonlocal
    from pytorchvideo.models.head import create_res_basic_head
    from pytorchvideo.models.stem import create_res_basic_stem
    model = nn.Sequential(
        create_res_basic_stem(in_channels=3, out_channels=8),
        create_nonlocal(dim_in=8, dim_inner=4, pool_size=(1, 2, 2)),
        create_nonlocal(dim_in=8, dim_inner=4),
        create_res_basic_head(in_features=8, out_features=3, pool_kernel_size=(2, 4, 4),
                              dropout_rate=0.0))
    return model, (2, 3, 2, 32, 32), 2


def ours():
    # This library's own block (nothing to convert): the same checks apply.
    model = nn.Sequential(nn.Conv3d(3, 8, 1),
                          nk.NonLocal3d(8, sub_sample=True, norm="bn", zeros_init=False,
                                        std=0.3))
    return model, (2, 3, 2, 6, 5), 1


MODELS = {"mmaction2_i3d": mmaction2_i3d, "timm_resnet18": timm_resnet18,
          "pytorchvideo": pytorchvideo_net, "ours": ours}


def build(name, small=False, std=0.3):
    """(original with random Non-local weights of ``std``, converted copy, input shape,
    blocks). ``small``: at most 32 x 32 frames (the export tests need more: see there)."""
    original, shape, blocks = MODELS[name]()
    if small:
        shape = shape[:-2] + (min(shape[-2], 32), min(shape[-1], 32))
    original = randomize(original, std)
    converted = nk.convert(copy.deepcopy(original))
    assert len(nk.converted_blocks(converted)) == (0 if name == "ours" else blocks)
    return original, converted, shape, blocks


def graph_recorder():
    """A torch.compile backend (AOTAutograd, then the graphs run eagerly) that keeps the
    forward and backward graphs it is given."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler
    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs


def count_calls(gm, targets) -> int:
    """Calls in gm's graph of any op in ``targets`` (one op or a tuple)."""
    targets = targets if isinstance(targets, tuple) else (targets,)
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


# ------------------------------------------------------------------------------------------
# 1. torch.compile(fullgraph=True) of whole models
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_whole_model_matches_eager(name, dtype):
    original, converted, shape, blocks = build(name, small=True)
    x = torch.randn(shape, dtype=torch.float64)
    dy = upstream(original, x)
    # The unconverted model in eager mode, in float64 and in the dtype under test (copies: the
    # batch norms' statistics move in training mode).
    ref64 = fwd_bwd(copy.deepcopy(original).double(), x, dy)
    lp = ref64 if dtype == torch.float64 else fwd_bwd(copy.deepcopy(original).to(dtype),
                                                      x.to(dtype), dy)
    backend, graphs = graph_recorder()
    torch._dynamo.reset()
    model = converted.to(dtype)
    # fullgraph=True: any graph break, in the peer's code or ours, is an error.
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = fwd_bwd(compiled, x.to(dtype), dy)
    assert_all_ok(checks(out, lp, ref64))
    # One graph each way; the attention of every block is one op call in it, not decomposed.
    assert len(graphs["forward"]) == 1 and len(graphs["backward"]) == 1
    assert count_calls(graphs["forward"][0], CPU_FWD) == blocks
    assert count_calls(graphs["backward"][0], CPU_BWD) == blocks


@pytest.mark.parametrize("name", ["pytorchvideo", "ours"])
def test_compile_new_input_sizes_recompile_once(name):
    # Dynamo compiles the first size statically, the second one with dynamic sizes (the ops'
    # fakes compute the shapes), and reuses that graph for a third: two compilations in all.
    original, converted, shape, blocks = build(name)
    converted.eval()
    backend, graphs = graph_recorder()
    torch._dynamo.reset()
    compiled = torch.compile(converted, fullgraph=True, backend=backend)
    n, c, t, h, w = shape
    for size in ((n, c, t, h, w), (n + 1, c, t + 2, h + 4, w + 2), (n + 2, c, t + 1, h + 6, w + 6)):
        x = torch.randn(size, dtype=torch.float64)
        with torch.no_grad():
            ref64 = copy.deepcopy(original).eval().double()(x)
            lp = original.eval()(x.float())
            out = compiled(x.float())
        assert_all_ok([check_close(out, lp, ref64, name=f"y at {tuple(size)}")])
    assert len(graphs["forward"]) == 2, "a third input size compiled again"
    dynamic = graphs["forward"][1]
    calls = [node for node in dynamic.graph.nodes if node.target in CPU_FWD]
    assert len(calls) == blocks
    # The op's output shapes are symbolic in the dynamic graph: its fake did the shape work.
    assert all(not isinstance(s, int) for s in calls[0].meta["val"][0].shape[:2])


# ------------------------------------------------------------------------------------------
# 2. torch.export
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_export_whole_model_one_op_per_block(name):
    # Non-local weights of std 0.05. mmaction2's I3D has five blocks with unscaled logits (up
    # to ~12000 at std 0.1), and the float32 error of its output through those peaked softmaxes
    # is a lottery draw by draw: at std 0.1 the exported model's error was 0.1-0.9x the rule's
    # bound at 60 of 60 seeds, but seed 1871169352 put it at 1.26x (the eager converted model
    # 0.97x, each block alone 1.00x PyTorch's error on its inputs). At std 0.05 (logits up to
    # ~3000) the same 60 draws gave 0.19-0.36x, and that seed 0.27x.
    original, converted, shape, blocks = build(name, std=0.05)
    converted.eval()
    original.eval()
    x = torch.randn(shape)
    auto = torch.export.Dim.AUTO
    dims = {0: auto, len(shape) - 2: auto, len(shape) - 1: auto}  # batch, height, width
    ep = torch.export.export(converted, (x,), dynamic_shapes=(dims,))
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and n.target == SOFTMAX_FWD]
    assert len(calls) == blocks, ep.graph
    # The batch is symbolic in the op's output: its fake computed it.
    assert not isinstance(calls[0].meta["val"][0].shape[0], int)
    # Spatial sizes past 32 (64 for the 3-D ResNet) leave no dim of size 1 at the last stage,
    # which export would specialise.
    bigger = (shape[0] + 1,) + shape[1:-2] + (shape[-2] + 32, shape[-1] + 32)
    for size in (shape, bigger):
        x = torch.randn(size, dtype=torch.float64)
        with torch.no_grad():
            ref64 = copy.deepcopy(original).double()(x)
            lp = original(x.float())
            out = ep.module()(x.float())
        assert_all_ok([check_close(out, lp, ref64, name=f"y at {tuple(size)}")])


# ------------------------------------------------------------------------------------------
# 3. ONNX, run by ONNX Runtime
# ------------------------------------------------------------------------------------------
def onnx_run(path, x: torch.Tensor, level=None) -> torch.Tensor:
    """ONNX Runtime's output for input x, with graph optimisation ``level`` (default: ORT's)."""
    options = onnxruntime.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def onnx_nodes(path) -> Counter:
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return Counter((n.domain, n.op_type) for n in model.graph.node)


def affinity_sized_values(path, N, M) -> list:
    """Names of the values of the ONNX graph (shapes inferred) with an (N, M) trailing shape:
    what the runtime materialises N x M."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    out = []
    for v in list(model.graph.value_info) + list(model.graph.output):
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if dims[-2:] == [N, M]:
            out.append(v.name)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runtime_runs_the_exported_model_like_eager(name, tmp_path):
    # Non-local weights of std 0.1 (0.3 elsewhere): with 0.3, the I3D backbone's five blocks
    # (no scale on their logits) make it so ill-conditioned that PyTorch's own float32 forward
    # of the unconverted model is up to 3e-5 relative off float64 on some inputs, ONNX
    # Runtime's up to 6 times as far: two float32 runtimes cannot agree within 1e-5 there.
    # With 0.1 every model's float32 rounding is about 1e-6 relative.
    original, converted, shape, blocks = build(name, std=0.05)
    original.eval()
    converted.eval()
    path = tmp_path / "model.onnx"
    auto = torch.export.Dim.AUTO
    dims = {0: auto, len(shape) - 2: auto, len(shape) - 1: auto}  # batch, height, width
    nk.onnx.export(converted, (torch.randn(shape),), path, dynamic_shapes=(dims,))
    nodes = onnx_nodes(path)
    # Standard operators only, one Softmax per block (nothing else in these models has one).
    assert {domain for domain, _ in nodes} == {""}, nodes
    assert nodes[("", "Softmax")] == blocks, nodes
    bigger = (shape[0] + 1,) + shape[1:-2] + (shape[-2] + 32, shape[-1] + 32)
    for size in (shape, bigger):
        x = torch.randn(size, dtype=torch.float64)
        out = onnx_run(path, x.float())
        with torch.no_grad():
            eager = converted(x.float())
            lp, ref64 = original(x.float()), copy.deepcopy(original).double()(x)
        assert_all_ok([check_close(out, lp, ref64, name=f"onnxruntime y at {tuple(size)}")])
        err = max_abs_diff(out, eager)
        assert err <= 1e-5 * max_abs(eager), f"{tuple(size)}: max|ort - eager| {err:.3e}"


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product"])
def test_onnx_of_a_block_and_what_it_materialises(mode, tmp_path):
    # Shapes: N = 9 * 7 = 63 queries, M = 4 * 3 = 12 keys (sub-sampled).
    block = nk.NonLocal2d(8, mode=mode, sub_sample=True, norm="bn", zeros_init=False,
                          std=0.3).eval()
    path = tmp_path / "block.onnx"
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    nk.onnx.export(block, (x.float(),), path)
    ref = nk.NonLocal2d(8, mode=mode, sub_sample=True, norm="bn", backend="reference").eval()
    ref.load_state_dict(block.state_dict())
    out = onnx_run(path, x.float())
    with torch.no_grad():
        lp, ref64 = ref(x.float()), copy.deepcopy(ref).double()(x)
    assert_all_ok([check_close(out, lp, ref64, name="onnxruntime y")])
    big = affinity_sized_values(path, 63, 12)
    if mode == "dot_product":
        assert big == [], big  # the reordering theta (phi^T g): nothing N x M
    else:
        assert len(big) >= 2, big  # the scores and their softmax: the cost docs/design.md states


def test_onnx_refuses_concatenation_and_names_the_way_out(tmp_path):
    block = nk.NonLocal2d(8, mode="concatenation", zeros_init=False, std=0.3).eval()
    x = torch.randn(1, 8, 5, 4)
    with pytest.raises(Exception, match="backend='reference'") as info:
        nk.onnx.export(block, (x,), tmp_path / "concat.onnx")
    assert "concatenation" in str(info.value)
    block.backend = "reference"
    nk.onnx.export(block, (x,), tmp_path / "concat.onnx")
    with torch.no_grad():
        want = block(x)
    basic = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    out = onnx_run(tmp_path / "concat.onnx", x, level=basic)
    assert max_abs_diff(out, want) <= 1e-5 * max_abs(want)


@pytest.mark.xfail(strict=True, reason="ONNX Runtime 1.32's extended graph optimisations fuse "
                   "Transpose + MatMul with a 1-D operand wrongly; when this passes, the "
                   "concatenation export's advice (ORT_ENABLE_BASIC) can go")
def test_onnxruntime_transpose_then_matmul_with_a_vector(tmp_path):
    # What the reference concatenation's theta @ w_theta becomes on a channels-first theta.
    x, w = torch.randn(2, 4, 6), torch.randn(4)

    class TransposeMatMul(nn.Module):
        def forward(self, x):
            return x.transpose(1, 2) @ w

    torch.onnx.export(TransposeMatMul(), (x,), tmp_path / "tm.onnx", dynamo=True)
    basic = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    want = x.transpose(1, 2) @ w
    assert max_abs_diff(onnx_run(tmp_path / "tm.onnx", x, level=basic), want) < 1e-5
    assert max_abs_diff(onnx_run(tmp_path / "tm.onnx", x), want) < 1e-5  # fails: ORT's bug


# ------------------------------------------------------------------------------------------
# 5. torch.autocast (bfloat16 on CPU; tests/test_mixed_precision.py has float16, CUDA and the
#    float16 overflow of the naive path)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_autocast_bf16_whole_model_matches_its_reference_path(name):
    # Non-local weights of std 0.1: with 0.3, the I3D backbone's five blocks (no scale on the
    # logits) make outputs of thousands, where bfloat16 has nothing left to compare.
    original, converted, shape, blocks = build(name, small=True, std=0.1)
    # torch 2.14.1's CPU bfloat16 weight gradient of a Conv3d with a (3, 1, 1) kernel (the
    # I3D backbone's temporal convolutions) is wrong, with or without this library: inf, NaN
    # or values of 1e23 where the float64 gradient is about 80, in the unconverted model as
    # well. Those weights' gradients are left out; every other gradient is compared.
    broken = [f"{n}.weight" for n, m in converted.named_modules()
              if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 1 and m.kernel_size[1:] == (1, 1)]
    assert_autocast_matches_reference_path(original, converted, torch.randn(shape),
                                           torch.bfloat16, skip_params=broken)
