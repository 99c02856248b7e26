"""No Numba-compiled function of nodulekit has default arguments.

Why: Numba's dispatcher finds the compiled code for a call from a fingerprint of its
arguments' types, in C. An omitted argument's fingerprint carries its type, not its value,
so once one jitted function with a default has been called, a second one's omitted
argument collides with it and every call of the second goes through Numba's Python-level
type resolution instead (numba/numba#6173, open). Measured here (numba 0.68, the 2-core
Xeon): 56-65 us a call against 0.7-0.9, holding the GIL, so the backend's two threads
waited on each other. The weight gradients made ~16 such calls a layer: in the demo's
training step, whichever of two weight-gradient kernels was called second took 1.1-1.7 ms
more a layer (a step 5-10% slower), and which one that was depended on the order the
layers first ran. Given explicitly, the same arguments cost nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nodulekit

JIT_DECORATORS = {"njit", "jit", "generated_jit", "vectorize", "guvectorize", "cfunc"}


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _jitted_functions_with_defaults(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.FunctionDef):
            continue
        jitted = any(_decorator_name(d) in JIT_DECORATORS for d in node.decorator_list)
        if jitted and (node.args.defaults or any(d is not None
                                                 for d in node.args.kw_defaults)):
            found.append(f"{filename}:{node.lineno} {node.name}")
    return found


def test_no_jitted_function_has_default_arguments():
    root = Path(nodulekit.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        found += _jitted_functions_with_defaults(path.read_text(), str(path.relative_to(root)))
    assert not found, ("Numba-compiled functions with default arguments (make them required "
                       "and pass them; see this file's docstring): " + ", ".join(found))


def test_the_check_sees_a_default():
    """The scan itself: a jitted function with a default is found, in any decorator
    spelling; a plain one, or one without defaults, is not."""
    source = (
        "import numba\nfrom numba import njit\n"
        "@njit(cache=True)\ndef a(x, y=1):\n    return x\n"
        "@numba.njit\ndef b(x, *, y=2):\n    return x\n"
        "@njit\ndef c(x, y):\n    return x\n"
        "def d(x, y=1):\n    return x\n"
    )
    found = _jitted_functions_with_defaults(source, "m.py")
    assert found == ["m.py:4 a", "m.py:7 b"]
