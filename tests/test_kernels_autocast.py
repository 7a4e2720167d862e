"""The fused ops follow autocast like F.linear: under bf16 / fp16 autocast every matmul in
swiglu_linear, linear_cross_entropy and attention (forward AND backward) takes its
operands in the autocast dtype, whatever dtype arrives (the model hands swiglu_linear
add_rms_norm's fp32 `normed` and fp32 weights), and loss and gradients match the same
computation written with plain torch ops under autocast.

Torch reference path: bf16 CPU autocast, matmul dtypes read at the aten level (after
autocast's casts) by a dispatch mode. Triton path: fp16 through the interpreter (it cannot
run bf16 dots), the dtypes of the operands every dot kernel is launched with recorded."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import cross_entropy as tri_ce
from kernels import flash_attention as tri_fa
from kernels import ops
from kernels import reference as ref
from kernels import swiglu as tri_sw
from model import GLM, GLMConfig
from tolerance import closeness

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "mv", "dot"}
# which arguments of each Triton kernel feed its tl.dot calls
DOT_OPERANDS = {(tri_sw, "_swiglu_matmul"): ("X", "W"), (tri_fa, "_attn_fwd"): ("Q", "K", "V"),
                (tri_fa, "_attn_bwd_dkdv"): ("Q", "K", "V", "DO"),
                (tri_fa, "_attn_bwd_dq"): ("Q", "K", "V", "DO")}
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


class MatmulDtypes(TorchDispatchMode):
    """Operand dtypes of every aten matmul, as they reach the kernel (after autocast)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.seen.append((func.overloadpacket.__name__,
                              {a.dtype for a in args if isinstance(a, torch.Tensor)}))
        return func(*args, **(kwargs or {}))


class _DotRecorder:
    def __init__(self, module, name, seen):
        self.module, self.name, self.seen = module, name, seen
        self.fn = getattr(module, name)

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            named = dict(zip(self.fn.arg_names, args))
            operands = DOT_OPERANDS[(self.module, self.name)]
            self.seen.append((self.name, {named[a].dtype for a in operands}))
            return launch(*args, **kwargs)
        return run


@pytest.fixture
def triton_dots(monkeypatch):
    """Records (kernel, dot operand dtypes) of every Triton dot-kernel launch."""
    seen = []
    for (module, name) in DOT_OPERANDS:
        monkeypatch.setattr(module, name, _DotRecorder(module, name, seen))
    return seen


close = closeness(TOL)


# ------------------------------------------------------------------------ the cases
# Each case: fp32 leaves (as the trainer has: fp32 parameters and an fp32 residual
# stream), the fused call, and the same computation in plain torch ops for autocast.
def swiglu_case():
    torch.manual_seed(0)  # fused and eager runs rebuild the same leaves
    x = torch.randn(3, 7, 32, requires_grad=True)
    w = (torch.randn(2 * 24, 32) / 32 ** 0.5).requires_grad_()

    def fused(mode):
        return ops.swiglu_linear(x, w, mode)

    def eager():
        gate, up = F.linear(x, w).chunk(2, dim=-1)
        return F.silu(gate) * up
    return (x, w), fused, eager


def cross_entropy_case():
    torch.manual_seed(0)  # fused and eager runs rebuild the same leaves
    h = torch.randn(21, 32, requires_grad=True)
    w = (torch.randn(96, 32) / 32 ** 0.5).requires_grad_()
    labels = torch.randint(0, 96, (21,))
    labels[::4] = -100

    def fused(mode):
        return ops.linear_cross_entropy(h, w, labels, mode=mode)

    def eager():
        return F.cross_entropy(F.linear(h, w).float(), labels, reduction="none")
    return (h, w), fused, eager


