"""Sigmoid with TVM's vectorizable ``fast_exp`` instead of libm's ``expf`` (opt-in).

TVM lowers ``sigmoid(x)`` to ``1 / (1 + exp(-x))`` with LLVM's ``exp`` intrinsic, which
LLVM turns into one scalar ``expf`` call per lane even inside a vectorized loop. In a SiLU
network (YOLOv5: ``x * sigmoid(x)`` after every convolution) that float epilogue is then the
largest cost of the int8 model (YOLOv5n W4A4 at 640: 37 of 69 ms on one AMD EPYC core).
:func:`fast_sigmoid_pass` rewrites every Relax ``sigmoid`` into ``1 / (1 + fast_exp(-x))``
(``topi.fast_exp``: range reduction and a polynomial, all vector instructions). The result
is not bit-identical to ``expf``'s (a few float32 ULPs), so a quantized SiLU output can,
rarely, land one code away; it is opt-in (``build_artifact(fast_sigmoid=True)``).
"""
from __future__ import annotations

from typing import Any

__all__ = ['fast_sigmoid_pass']


def _fast_sigmoid_te(x: Any) -> Any:
    from tvm import te, topi

    one = te.const(1.0, x.dtype)
    neg = topi.negative(x)
    return topi.divide(one, topi.add(one, topi.fast_exp(neg)))


def fast_sigmoid_pass() -> Any:
    """A Relax module pass: every float32 ``relax.sigmoid`` → ``1 / (1 + fast_exp(-x))``."""
    import tvm
    from tvm.relax import Call, Expr, PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call: Call) -> Expr:
            call = super().visit_call_(call)
            op = getattr(call.op, 'name', None)
            if op == 'relax.sigmoid' and str(call.args[0].ty.dtype) == 'float32':
                return self.builder_.call_te(_fast_sigmoid_te, call.args[0],
                                             primfunc_name_hint='fast_sigmoid')
            return call

    @tvm.transform.module_pass(opt_level=0, name='RegPTQFastSigmoid')
    def transform(mod: Any, _ctx: Any) -> Any:
        import tvm.relax

        rewriter = _Rewrite(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, tvm.relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return transform
