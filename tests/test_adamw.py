"""integration/adamw.py: the Triton AdamW step against torch's AdamW (the interpreter on CPU; 16-bit
dtypes on the GPU only: the interpreter rounds fp32 to bf16 toward zero, the GPU to nearest)."""

import copy

import pytest
import torch

from integration.adamw import AdamW

_SHAPES = [(7, 5), (4097,), (0, 3), (3, 2, 9), (1,)]  # a block boundary crossed, an empty tensor
_GROUPS = [  # the second group overrides every hyperparameter
    {},
    {"lr": 3e-2, "weight_decay": 0.5, "betas": (0.8, 0.99), "eps": 1e-6},
]


_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(_DEVICE, dtype)) for s in _SHAPES]


def _grad(p, step, i):
    g = torch.Generator().manual_seed(100 * step + i)
    return torch.randn(p.shape, generator=g).to(p.device, p.dtype)


def _run(opt_cls, params, steps, skip=(), **kw):
    """``steps`` steps over two groups; parameter i gets no gradient at step s for (s, i) in ``skip``."""
    groups = [dict(_GROUPS[0], params=params[:2]), dict(_GROUPS[1], params=params[2:])]
    opt = opt_cls(groups, lr=1e-2, weight_decay=0.1, **kw)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (step, i) in skip else _grad(p, step, i)
        opt.step()
    return opt


@pytest.mark.parametrize("capturable", [False, True])
def test_triton_adamw_matches_torch_adamw_fp32(capturable):
    """capturable: the step counts on the parameters' device, the coefficients computed in the kernel."""
    ours, ref = _params(torch.float32), _params(torch.float32)
    skip = {(1, 0), (2, 3)}  # per-tensor step counts diverge
    a = _run(AdamW, ours, 4, skip, capturable=capturable)
    b = _run(torch.optim.AdamW, ref, 4, skip, foreach=False)
    assert all(
        s["step"].device == (ours[0].device if capturable else torch.device("cpu")) for s in a.state.values()
    )
    for p, q, p0 in zip(ours, ref, _params(torch.float32), strict=True):
        assert p.numel() == 0 or not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            # the step counts: on the parameters' device with capturable (torch's keeps them on the CPU)
            torch.testing.assert_close(
                a.state[p][key], b.state[q][key], rtol=1e-6, atol=1e-7, check_device=False
            )
    assert a.state[ours[0]]["step"].item() == 3 and a.state[ours[1]]["step"].item() == 4
    groups = [dict(g, capturable=False) for g in a.state_dict()["param_groups"]]
    assert groups == b.state_dict()["param_groups"]