def attention_case():
    torch.manual_seed(0)  # fused and eager runs rebuild the same leaves
    b, nh, ng, s, d = 2, 4, 2, 19, 16
    q = torch.randn(b, nh, s, d, requires_grad=True)
    k = torch.randn(b, ng, s, d, requires_grad=True)
    v = torch.randn(b, ng, s, d, requires_grad=True)
    prefix = torch.tensor([0, 7])

    def fused(mode):
        return ops.attention(q, k, v, prefix, None, 0, mode)

    def eager():
        mask = ref.attention_mask(s, s, prefix, None, 0, b, q.device)
        kk, vv = (t.repeat_interleave(nh // ng, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    return (q, k, v), fused, eager


CASES = {"swiglu_linear": swiglu_case, "linear_cross_entropy": cross_entropy_case,
         "attention": attention_case}


def run(case, dtype, mode, record=None):
    """Output and leaf gradients under autocast; record: a list receiving each phase's
    (forward / backward) matmul dtypes."""
    leaves, fused, eager = CASES[case]()
    fn = eager if mode == "eager" else (lambda: fused(mode))
    gen = torch.Generator().manual_seed(1)
    torch_mm = MatmulDtypes()
    with torch_mm:
        with torch.autocast("cpu", dtype=dtype):
            out = fn()
        n_fwd = len(torch_mm.seen)
        g = torch.randn(out.shape, generator=gen)
        grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
    if record is not None:
        record.append(("forward", torch_mm.seen[:n_fwd]))
        record.append(("backward", torch_mm.seen[n_fwd:]))
    return out, grads


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_path_runs_every_matmul_in_bf16(case):
    phases = []
    out, grads = run(case, torch.bfloat16, "torch", phases)
    for phase, seen in phases:
        assert seen, f"{case} {phase}: no matmul seen"
        assert all(dts == {torch.bfloat16} for _, dts in seen), f"{case} {phase}: {seen}"
    want, want_grads = run(case, torch.bfloat16, "eager")
    assert out.dtype == want.dtype
    close(out, want, torch.bfloat16)
    for got, exp in zip(grads, want_grads):
        assert got.dtype == exp.dtype == torch.float32  # back through the casts
        close(got, exp, torch.bfloat16)


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_path_runs_every_matmul_in_fp16(case, triton_dots):
    phases = []
    out, grads = run(case, torch.float16, "triton", phases)
    dot_kernels = list(triton_dots)
    assert all(dts == {torch.float16} for _, dts in dot_kernels), dot_kernels
    for phase, seen in phases:  # the torch matmuls around the kernels (cuBLAS on a GPU)
        assert all(dts == {torch.float16} for _, dts in seen), f"{case} {phase}: {seen}"
    if case == "linear_cross_entropy":
        # the logits are a torch matmul in forward and recomputed in backward: both fp16
        assert all(seen for _, seen in phases), phases
    else:
        assert len(dot_kernels) >= 2, dot_kernels  # forward and backward dot kernels
    want, want_grads = run(case, torch.float16, "eager")
    assert out.dtype == want.dtype
    close(out, want, torch.float16)
    for got, exp in zip(grads, want_grads):
        assert got.dtype == exp.dtype == torch.float32
        close(got, exp, torch.float16)


def test_linear_cross_entropy_backward_uses_the_forward_logits():
    # the gradient is softmax - onehot of exactly the fp16 logits the loss came from
    (h, w), fused, _ = cross_entropy_case()
    labels = torch.randint(0, w.shape[0], (h.shape[0],))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = ops.linear_cross_entropy(h, w, labels, mode="triton")
    dh, = torch.autograd.grad(loss.sum(), (h,))
    logits = (h.half() @ w.half().t()).float()
    dlogits = (torch.softmax(logits, -1) - F.one_hot(labels, w.shape[0])).half()
    want = (dlogits @ w.half()).float()
    assert torch.allclose(loss, F.cross_entropy(logits, labels, reduction="none"),
                          atol=1e-5, rtol=1e-5)
    close(dh, want, torch.float16)


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_without_autocast_nothing_is_cast(mode):
    # fp32 stays exactly the op it was: the dispatch adds no cast, no copy
    (x, w), fused, _ = swiglu_case()
    want = ref.swiglu_linear(x, w) if mode == "torch" else tri_sw.swiglu_linear(x, w)
    assert torch.equal(fused(mode), want)
    (q, k, v), fused, _ = attention_case()
    prefix = torch.tensor([0, 7])
    want = (ref.attention(q, k, v, prefix) if mode == "torch" else
            tri_fa.attention(q, k, v, prefix))
    assert torch.equal(fused(mode), want)


def test_linear_cross_entropy_without_autocast_nothing_is_cast():
    h = torch.randn(9, 16)
    w = torch.randn(40, 16)
    labels = torch.randint(0, 40, (9,))
    assert torch.equal(ops.linear_cross_entropy(h, w, labels, mode="torch"),
                       ref.linear_cross_entropy(h, w, labels))
    assert torch.equal(ops.linear_cross_entropy(h, w, labels, mode="triton"),
                       tri_ce.linear_cross_entropy(h, w, labels))


def test_model_under_bf16_autocast_runs_every_matmul_in_bf16():
    # the whole block: qkv / dense / down are nn.Linear, the fused FFN gets add_rms_norm's
    # fp32 `normed`, the head's linear-CE the final norm's fp32 output
    model = GLM.build(GLMConfig.preset("tiny", kernels="torch"), seed=0)
    ids = torch.randint(0, 1024, (2, 12))
    rec = MatmulDtypes()
    with rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).mean()
        n_fwd = len(rec.seen)
        loss.backward()
    layers = model.config.num_layers
    # per layer qkv, 2 attention, dense, fused gate/up, down; plus the head
    assert n_fwd >= 6 * layers + 1, rec.seen[:n_fwd]
    assert len(rec.seen) > n_fwd
    wrong = [s for s in rec.seen if s[1] != {torch.bfloat16}]
    assert not wrong, wrong
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def _vocab_parallel_worker(rank, world):
    import torch.distributed as dist

    from engine.tensor_parallel import vocab_parallel_linear_cross_entropy
    torch.manual_seed(0)
    h = torch.randn(10, 16, requires_grad=True)
    w_full = (torch.randn(32, 16) / 4).requires_grad_()
    labels = torch.randint(0, 32, (10,))
    labels[::3] = -100
    w = w_full.detach().chunk(world)[rank].clone().requires_grad_()
    rec = MatmulDtypes()
    with rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = vocab_parallel_linear_cross_entropy(h, w, labels, dist.group.WORLD,
                                                       rank * (32 // world))
        n_fwd = len(rec.seen)
        dh, dw = torch.autograd.grad(loss.sum(), (h, w))
    dist.all_reduce(dh)  # the head's partial d hidden, summed as the region entry would
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w_full).float(), labels, reduction="none")
    want_dh, want_dw = torch.autograd.grad(want.sum(), (h, w_full))
    return dict(fwd=rec.seen[:n_fwd], bwd=rec.seen[n_fwd:], pairs=[
        (loss, want), (dh, want_dh), (dw, want_dw.chunk(world)[rank])])


def test_vocab_parallel_linear_cross_entropy_follows_autocast():
    from dist import run_workers
    for res in run_workers(_vocab_parallel_worker, 2, timeout=90):
        for phase in ("fwd", "bwd"):
            assert res[phase] and all(d == {torch.bfloat16} for _, d in res[phase]), res
        for got, want in res["pairs"]:
            assert got.dtype == want.dtype
            close(got, want, torch.bfloat16)
