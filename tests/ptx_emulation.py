"""A numpy model of the few PTX instructions the Triton kernels' inline assembly uses, so that Triton's
interpreter (which refuses ``inline_asm_elementwise``) can run those kernels on the CPU: each asm block is
executed line by line over whole arrays of 32-bit registers. Instruction semantics follow the PTX ISA
(``lop3`` by its truth table, ``fma.rn`` on bf16x2/f16x2 halves with one round to nearest even, ``cvt``,
``add.f32``, shifts, ``mov`` including ``{lo, hi}`` unpacking). ``install()`` patches the interpreter;
``round_bf16_to_nearest_even()`` makes its fp32 -> bf16 casts round as the GPU's do."""
from __future__ import annotations

import re

import numpy as np


def _halves_to_f64(bits: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    def half(h):
        h = h.astype(np.uint32)
        if kind == "bf16":
            return (h << 16).view(np.float32).astype(np.float64)
        return h.astype(np.uint16).view(np.float16).astype(np.float64)
    return half(bits & 0xFFFF), half(bits >> 16)


def _f64_to_half(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "f16":
        return value.astype(np.float16).view(np.uint16).astype(np.uint32)
    f32 = value.astype(np.float32).view(np.uint32)      # then round to nearest even on the top 16 bits
    return ((f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16) & 0xFFFF


def _lop3(a, b, c, lut: int) -> np.ndarray:
    out = np.zeros_like(a)
    for index in range(8):
        if lut >> index & 1:
            out |= (a if index & 4 else ~a) & (b if index & 2 else ~b) & (c if index & 1 else ~c)
    return out


def run(asm: str, inputs: list[np.ndarray], outputs: int) -> list[np.ndarray]:
    """Execute ``asm`` with operands ``$0..$outputs-1`` written and the rest read from ``inputs`` (32-bit
    arrays of one shape); returns the outputs as uint32 arrays."""
    shape = np.broadcast_shapes(*(x.shape for x in inputs))
    regs = {f"${outputs + i}": np.broadcast_to(x.view(np.uint32), shape).copy() for i, x in enumerate(inputs)}

    def read(token: str) -> np.ndarray:
        token = token.strip()
        if token in regs:
            return regs[token]
        return np.full(shape, int(token, 0) & 0xFFFFFFFF, dtype=np.uint32)

    for line in asm.replace("{\n", "\n").split("\n"):
        line = line.strip().rstrip(";").strip()
        if not line or line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            (lo, hi), src = re.match(r"\{(.*)\},(.*)", rest.replace(" ", "")).group(1).split(","), rest.split("}")[1]
            value = read(src.strip(" ,"))
            regs[lo], regs[hi] = value & 0xFFFF, value >> 16
            continue
        dst, *args = [t.strip() for t in rest.split(",")]
        a = [read(t) for t in args]
        if op == "mov.b32":
            out = a[0]
        elif op == "shr.u32":
            out = a[0] >> a[1]
        elif op == "shl.b32":
            out = a[0] << a[1]
        elif op == "and.b32":
            out = a[0] & a[1]
        elif op == "lop3.b32":
            out = _lop3(a[0], a[1], a[2], int(args[3], 0))
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            kind = op.split(".")[2][:-2]
            (a0, a1), (b0, b1), (c0, c1) = (_halves_to_f64(x, kind) for x in a)
            out = _f64_to_half(a0 * b0 + c0, kind) | (_f64_to_half(a1 * b1 + c1, kind) << 16)
        elif op == "cvt.f32.f16":
            out = a[0].astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
        elif op == "add.f32":
            out = (a[0].view(np.float32) + a[1].view(np.float32)).view(np.uint32)
        else:
            raise NotImplementedError(f"PTX {op!r} is not modelled")
        regs[dst] = out.astype(np.uint32)
    return [regs[f"${i}"] for i in range(outputs)]


def install() -> None:
    """Let Triton's interpreter run ``inline_asm_elementwise`` blocks (pack 1, 32-bit operands) through ``run``."""
    from triton.runtime import interpreter

    class Call:
        def __init__(self, results):
            self.results = results

        def get_result(self, index):
            return self.results[index]

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        assert pack == 1, "only one element an instance is modelled"
        outs = run(asm, [np.asarray(v.data) for v in values], len(types))
        scalars = [getattr(t, "element_ty", t) for t in types]
        return Call([interpreter.TensorHandle(o.view(interpreter._get_np_dtype(t)), t) for o, t in zip(outs, scalars)])

    interpreter.InterpreterBuilder.create_inline_asm = create_inline_asm


def round_bf16_to_nearest_even() -> None:
    """Make the interpreter's fp32 -> bf16 casts round to nearest even, as ``cvt.rn.bf16.f32`` (what Triton
    emits for ``.to(tl.bfloat16)`` on the GPU) and torch do; the interpreter truncates, so a kernel that rounds
    a product to bf16 could not match torch bit for bit under it."""
    import triton.language as tl
    from triton.runtime import interpreter
    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16     # finite values (no NaN handling)
        return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)

    interpreter.InterpreterBuilder.cast_impl = cast_impl
