"""The launch parameter block has one description (cuflash/params_layout.py): the checked-in params.cuh is
exactly what it generates, and the compiled struct puts every field at the offset the host packs it to
(NVRTC on the CPU: the offsets come out of the PTX of a constant array, no GPU needed)."""

import re

import numpy as np
import pytest

from cuflash import params_layout
from gpu_helpers import nvrtc_available


def test_header_is_generated_from_the_table():
    """kernels_cu/attention/params.cuh equals render_header(): nobody edited it by hand, and a field added
    to the table was regenerated (python -m cuflash.params_layout)."""
    assert params_layout.header_path().read_text() == params_layout.render_header()


def test_plan_packs_the_table():
    """A plan's parameter block is the table's struct: every field lands at params_layout.OFFSETS, pointers
    left zero for the launch to fill."""
    from cuflash import launch_plan
    p = launch_plan._Block()
    p["seqlen_k"], p["softcap"], p["dv_row_stride"] = 77, 2.5, -3
    packed = p.pack()
    assert len(packed) == params_layout.DTYPE.itemsize
    row = np.frombuffer(packed, dtype=params_layout.DTYPE)[0]
    assert (row["seqlen_k"], row["softcap"], row["dv_row_stride"], row["q"]) == (77, 2.5, -3, 0)


@pytest.mark.skipif(not nvrtc_available(), reason="needs CuPy's NVRTC (the cuda12/cuda13 extra)")
def test_compiled_offsets_match_the_host():
    """Every field's offset in the compiled struct (and its size) equals params_layout.OFFSETS. NVRTC has no
    offsetof, so a probe kernel stores each member's address minus the struct's into out[i]; the compiler
    folds those to constants, which the PTX spells as `mov.u64 %rdN, value; st.global.u64 [%rdM+8i], %rdN`."""
    from cupy.cuda import nvrtc
    from cuflash import jit
    names = params_layout.NAMES
    body = "".join(f"    out[{i}] = (long long)((const char*)&p.{n} - (const char*)&p);\n" for i, n in enumerate(names))
    src = ('#include "attention/params.cuh"\n'
           'extern "C" __global__ void cf_offsets(AttentionParams p, long long* out) {\n'
           + body + f"    out[{len(names)}] = sizeof(AttentionParams);\n}}\n")
    prog = nvrtc.createProgram(src, "offsets.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["-arch=compute_80", "-std=c++17", f"-I{jit.kernel_root()}"])
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    consts = {reg: int(v) for reg, v in re.findall(r"mov\.u64\s+(%rd\d+),\s*(\d+);", ptx)}
    stored = {int(off or 0) // 8: consts[reg]
              for off, reg in re.findall(r"st\.global\.u64\s+\[%rd\d+\+?(\d*)\],\s*(%rd\d+);", ptx)}
    assert len(stored) == len(names) + 1, ptx
    assert {n: stored[i] for i, n in enumerate(names)} == params_layout.OFFSETS
    assert stored[len(names)] == params_layout.STRUCT.size