def _reference_16bit_step(p, g, m, v, t, lr, wd, b1, b2, eps):
    """One AdamW step in fp32 from 16-bit values, each result rounded to their dtype once."""
    dtype = p.dtype
    p, g, m, v = (x.float() for x in (p, g, m, v))
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr / (1 - b1**t) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + eps)
    return p.to(dtype), m.to(dtype), v.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_adamw_16bit_computes_in_fp32_and_rounds_once(dtype):
    """Each step against the fp32 reference started from our previous state: compared over several
    steps, a state one ulp off (a contraction order) would move the next results by more (fp16's
    subnormal v = (1 - b2) g^2 turns one subnormal step into a large relative change of the update)."""
    params = _params(dtype)
    groups = [dict(_GROUPS[0], params=params[:2]), dict(_GROUPS[1], params=params[2:])]
    opt = AdamW(groups, lr=1e-2, weight_decay=0.1)
    hps = [(1e-2, 0.1, 0.9, 0.999, 1e-8)] * 2 + [(3e-2, 0.5, 0.8, 0.99, 1e-6)] * 3
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    for step in range(3):
        before = []
        for i, p in enumerate(params):
            p.grad = _grad(p, step, i)
            s = opt.state.get(p, {})
            m, v = (s[k].clone() if s else torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq"))
            before.append((p.detach().clone(), p.grad, m, v))
        opt.step()
        for p, b, hp in zip(params, before, hps, strict=True):
            s = opt.state[p]
            assert p.dtype == s["exp_avg"].dtype == s["exp_avg_sq"].dtype == dtype
            refs = _reference_16bit_step(*b, step + 1, *hp)
            for ours, ref in zip((p.detach(), s["exp_avg"], s["exp_avg_sq"]), refs, strict=True):
                # one rounding from fp32 each: a contraction order may cross a rounding boundary (one ulp)
                torch.testing.assert_close(ours, ref, rtol=ulp, atol=2**-24 if dtype == torch.float16 else 0)
                assert (ours == ref).float().mean() >= 0.97 if ref.numel() else True


def test_triton_adamw_capturable_follows_changed_hyperparameters():
    """capturable keeps each group's hyperparameters in device memory: a changed lr / betas reaches it."""
    ours, ref = _params(torch.float32), _params(torch.float32)
    a = _run(AdamW, ours, 2, capturable=True)
    b = _run(torch.optim.AdamW, ref, 2, foreach=False)
    for opt, params in ((a, ours), (b, ref)):
        opt.param_groups[1].update(lr=5e-3, betas=(0.7, 0.95))
        for i, p in enumerate(params):
            p.grad = _grad(p, 9, i)
        opt.step()
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_triton_adamw_capturable_replays_in_a_cuda_graph():
    """Three replays of a captured step() are three eager steps, bit for bit."""
    eager, graphed = _params(torch.float32), _params(torch.float32)
    a = _run(AdamW, eager, 1, capturable=True)
    b = _run(AdamW, graphed, 1, capturable=True)  # the eager step a capture needs first
    grads = [[_grad(p, s, i) for i, p in enumerate(eager)] for s in range(1, 4)]
    for p, g in zip(graphed, grads[0], strict=True):
        p.grad = g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        b.step()
    torch.cuda.current_stream().wait_stream(side)
    for step_grads in grads:
        for p, q, g in zip(eager, graphed, step_grads, strict=True):
            p.grad = g
            q.grad.copy_(g)
        a.step()
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager, graphed, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"])
    assert all(s["step"].item() == 4 for s in b.state.values())
    b.param_groups[0]["lr"] = 1.0
    with pytest.raises(RuntimeError, match="hyperparameters of group 0 changed"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            b.step()


def test_triton_adamw_state_dict_round_trips_through_torch_adamw():
    """A checkpoint of ours loads into torch's AdamW and back, and training continues identically."""
    a_params, b_params = _params(torch.float32), _params(torch.float32)
    a = _run(AdamW, a_params, 2)
    b = _run(torch.optim.AdamW, b_params, 0, foreach=False)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # loading keeps the very tensors otherwise
    c = _run(AdamW, _params(torch.float32), 0)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    assert all(c.state[p]["step"].item() == 2 for p in c.state)
    with torch.no_grad():
        for p, q in zip(b_params, a_params, strict=True):
            p.copy_(q)
    for opt, params in ((a, a_params), (b, b_params)):
        for i, p in enumerate(params):
            p.grad = _grad(p, 7, i)
        opt.step()
    for p, q in zip(a_params, b_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(amsgrad=True), "amsgrad=True"),
        (dict(maximize=True), "maximize=True"),
        (dict(lr=torch.tensor(1e-3)), "lr must be a float"),
    ],
)
def test_triton_adamw_refuses_options_it_does_not_implement(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamW(_params(torch.float32), **kw)
    AdamW(_params(torch.float32), foreach=True, amsgrad=False)  # torch's defaults spelled out are fine


def test_triton_adamw_refuses_what_its_kernel_cannot_read():
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = AdamW([p])
    p.grad = torch.randn(6, 4).t()
    with pytest.raises(ValueError, match=r"shape \(4, 6\) and its gradient must be contiguous"):
        opt.step()
    p.grad = torch.randn(4, 6).to_sparse()
    with pytest.raises(ValueError, match="must be dense, torch.float32"):
        opt.step()
    q = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    q.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="is torch.float64; the Triton step takes fp32, bf16 or fp16"):
        AdamW([q]).step()
    p.grad = torch.randn(4, 6)
    opt.state[p] = {
        "step": torch.tensor(0.0),
        "exp_avg": torch.zeros(4, 6).double(),
        "exp_avg_sq": torch.zeros(4, 6),
    }
    with pytest.raises(ValueError, match="state 'exp_avg' of the parameter of shape"):
        opt.step()
    assert torch.equal(opt.state[p]["exp_avg_sq"], torch.zeros(4, 6))  # refused before anything changed
    good = torch.nn.Parameter(torch.ones(3, device=_DEVICE))
    good.grad = torch.ones(3, device=_DEVICE)
    opt.add_param_group({"params": [good]})
    opt.param_groups.reverse()  # the good parameter first: still untouched when p is refused
    with pytest.raises(ValueError, match="state 'exp_avg'"):
        opt.step()
    assert torch.equal(good, torch.ones(3, device=_DEVICE))


