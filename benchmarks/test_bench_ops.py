"""pytest-benchmark suite for the interchange op (not part of the test suite).

    python -m pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-group-by=param:shape_name
"""
import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import SHAPES, make_inputs, paper_fits  # noqa: E402

from hyperdas_fast import ops  # noqa: E402
from hyperdas_fast.ops.reference import interchange_paper  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BACKENDS = [b for b in ops.available_backends(DEVICE) if not (DEVICE.type == "cpu" and b == "triton")]
SHAPE_NAMES = ["smollm2_k16", "smollm2_k64", "llama3_B8_T32"]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _impl(name):
    if name == "paper":
        return interchange_paper
    return functools.partial(ops.interchange, backend=name)


@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
@pytest.mark.parametrize("impl", BACKENDS + ["paper"])
def test_soft_forward(benchmark, shape_name, impl):
    shape = SHAPES[shape_name]
    if impl == "paper" and not paper_fits(shape, 4):
        pytest.skip("paper formulation does not fit in memory at this shape")
    args = make_inputs(shape, DTYPE, DEVICE)[:6]
    fn = _impl(impl)

    def run():
        with torch.no_grad():
            fn(*args)
        _sync()

    benchmark(run)


@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
@pytest.mark.parametrize("impl", BACKENDS + ["paper"])
def test_soft_forward_backward(benchmark, shape_name, impl):
    shape = SHAPES[shape_name]
    if impl == "paper" and not paper_fits(shape, 4):
        pytest.skip("paper formulation does not fit in memory at this shape")
    args = [a.requires_grad_() for a in make_inputs(shape, DTYPE, DEVICE)[:6]]
    grad_out = torch.randn_like(args[0])
    fn = _impl(impl)

    def run():
        for a in args:
            a.grad = None
        fn(*args).backward(grad_out)
        _sync()

    benchmark(run)


@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
@pytest.mark.parametrize("impl", BACKENDS)
def test_hard_inplace(benchmark, shape_name, impl):
    base, source, _, basis, reflect, mask, index = make_inputs(SHAPES[shape_name], DTYPE, DEVICE)

    def run():
        with torch.no_grad():
            ops.interchange_hard(base, source, index, basis, reflect, mask, inplace=True, backend=impl)
        _sync()

    benchmark(run)
