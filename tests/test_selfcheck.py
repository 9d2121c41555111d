"""The Triton self-check (sdlora_ds/kernels/selfcheck.py), run for real under TRITON_INTERPRET=1.

On CPU the guard is off (it covers compiled kernels, i.e. CUDA tensors); these tests switch it on
for CPU tensors (`_on_device`) so that the comparison really runs through the same hook the
trainer reaches (`stacked_lowrank_linear(impl='triton')`). A deliberately wrong kernel and a
kernel that fails to compile must both stop with one error line naming adapter.impl.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` (conftest sets it too)

import importlib  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from sdlora_ds.kernels import selfcheck as sc  # noqa: E402
from sdlora_ds.kernels import stacked_lowrank as sl  # noqa: E402
from sdlora_ds.kernels import triton_stacked as ts  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(ts._merge_kernel, InterpretedFunction):
    ts = importlib.reload(ts)  # imported before the variable was set: decorate the kernels again

GRADS = ("y", "grad_x", "grad_s_frozen", "grad_a_cur", "grad_b_cur", "grad_m_cur")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Every test starts with no recorded check, and the guard on for CPU (interpreter) tensors."""
    sc.reset()
    monkeypatch.setattr(sc, "_on_device", lambda x: True)
    monkeypatch.delenv("RANK", raising=False)
    yield
    sc.reset()


def layer_call(dtype=torch.float32, impl="triton"):
    """One projection call as SDLoRALinear makes it (frozen stack + a current task)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 20, generator=g).to(dtype)
    a_f, b_f = torch.randn(8, 20, generator=g).to(dtype), torch.randn(24, 8, generator=g).to(dtype)
    s_f = torch.rand(8, generator=g)
    a_c, b_c = torch.randn(4, 20, generator=g).requires_grad_(), torch.randn(24, 4, generator=g).requires_grad_()
    x = torch.randn(2, 3, 20, generator=g).to(dtype)
    return sl.stacked_lowrank_linear(x, w, None, a_f, b_f, s_f, a_c, b_c, torch.tensor(1.0), impl=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_compares_every_gradient_and_passes(dtype, capsys):
    rng = torch.random.get_rng_state()
    layer_call(dtype)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the check draws from its own generator
    (rec,) = sc.results()
    assert rec["passed"] and rec["error"] is None
    assert rec["dtype"] == sc._name(dtype) and rec["tolerance"] == sc.TOLERANCE[dtype]
    assert 0 <= rec["max_rel_diff"] <= rec["tolerance"] and rec["worst"] in rec["diffs"]
    for mode in ("merged", "unmerged"):
        for name in GRADS:
            assert f"task7/{mode}/{name}" in rec["diffs"]
    assert {"task7/merge_kernel", "task7/colsum_kernel", "task0/merge_kernel"} <= set(rec["diffs"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("kernel self-check: adapter.impl='triton' matches the reference")


def test_only_rank_0_prints(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert sc.check(torch.float32, "cpu")["passed"]
    assert capsys.readouterr().out == ""


def test_wrong_kernel_stops_with_one_line_naming_impl(monkeypatch, capsys):
    real = ts.colsum
    monkeypatch.setattr(ts, "colsum", lambda x, dy, a, b: real(x, dy, a, b) * 1.5)  # ds 50 % off
    with pytest.raises(sc.KernelSelfCheckError) as err:
        layer_call()
    msg = str(err.value)
    assert "\n" not in msg and "adapter.impl" in msg and 'set adapter.impl to "reference"' in msg
    rec = sc.results()[0]
    assert not rec["passed"] and rec["error"] == msg
    assert rec["max_rel_diff"] == pytest.approx(0.5, rel=1e-2)  # exactly what the wrong kernel did
    m = re.search(r"max relative difference ([0-9.e+-]+) in (\S+) \(tolerance", msg)
    assert m and float(m.group(1)) == pytest.approx(rec["max_rel_diff"], rel=1e-3)
    assert "grad_s_frozen" in m.group(2) or "colsum_kernel" in m.group(2)  # the tensor the bug touches
    assert capsys.readouterr().err.strip() == f"error: {msg}"  # the same line, printed once on rank 0
    # no silent fallback: the next call raises the same error again, without re-running the check
    monkeypatch.setattr(sc, "check", lambda *a, **k: pytest.fail("check ran twice"))
    with pytest.raises(sc.KernelSelfCheckError, match="adapter.impl"):
        layer_call()


def test_wrong_merge_kernel_is_caught(monkeypatch):
    """A merge that drops the last (ragged) chunk of the frozen stack: only the forward shows it."""
    real = ts.merge

    def merge_without_tail(weight, a_f, b_f, s_f, *rest):
        keep = max(0, a_f.shape[0] - 6)
        return real(weight, a_f[:keep], b_f[:, :keep], s_f[:keep], *rest)

    monkeypatch.setattr(ts, "merge", merge_without_tail)
    rec = sc.check(torch.bfloat16, "cpu")
    assert not rec["passed"] and rec["max_rel_diff"] > rec["tolerance"]
    assert "adapter.impl" in rec["error"] and f"{rec['max_rel_diff']:.3e}" in rec["error"]


def test_compile_failure_gives_the_same_one_line_error(monkeypatch):
    class BrokenKernel:  # what a kernel that does not compile on this GPU looks like to the launcher
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PassManager::run failed\n  at 12:8: tl.dot\n  more\n  and more")
            return launch

    monkeypatch.setattr(ts, "_merge_kernel", BrokenKernel())
    with pytest.raises(sc.KernelSelfCheckError) as err:
        layer_call(torch.bfloat16)
    msg = str(err.value)
    assert "\n" not in msg and "adapter.impl" in msg and 'set adapter.impl to "reference"' in msg
    assert "could not compile or run" in msg and "RuntimeError: PassManager::run failed | at 12:8: tl.dot" in msg
    assert "no difference measured" in msg and "bfloat16" in msg
    assert not sc.results()[0]["passed"] and sc.results()[0]["max_rel_diff"] is None


def test_runs_once_per_dtype(monkeypatch):
    calls = []
    real = sc.check
    monkeypatch.setattr(sc, "check", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    for dtype in (torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        layer_call(dtype)
    assert calls == [torch.float32, torch.bfloat16]
    assert sorted(r["dtype"] for r in sc.results()) == ["bfloat16", "float32"]
    assert all(r["passed"] for r in sc.results())


def test_reference_and_cpu_paths_are_not_checked(monkeypatch):
    layer_call(impl="reference")
    layer_call(impl="auto")  # CPU tensors: auto is the reference
    assert sc.results() == []
    monkeypatch.setattr(sc, "_on_device", lambda x: x.is_cuda)  # the real rule: CPU under the interpreter
    layer_call(impl="triton")
    assert sc.results() == []


def test_tf32_loosens_only_the_fp32_tolerance():
    assert sc.tolerance(torch.float32, "cuda") == sc.TOLERANCE[torch.float32]
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module, not an attribute
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert sc.tolerance(torch.float32, "cuda") == sc.TF32_TOLERANCE
        assert sc.tolerance(torch.float32, "cpu") == sc.TOLERANCE[torch.float32]
        assert sc.tolerance(torch.bfloat16, "cuda") == sc.TOLERANCE[torch.bfloat16]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