def _model():
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(_DEVICE)


@pytest.mark.parametrize("capturable", [False, True])
def test_triton_adamw_step_in_backward_is_the_step_after_backward(capturable):
    """step_in_backward: backward already updates each parameter it reaches (the test sees them change
    before step()), step() updates one whose gradient was assigned by hand, one without a gradient stays,
    and after 3 steps parameters and state equal those of step() after backward, bit for bit."""
    models = [_model(), _model()]
    for m in models:
        torch.manual_seed(0)
        for p in m.parameters():
            p.data = torch.randn(p.shape, device=_DEVICE)
    extra = [torch.nn.Parameter(torch.ones(4, device=_DEVICE)) for _ in models]  # a gradient by hand
    idle = [torch.nn.Parameter(torch.ones(2, device=_DEVICE)) for _ in models]  # never a gradient
    opts = [
        AdamW([{"params": list(m.parameters())}, {"params": [e, i], "lr": 0.1}], lr=1e-2,
              capturable=capturable, step_in_backward=flag)
        for m, e, i, flag in zip(models, extra, idle, (False, True), strict=True)
    ]  # fmt: skip
    for step in range(3):
        x = torch.randn(6, 5, generator=torch.Generator().manual_seed(step)).to(_DEVICE)
        for m, e, opt, in_backward in zip(models, extra, opts, (False, True), strict=True):
            before = [p.detach().clone() for p in m.parameters()]
            m(x).square().sum().backward()
            moved = [not torch.equal(b, p) for b, p in zip(before, m.parameters(), strict=True)]
            assert all(moved) if in_backward else not any(moved)
            e.grad = torch.full_like(e, step + 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    (a, b), (ea, eb), ib = models, extra, idle[1]
    for p, q in zip([*a.parameters(), ea], [*b.parameters(), eb], strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opts[0].state[p][key], opts[1].state[q][key])
    assert opts[1].state[eb]["step"].item() == 3 and not torch.equal(eb, torch.ones(4, device=_DEVICE))
    assert torch.equal(ib, torch.ones(2, device=_DEVICE)) and ib not in opts[1].state


def test_triton_adamw_step_in_backward_refuses_a_second_backward_before_step():
    with pytest.raises(TypeError, match="step_in_backward='yes' must be a bool"):
        AdamW(_model().parameters(), step_in_backward="yes")
    m = _model()
    opt = AdamW(m.parameters(), step_in_backward=True)
    x = torch.randn(2, 5, device=_DEVICE)
    m(x).sum().backward()
    with pytest.raises(RuntimeError, match="a second backward reached the parameter of shape .* before step"):
        m(x).sum().backward()
    opt.step()
    opt.zero_grad()
    m(x).sum().backward()  # after step() the next backward steps again
