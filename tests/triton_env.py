"""Can triton's CPU interpreter run here? (Needed by the CPU runs of the Triton kernels.)

triton 3.6's interpreter turns integer kernel arguments into 1-element arrays and
`int()`s them for a loop bound, which NumPy >= 2.4 refuses ("only 0-dimensional
arrays can be converted to Python scalars"); triton 3.8 works. The probe runs a
trivial kernel of its own, not ours, so a broken kernel of ours still fails its tests.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

_PROBE = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, triton, triton.language as tl

    @triton.jit
    def total(X, n):
        acc = tl.load(X)
        for i in range(1, n):  # a runtime loop bound, as in our kernels
            acc += tl.load(X + i)
        tl.store(X, acc)

    x = torch.ones(4)
    total[(1,)](x, 4)
    assert x[0].item() == 4.0, x
""")


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """None when the interpreter works here, else a one-line reason to skip. With
    TRANSNEXT_REQUIRE_TRITON_INTERPRETER=1 (scripts/test.sh, so CI) a failing probe is an
    error instead: there the kernels' CPU tests must run."""
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                       timeout=300)
    if r.returncode == 0:
        return None
    lines = (r.stderr or r.stdout).strip().splitlines()
    import numpy
    import triton
    why = (f"triton {triton.__version__}'s CPU interpreter cannot run a trivial kernel with "
           f"numpy {numpy.__version__} here: {lines[-1] if lines else r.returncode}")
    if os.environ.get("TRANSNEXT_REQUIRE_TRITON_INTERPRETER") == "1":
        raise RuntimeError(why + " (TRANSNEXT_REQUIRE_TRITON_INTERPRETER=1)")
    return why


def run_in_interpreter(test_file: str, flag: str, interpret: bool = True) -> None:
    """Run ``test_file``'s tests in a child pytest with TRITON_INTERPRET=1 (and ``flag``=1, so
    the child does not recurse): for CPU cases whose module found triton imported without
    the interpreter (triton picks interpreted or compiled kernels at ``import triton``).
    ``interpret=False``: the child runs without the interpreter (what compiling needs)."""
    env = dict(os.environ, **{flag: "1"})
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        test_file], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
