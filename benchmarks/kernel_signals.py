"""Kernel signals, ahead of time: what XLA's real TPU compiler makes of each attention kernel.

No TPU is needed: libtpu compiles for a compile-only TPU v5p topology on this CPU (as
lctx_jax.aot does) and dumps every Mosaic kernel it builds. Per kernel (forward, dq, dk/dv of
one training step: `jax.vjp` of the attention), compared at the same shapes and blocks:

  jax_flash    (baseline) jax.experimental.pallas.ops.tpu.flash_attention, causal, all block
               sizes = blk; MHA (it takes no GQA), H = 8
  splash       splash_attention.make_splash_mha with a CausalMask, all blocks = blk; GQA 8:2
  lctx         lctx_jax.attention.flash.attend(..., rope=RoPE θ=5e5 over the whole head,
               backend="tpu", block_q = block_k = blk): RoPE fused in the kernel; GQA 8:2
  lctx_norope  the same kernel with rope=None (its cost without the rotation)

Shapes: B = 1, causal, bf16 q, k, v [B, T, H, D] (heads-major [B, H, T, D] for jax_flash,
[H, T, D] for splash), positions arange(T).

Signals, lowest level first:

LLO (libtpu flags --xla_jf_dump_to + --xla_jf_dump_llo_text; the final VLIW bundles after
scheduling and register allocation, what the TensorCore runs). Counted statically over the body
of the grid loop, i.e. per grid step, with the ops of an inner loop that Mosaic did not unroll
multiplied by its trip count; "block step" leaves out the conditional regions that hold vector
work but no matmul (the pl.when(first kv block) init and pl.when(last kv block) finalize, run
once per row of the grid; their bundles are reported as "row"). A computed block of a causal
diagonal costs the block step; a skipped block only its unconditional part (DMA, scalars).
  bundles   VLIW bundles: the static schedule length, ~cycles per step without stalls
  vmatmul   MXU pushes (one vreg of LHS rows into a systolic array; `vmatmul.*`), the unit
            everything is normalised by ("/push"); vmatpush (weight loads) counted apart
  valu      vector ALU ops (everything vector that is not MXU, XLU, EUP, load/store or a FIFO
            pop): arithmetic, selects, compares, converts, packs; sin/cos are VALU
            polynomials with integer range reduction, not EUP ops
  xlu       cross-lane unit ops (`*.xlu*`: lane rotates = pltpu.roll, permutes, transposes,
            lane reductions): where relayouts and row max / sum go
  eup       transcendental unit ops (vpow2 = exp, vrcp, vlog2, vrsqrt, vtanh, ...)
  vld, vst  vector loads / stores (VMEM), without the register spills; spill = spill stores
            + fill loads of vregs (vector register pressure)
  salu      scalar ops (address and index math, block-skip predicates, SMEM loads)
  dma       DMA issue sites (HBM<->VMEM/SMEM block copies of the pipeline), static: Mosaic
            may emit a window's prefetch in several predicated variants of which one runs, and
            issues a copy only when the block index changes
LLO ops carry the Python source line they came from (--xla_mosaic_enable_llo_source_annotations);
the attribution table sums the block step's valu + xlu + eup ops per source function ("no
source line": register copies, materialised constants, spill code). Each case compiles in a
fresh process, since ops without a line of their own can otherwise show the line of an
identical op compiled earlier in the process; within one training step that still happens
(e.g. the dq kernel's exp(s - lse) may show the forward's exp(s - m) line in fold), so read
the attribution by family (RoPE, mask, softmax), not line by line.

Mosaic MLIR (--xla_mosaic_dump_to, one file per pass), the whole kernel body, statically:
  after apply-vector-layout (ops on single vregs): sin + cos, exp + log, lane moves
  (tpu.rotate / dynamic_rotate / gather / dynamic_gather), sublane broadcasts;
  after relayout-insertion: tpu.relayout ops that move data (offset, tiling or implicit-dim
  changes; materialising a replicated value is left out).
Also: VMEM (the kernel's scoped VMEM allocations: block windows double-buffered, scratch,
internal scratch), "in VMEM" (operands XLA's memory-space assignment placed whole in VMEM:
they need no window and no per-step DMA, so VMEM and dma are comparable only between kernels
with the same count; it varies with T), and whether the kernel declares a cost_estimate (the
HLO custom call's backend config, which XLA schedules around the opaque call with).

Ratios ("x base") divide a kernel's per-push figure by jax_flash's at the same direction, T, D
and blk. Static counts are neither time nor a profile: they say where the VLIW slots go.

GPU sm_90 (--triton-python PY): jaxlib's Pallas Triton lowering (`lower(lowering_platforms=
("cuda",))`, no GPU) gives each kernel's TTIR (the `__gpu$xla.gpu.triton` custom call's IR);
the Triton of interpreter PY (a separate venv: `python -m venv /tmp/triton && /tmp/triton/bin/pip
install triton==3.9.0`; never the repo's venv) compiles it to PTX for sm_90a, and the ptxas its
wheel bundles (`ptxas -v`) gives registers, spill bytes and stack frame; the PTX gives static
counts of cp.async (Ampere-style async copies), cp.async.bulk (TMA), wgmma / mma.sync (tensor
cores), ldmatrix and ex2 (exp; a sin or cos is libdevice arithmetic, not one instruction), and
Triton's shared memory. Kernels: jax_mha (baseline,
jax.experimental.pallas.ops.gpu.attention.mha: fwd, fused bwd, delta) and lctx / lctx_norope
(attend(backend="gpu")), each with its own default blocks and warps. Caveat: XLA compiles the
custom call with its own Triton fork, whose passes may differ from the pip release's.

Run:  python benchmarks/kernel_signals.py [--lengths 4096,16384] [--head-dims 128,64]
          [--blocks 128,512] [--impls jax_flash,lctx] [--triton-python PY] [--json out.json]
Another checkout's lctx_jax (before / after a kernel change): PYTHONPATH=/that/checkout.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from common import run_child, save_run  # noqa: E402

BASELINE = "jax_flash"
IMPLS = (BASELINE, "splash", "lctx", "lctx_norope")
DIRECTIONS = ("fwd", "dq", "dkv")
TOPOLOGY = "v5p:2x2x1"  # the smallest v5p topology libtpu builds; kernels compile per chip
BATCH, HEADS, KV_HEADS = 1, 8, 2
ROPE_THETA = 500000.0
LLO_COUNTS = ("bundles", "vmatmul", "vmatpush", "valu", "xlu", "eup", "vld", "vst", "spill",
              "salu", "dma")
MOSAIC_COUNTS = ("sincos", "explog", "lane_moves", "sublane_bcast", "relayouts")
GPU_HOW = ("pass --triton-python PY, a Python with `pip install triton==3.9.0` in its own venv "
           "(not this one), for sm_90 registers, spills and PTX counts")
LIBTPU_FLAGS = ("--xla_jf_dump_to={llo} --xla_jf_dump_llo_text=true "
                "--xla_jf_dump_llo_pass_label_regex=final "
                "--xla_mosaic_enable_llo_source_annotations=true --xla_mosaic_dump_to={mosaic}")


@dataclasses.dataclass(frozen=True)
class Case:
    impl: str
    seq_len: int
    head_dim: int
    block: int


# ----------------------------------------------------------------------------- LLO parsing

_BUNDLE = re.compile(r"^\s*(?:0x[0-9a-f]+|\d+)\s+(?:[A-Z]{2})?\s*:\s*(>*)\s*\{")
_MNEMONIC = re.compile(r"^\s*(?:%\w+\s*=\s*)?([a-z_][\w.]*)")
_LOC = re.compile(r'loc\("([^"]+)":(\d+):')
_REGION_START = re.compile(r"(?:Start|Start/End empty) region (\d+)")
_BRANCH = re.compile(r"sbr\.rel\s*\((!?)%(\w+)\).*?target = \$region(\d+)", re.DOTALL)
_EUP = {"vpow2", "vrcp", "vlog2", "vrsqrt", "vtanh", "vexp", "vsqrt", "vsigmoid", "verf",
        "vsin", "vcos"}


def op_class(mnemonic: str, text: str) -> str:
    """The unit an LLO op runs on, by its mnemonic (see the module docstring)."""
    base = mnemonic.split(".")[0]
    if base == "vmatmul":
        return "vmatmul"
    if base == "vmatpush":
        return "vmatpush"
    if base == "vpop" or base.startswith(("vsync", "vpush")):
        return "other"
    if base in ("vld", "vst", "vstv") or base.startswith(("vld", "vst")):
        return "spill" if "_spill" in text else ("vld" if base.startswith("vld") else "vst")
    if ".xlu" in mnemonic or base == "vxpose":
        return "xlu"
    if base in _EUP:
        return "eup"
    if base == "dma":
        return "other" if ".done" in mnemonic else "dma"
    if base.startswith("v"):
        return "valu"
    if base.startswith(("s", "p", "int_to_ptr")):
        return "salu"
    return "other"


@dataclasses.dataclass
class Bundle:
    depth: int                       # loop nesting ('>' markers of the dump)
    ops: list[tuple[str, str]]       # (class, source "file:line" or "")
    starts: list[int]                # regions that start here
    branch: tuple[str, int] | None   # (predicate register, target region)
    text: str


def parse_bundles(text: str) -> list[Bundle]:
    chunks, current = [], None
    for line in text.splitlines():
        if _BUNDLE.match(line):
            if current is not None:
                chunks.append(current)
            current = line
        elif current is not None:
            current += "\n" + line
    if current is not None:
        chunks.append(current)
    bundles = []
    for chunk in chunks:
        depth = len(_BUNDLE.match(chunk).group(1))
        body = chunk[chunk.index("{") + 1:chunk.rindex("}")]
        ops = []
        for part in body.split(";;"):
            match = _MNEMONIC.match(part)
            if match:
                loc = _LOC.search(part)
                ops.append((op_class(match.group(1), part),
                            f"{loc.group(1)}:{loc.group(2)}" if loc else ""))
        branch = _BRANCH.search(body)
        bundles.append(Bundle(depth, ops, [int(n) for n in _REGION_START.findall(chunk)],
                              (branch.group(2), int(branch.group(3))) if branch else None,
                              chunk))
    return bundles


def _trip_count(bundles: list[Bundle], start: int, end: int, predicate: str) -> int | None:
    """The constant bound of the compare that sets a loop's back-edge predicate."""
    pattern = re.compile(rf"%{predicate}\s*=\s*scmp\.\w+\.s32\S*\s+%\w+,\s*(\d+)")
    for bundle in bundles[start:end + 1]:
        match = pattern.search(bundle.text)
        if match:
            return int(match.group(1))
    return None


def step_signals(bundles: list[Bundle]) -> dict[str, Any]:
    """Per-grid-step counts of a kernel's final bundles (see the module docstring)."""
    region_at = {}
    for index, bundle in enumerate(bundles):
        for region in bundle.starts:
            region_at.setdefault(region, index)
    loops, spans = [], []  # loops: (start, end, trip); spans: forward-branch bodies
    for index, bundle in enumerate(bundles):
        if bundle.branch is None or bundle.branch[1] not in region_at:
            continue
        target = region_at[bundle.branch[1]]
        if target <= index:
            loops.append((target, index, _trip_count(bundles, target, index, bundle.branch[0])))
        else:
            spans.append((index + 1, target))
    grid = [loop for loop in loops if bundles[loop[0]].depth == 1]
    if not grid:
        raise ValueError("no grid loop found in the final bundles")
    g_start, g_end, g_trip = max(grid, key=lambda loop: loop[1] - loop[0])
    # Trailing delay slots of the back-edge belong to the loop too.
    while g_end + 1 < len(bundles) and bundles[g_end + 1].depth == 0 and not bundles[
            g_end + 1].ops:
        g_end += 1
    weight = [1] * len(bundles)
    notes = []
    for start, end, trip in loops:
        if bundles[start].depth > 1:
            if trip is None:
                notes.append(f"inner loop at bundle {start} with unknown trip count counted once")
            for i in range(start, end + 1):
                weight[i] *= trip or 1
    row_once, leaves = _row_once(bundles, [s for s in spans if g_start <= s[0] <= g_end])
    if leaves > 1:
        notes.append(f"{leaves} conditional regions hold matmuls; the block step counts them "
                     "all (alternatives, if any, are summed)")
    counts = collections.Counter()
    sources = collections.Counter()
    row_bundles = 0
    for index in range(g_start, g_end + 1):
        if index in row_once:
            row_bundles += weight[index]
            continue
        counts["bundles"] += weight[index]
        for cls, loc in bundles[index].ops:
            counts[cls] += weight[index]
            if cls in ("valu", "xlu", "eup"):
                sources[loc] += weight[index]
    return {**{k: counts[k] for k in LLO_COUNTS}, "row_bundles": row_bundles,
            "grid_trips_per_core": g_trip, "sources": dict(sources), "notes": notes}


def _row_once(bundles: list[Bundle], spans: list[tuple[int, int]]) -> tuple[set[int], int]:
    """(bundles of the once-per-row regions, number of innermost matmul regions).

    Conditional regions nest; one holding vector work but no matmul, beside a sibling that
    holds matmuls, is an init or finalize (pl.when on the first / last kv block): the block
    step is the matmul sibling. Inside the innermost matmul region nothing is left out."""
    spans = sorted(spans, key=lambda s: (s[0], -s[1]))
    children: dict[tuple[int, int] | None, list[tuple[int, int]]] = collections.defaultdict(list)
    stack: list[tuple[int, int]] = []
    for span in spans:
        while stack and span[0] >= stack[-1][1]:
            stack.pop()
        children[stack[-1] if stack else None].append(span)
        stack.append(span)

    def classes(span: tuple[int, int]) -> collections.Counter:
        return collections.Counter(c for b in bundles[span[0]:span[1]] for c, _ in b.ops)

    row_once, leaves = set(), 0
    level = [None]
    while level:
        deeper = []
        for parent in level:
            kids = children[parent]
            mxu = [k for k in kids if classes(k)["vmatmul"]]
            if parent is not None and not mxu:
                leaves += 1
            for kid in kids:
                found = classes(kid)
                if kid in mxu:
                    deeper.append(kid)
                elif mxu and (found["valu"] or found["eup"] or found["vst"]):
                    row_once.update(range(*kid))
        level = deeper
    return row_once, leaves


_ALLOCATION = re.compile(r"#allocation\w* \[shape = '[^']*', space=(\w+), size = (0x[0-9a-f]+)")


def vmem_bytes(text: str) -> int:
    """Sum of the VMEM allocations an LLO dump declares (pre-finalize pass)."""
    return sum(int(size, 16) for space, size in _ALLOCATION.findall(text) if space == "vmem")


@functools.cache
def _functions(path: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function in a Python file."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError):
        return []
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((child.lineno, child.end_lineno, name))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
    visit(tree, "")
    return found


def source_function(loc: str) -> str:
    """'file.py:function' (the innermost function holding the line) of a 'path:line'."""
    if not loc:
        return "(no source line)"
    path, line = loc.rsplit(":", 1)
    inner = [f for f in _functions(path) if f[0] <= int(line) <= f[1]]
    name = min(inner, key=lambda f: f[1] - f[0])[2] if inner else f"line {line}"
    return f"{os.path.basename(path)}:{name}"


# ----------------------------------------------------------------------------- Mosaic parsing

_LAYOUT = re.compile(r'#tpu\.vpad<"(\d+),\{([^}]*)\},\(([^)]*)\)(?:,(-?\d+))?">')
_RELAYOUT = re.compile(r"tpu\.relayout .*?in_layout = \[([^\]]*)\], out_layout = \[([^\]]*)\]")
_VREG_OPS = {"sincos": ("math.sin", "math.cos"), "explog": ("math.exp", "math.log"),
             "lane_moves": ("tpu.rotate", "tpu.dynamic_rotate", "tpu.gather",
                            "tpu.dynamic_gather"),
             "sublane_bcast": ("tpu.broadcast_in_sublanes",)}


def relayout_kinds(text: str) -> collections.Counter:
    """tpu.relayout ops after relayout-insertion, by what changes: 'offsets', 'tiling',
    'implicit' (moves data) or 'replicate' (a replicated value materialised)."""
    kinds = collections.Counter()
    for src, dst in _RELAYOUT.findall(text):
        a, b = _LAYOUT.search(src), _LAYOUT.search(dst)
        if a is None or b is None:
            kinds["unparsed"] += 1
        elif "*" in a.group(2):
            kinds["replicate"] += 1
        elif a.group(3) != b.group(3):
            kinds["tiling"] += 1
        elif a.group(4) != b.group(4):
            kinds["implicit"] += 1
        else:
            kinds["offsets"] += 1
    return kinds


def mosaic_signals(files: dict[str, str]) -> dict[str, Any]:
    """Counts from one kernel's Mosaic dumps ({pass suffix: text})."""
    applied = files.get("post-apply-vector-layout-simplify", files.get(
        "post-apply-vector-layout", ""))
    ops = collections.Counter(re.findall(r"= ((?:math|tpu)\.\w+)", applied))
    out = {key: sum(ops[name] for name in names) for key, names in _VREG_OPS.items()}
    kinds = relayout_kinds(files.get("post-relayout-insertion", ""))
    out["relayouts"] = sum(n for kind, n in kinds.items() if kind != "replicate")
    out["relayout_kinds"] = dict(kinds)
    bounds = re.search(r"iteration_bounds = array<i64: ([\d, ]+)>", files.get("original", ""))
    out["grid"] = [int(x) for x in bounds.group(1).split(",")] if bounds else None
    return out


def role(name: str) -> str:
    """fwd / dq / dkv from a kernel's HLO or Mosaic function name."""
    return "dkv" if "dkv" in name else "dq" if "dq" in name else "fwd"


# ----------------------------------------------------------------------------- child: compile


def _builders(case: Case, devices: list) -> tuple[Any, tuple]:
    """(function of (inputs..., cotangent) -> vjp, abstract inputs) for one case."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(devices[0])

    def spec(*shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    t, d, blk = case.seq_len, case.head_dim, case.block
    scale = d ** -0.5
    if case.impl == BASELINE:
        from jax.experimental.pallas.ops.tpu import flash_attention as fa
        sizes = fa.BlockSizes(block_q=blk, block_k_major=blk, block_k=blk, block_b=1,
                              block_q_major_dkv=blk, block_k_major_dkv=blk, block_k_dkv=blk,
                              block_q_dkv=blk, block_k_major_dq=blk, block_k_dq=blk,
                              block_q_dq=blk)
        attend = functools.partial(fa.flash_attention, causal=True, sm_scale=scale,
                                   block_sizes=sizes)
        q = k = v = spec(BATCH, HEADS, t, d)
        inputs, extra = (q, k, v), ()
    elif case.impl == "splash":
        from jax.experimental.pallas.ops.tpu import splash_attention as splash
        sk, sm = splash.splash_attention_kernel, splash.splash_attention_mask
        mask = sm.MultiHeadMask([sm.CausalMask((t, t))] * HEADS)
        sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk,
                              block_q_dkv=blk, block_kv_dkv=blk, block_kv_dkv_compute=blk,
                              block_q_dq=blk, block_kv_dq=blk)
        attend = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)
        inputs, extra = (spec(HEADS, t, d), spec(KV_HEADS, t, d), spec(KV_HEADS, t, d)), ()
    else:
        from lctx_jax import rope as rope_lib
        from lctx_jax.attention import flash
        rope = (rope_lib.RopeConfig(theta=ROPE_THETA, head_dim=d, rotary_dim=d)
                if case.impl == "lctx" else None)

        def attend(q, k, v, positions):
            return flash.attend(q, k, v, causal=True, positions=positions,
                                kv_positions=positions, segment_ids=None,
                                kv_segment_ids=None, scale=scale, rope=rope, backend="tpu",
                                block_q=blk, block_k=blk)
        inputs = (spec(BATCH, t, HEADS, d), spec(BATCH, t, KV_HEADS, d),
                  spec(BATCH, t, KV_HEADS, d))
        extra = (spec(BATCH, t, dtype=jnp.int32),)

    def step(*args):
        n = len(inputs)
        out, vjp = jax.vjp(lambda *xs: attend(*xs, *args[n:-1]), *args[:n])
        return out, vjp(args[-1])

    return step, (*inputs, *extra, spec(*inputs[0].shape))


def _custom_calls(hlo: str) -> dict[str, bool]:
    """{instruction name: declares a cost_estimate} of the Mosaic calls in compiled HLO."""
    calls = {}
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' in line:
            name = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
            if name:
                calls[name.group(1)] = '"cost_estimate"' in line
    return calls


def _llo_kernel(directory: str, name: str) -> dict[str, str]:
    """{'bundles': final bundles text, 'allocations': pre-finalize text} of one kernel."""
    found = {}
    for path in glob.glob(os.path.join(directory, "*")):
        base = os.path.basename(path)
        if f"-{name}-" not in base:
            continue
        if base.endswith("-final_bundles.txt") and "schedule-analysis" not in base:
            found["bundles"] = Path(path).read_text()
        elif "pre-finalize-registers-and-allocations" in base:
            found["allocations"] = Path(path).read_text()
    return found


def _mosaic_kernels(directory: str) -> dict[str, dict[str, str]]:
    """{role: {pass: text}} of the Mosaic kernels compiled, grouped by dump prefix."""
    groups = collections.defaultdict(dict)
    for path in glob.glob(os.path.join(directory, "*")):
        match = re.match(r"(\d+)-\d+-mosaic-dump-\w+?-(original|post-[\w-]+)\.txt$",
                         os.path.basename(path))
        if match and match.group(2) in ("original", "post-relayout-insertion",
                                        "post-apply-vector-layout",
                                        "post-apply-vector-layout-simplify"):
            groups[match.group(1)][match.group(2)] = Path(path).read_text()
    kernels = {}
    for texts in groups.values():
        func = re.search(r"func\.func @(\w+)", texts.get("original", ""))
        if func:
            kernels[role(func.group(1))] = texts
    return kernels


def measure_case(case: Case, devices: list, dumps: dict[str, str]) -> list[dict[str, Any]]:
    """Compiles one case's training step and returns a row per kernel (fwd, dq, dkv); `dumps`
    are the (fresh) LLO and Mosaic dump directories of this process."""
    import jax

    step, args = _builders(case, devices)
    with jax.default_device(devices[0]):
        traced = jax.jit(step).trace(*args)
        for name, module in list(sys.modules.items()):  # the traced sources, before any edit
            if name.startswith("lctx_jax") and getattr(module, "__file__", None):
                _functions(module.__file__)
        compiled = traced.lower().compile()
    mosaic = _mosaic_kernels(dumps["mosaic"])
    rows = []
    for name, cost_estimate in _custom_calls(compiled.as_text()).items():
        kernel = _llo_kernel(dumps["llo"], name)
        if "bundles" not in kernel:
            raise RuntimeError(f"no LLO dump for kernel {name}")
        direction = role(name)
        row = {**dataclasses.asdict(case), "direction": direction, "kernel": name,
               "cost_estimate": cost_estimate,
               "vmem_bytes": vmem_bytes(kernel.get("allocations", "")),
               "vmem_operands": kernel["bundles"].count("= inlined_call_operand.vmem"),
               **step_signals(parse_bundles(kernel["bundles"]))}
        functions = collections.Counter()
        for loc, n in row["sources"].items():
            functions[source_function(loc)] += n
        row["sources"] = dict(functions.most_common())
        if direction in mosaic:
            row.update(mosaic_signals(mosaic[direction]))
        rows.append(row)
    return sorted(rows, key=lambda r: DIRECTIONS.index(r["direction"]))


def _keep_kernel_source_lines() -> str | None:
    """Lets the backward kernels keep their own source lines. JAX transposes each equation
    under the traceback of the forward call that made it (`ad._name_stack_ctx`), so every op of
    a custom_vjp's backward kernels would point at that call; here the name stack is kept and
    the traceback cleared, so ops record where they are traced. Only locations change. Returns
    a note when jax's internals differ."""
    from jax._src import source_info_util as siu
    from jax._src.interpreters import ad
    needed = ((ad, "_name_stack_ctx"), (siu, "_source_info_context"), (siu, "SourceInfo"))
    if not all(hasattr(module, name) for module, name in needed):
        return "backward kernels' source lines are the forward call's (jax internals changed)"

    @contextlib.contextmanager
    def live_traceback(src_info: Any) -> Iterator[None]:
        context = siu._source_info_context
        previous = context.context
        context.context = siu.SourceInfo(None, siu.current_name_stack() + src_info.name_stack)
        try:
            yield
        finally:
            context.context = previous
    ad._name_stack_ctx = live_traceback
    return None


def child(case: Case) -> list[dict[str, Any]]:
    """measure_case in this process (started by `measure` with the dump flags set)."""
    from jax.experimental import topologies

    note = _keep_kernel_source_lines()
    devices = list(topologies.get_topology_desc(TOPOLOGY, "tpu").devices)
    dumps = {"llo": os.environ["KERNEL_SIGNALS_LLO"],
             "mosaic": os.environ["KERNEL_SIGNALS_MOSAIC"]}
    try:
        rows = measure_case(case, devices, dumps)
    except Exception as err:  # a kernel that does not compile is a result too
        message = str(err).strip().splitlines()
        return [{**dataclasses.asdict(case), "direction": "all",
                 "error": f"{type(err).__name__}: {message[0] if message else ''}"}]
    for row in rows if note else ():
        row["notes"].append(note)
    return rows


# ----------------------------------------------------------------------------- GPU (Triton)

GPU_BASELINE = "jax_mha"
GPU_IMPLS = (GPU_BASELINE, "lctx", "lctx_norope")
GPU_COUNTS = ("regs", "spill_st", "spill_ld", "stack", "smem_kib", "cp_async", "tma", "wgmma",
              "mma_sync", "ldmatrix", "ex2")
_PTX_PATTERNS = {"cp_async": r"cp\.async\.c[ag]", "tma": r"cp\.async\.bulk",
                 "wgmma": r"wgmma\.mma_async", "mma_sync": r"\bmma\.sync", "ldmatrix": r"ldmatrix",
                 "ex2": r"ex2\.approx"}
# Run by the --triton-python interpreter: TTIR files -> PTX (Triton's own pipeline, no GPU).
_TRITON_SCRIPT = """
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
jobs = json.loads(sys.argv[1])
out = {"version": triton.__version__,
       "bin": os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"),
       "kernels": []}
for job in jobs:
    options = {"num_warps": job["num_warps"], "num_stages": job["num_stages"]}
    kernel = triton.compile(job["ttir"], target=GPUTarget("cuda", 90, 32), options=options)
    ptx = job["ttir"][:-len(".ttir")] + ".ptx"
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    out["kernels"].append({"ptx": ptx, "smem": kernel.metadata.shared})
print(json.dumps(out))
"""


def gpu_role(name: str) -> str:
    """fwd / dq / dkv / bwd (dq and dk, dv in one kernel) / delta of a Triton kernel name."""
    if "preprocess" in name:
        return "delta"
    if "dkv" in name or "dq" in name:
        return role(name)
    return "bwd" if "backward" in name else "fwd"


def _gpu_step(case: Case) -> tuple[Any, tuple]:
    """(vjp step, abstract inputs) of one GPU case: each kernel with its own default blocks."""
    import jax
    import jax.numpy as jnp

    t, d = case.seq_len, case.head_dim
    if case.impl == GPU_BASELINE:
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention

        def attend(q, k, v):
            return gpu_attention.mha(q, k, v, segment_ids=None, causal=True, sm_scale=d ** -0.5)
        inputs = (jax.ShapeDtypeStruct((BATCH, t, HEADS, d), jnp.bfloat16),) * 3
        extra = ()
    else:
        from lctx_jax import rope as rope_lib
        from lctx_jax.attention import flash
        rope = (rope_lib.RopeConfig(theta=ROPE_THETA, head_dim=d, rotary_dim=d)
                if case.impl == "lctx" else None)

        def attend(q, k, v, positions):
            return flash.attend(q, k, v, causal=True, positions=positions,
                                kv_positions=positions, segment_ids=None, kv_segment_ids=None,
                                scale=d ** -0.5, rope=rope, backend="gpu")
        inputs = tuple(jax.ShapeDtypeStruct((BATCH, t, h, d), jnp.bfloat16)
                       for h in (HEADS, KV_HEADS, KV_HEADS))
        extra = (jax.ShapeDtypeStruct((BATCH, t), jnp.int32),)

    def step(*args):
        n = len(inputs)
        out, vjp = jax.vjp(lambda *xs: attend(*xs, *args[n:-1]), *args[:n])
        return out, vjp(args[-1])

    return step, (*inputs, *extra, inputs[0])


def _triton_calls(op: Any) -> list[Any]:
    """The backend configs of the Triton custom calls under an MLIR operation."""
    found = []
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                if (inner.operation.name == "stablehlo.custom_call"
                        and "triton" in str(inner.attributes["call_target_name"])):
                    found.append(inner.attributes["mhlo.backend_config"])
                found += _triton_calls(inner.operation)
    return found


def gpu_child(cases: list[Case], directory: str) -> list[dict[str, Any]]:
    """Lowers each case's training step for CUDA and writes every Triton kernel's TTIR (the
    `__gpu$xla.gpu.triton` custom calls' serialized IR, as text) under `directory`."""
    import jax
    from jax._src.lib import triton as jax_triton
    from jaxlib.mlir import ir

    kernels = []
    for case in cases:
        step, args = _gpu_step(case)
        module = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir(
            "stablehlo")
        found = _triton_calls(module.operation)
        for config in found:
            name = ir.StringAttr(config["name"]).value
            with ir.Context() as context:
                jax_triton.dialect.register_dialect(context)
                text = ir.Module.parse(bytes(ir.StringAttr(config["ir"]).value_bytes)
                                       ).operation.get_asm(enable_debug_info=False)
            path = os.path.join(directory, f"{case.impl}-{case.seq_len}-{case.head_dim}-"
                                           f"{name}.ttir")
            Path(path).write_text(text)
            kernels.append({**dataclasses.asdict(case), "block": 0, "direction": gpu_role(name),
                            "kernel": name, "ttir": path,
                            "num_warps": ir.IntegerAttr(config["num_warps"]).value,
                            "num_stages": ir.IntegerAttr(config["num_stages"]).value})
    return kernels


def _ptxas(directory: str, ptx: str) -> dict[str, int]:
    """Registers, spill bytes and stack frame of one PTX file for sm_90a, from `ptxas -v`
    (the newest ptxas the Triton wheel bundles that takes the PTX version)."""
    errors = []
    for name in ("ptxas-blackwell", "ptxas"):
        tool = os.path.join(directory, name)
        if not os.path.exists(tool):
            continue
        run = subprocess.run([tool, "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                             capture_output=True, text=True, check=False)
        if run.returncode == 0:
            found = {key: re.search(pattern, run.stderr) for key, pattern in (
                ("regs", r"Used (\d+) registers"), ("spill_st", r"(\d+) bytes spill stores"),
                ("spill_ld", r"(\d+) bytes spill loads"), ("stack", r"(\d+) bytes stack frame"))}
            return {key: int(m.group(1)) if m else 0 for key, m in found.items()}
        errors.append(f"{name}: {run.stderr.strip().splitlines()[-1:]}")
    raise RuntimeError(f"no bundled ptxas assembles {ptx}: {errors}")


def gpu_measure(cases: list[Case], triton_python: str) -> tuple[list[dict[str, Any]], str]:
    """(a row per Triton kernel, Triton's version): TTIR from jaxlib's Pallas lowering (a child
    process on CPU), PTX for sm_90 by the Triton of `triton_python`, ptxas -v."""
    root = tempfile.mkdtemp(prefix="kernel_signals_gpu_")
    try:
        kernels = run_child(__file__, "--gpu-child", json.dumps(
            [dataclasses.asdict(c) for c in cases]), root, env={"JAX_PLATFORMS": "cpu"})
        run = subprocess.run([triton_python, "-c", _TRITON_SCRIPT, json.dumps(kernels)],
                             capture_output=True, text=True, check=False)
        if run.returncode:
            raise RuntimeError(f"{triton_python} could not compile the TTIR to PTX:\n"
                               + "\n".join(run.stderr.splitlines()[-8:]))
        compiled = json.loads(run.stdout.splitlines()[-1])
        rows = []
        for kernel, result in zip(kernels, compiled["kernels"]):
            ptx = Path(result["ptx"]).read_text()
            rows.append({**{k: v for k, v in kernel.items() if k != "ttir"},
                         **_ptxas(compiled["bin"], result["ptx"]),
                         "smem_kib": result["smem"] / 1024,
                         **{k: len(re.findall(p, ptx)) for k, p in _PTX_PATTERNS.items()}})
        return rows, compiled["version"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def gpu_table(rows: list[dict[str, Any]], version: str) -> str:
    head = f"{'kernel':<12} {'dir':<5} {'T':>6} {'D':>4} {'warps':>5} {'stages':>6}"
    lines = [(f"GPU sm_90a: Pallas -> TTIR (jaxlib) -> PTX (Triton {version}) -> ptxas -v; "
              "static PTX instruction counts; smem = Triton's shared memory"),
             head + "".join(f" {c:>8}" for c in GPU_COUNTS)]
    for r in rows:
        lines.append(f"{r['impl']:<12} {r['direction']:<5} {r['seq_len']:>6} {r['head_dim']:>4} "
                     f"{r['num_warps']:>5} {r['num_stages']:>6}"
                     + "".join(f" {r[c]:>8.0f}" for c in GPU_COUNTS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parent: report


def measure(cases: list[Case]) -> list[dict[str, Any]]:
    """Compiles each case in its own child process, with libtpu's dump flags (they must be set
    before libtpu loads, and would dump every later compile of the process; a fresh process
    per case also keeps one case's source lines out of the next one's LLO)."""
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler")
    rows = []
    for number, case in enumerate(cases, 1):
        root = tempfile.mkdtemp(prefix="kernel_signals_")
        try:
            llo, mosaic = os.path.join(root, "llo"), os.path.join(root, "mosaic")
            os.makedirs(llo)
            os.makedirs(mosaic)
            env = {"LIBTPU_INIT_ARGS": LIBTPU_FLAGS.format(llo=llo, mosaic=mosaic),
                   "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "KERNEL_SIGNALS_LLO": llo,
                   "KERNEL_SIGNALS_MOSAIC": mosaic}
            rows += run_child(__file__, "--child", json.dumps(dataclasses.asdict(case)),
                                  env=env)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"[{number}/{len(cases)}] {case}", file=sys.stderr, flush=True)
    return rows


def _key(row: dict[str, Any]) -> tuple:
    return row["direction"], row["seq_len"], row["head_dim"], row["block"]


def _per_push(row: dict[str, Any], key: str) -> float | None:
    return row[key] / row["vmatmul"] if row.get("vmatmul") else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def tables(rows: list[dict[str, Any]]) -> str:
    """The report: per-step counts, per-push figures with ratios to the baseline, attribution."""
    base = {_key(r): r for r in rows if r["impl"] == BASELINE and "error" not in r}
    head = f"{'kernel':<12} {'dir':<4} {'T':>6} {'D':>4} {'blk':>4}"
    lines = [("LLO final bundles, TPU v5p, per grid step (block step; 'row' = the once-per-row "
              "init/finalize regions, not included)"),
             head + "".join(f" {c:>8}" for c in LLO_COUNTS)
             + f" {'row':>6} {'VMEM KiB':>9} {'in VMEM':>7} {'cost_est':>8}"]
    for r in rows:
        ident = (f"{r['impl']:<12} {r['direction']:<4} {r['seq_len']:>6} {r['head_dim']:>4} "
                 f"{r['block']:>4}")
        if "error" in r:
            lines.append(f"{ident} failed: {r['error'][:140]}")
            continue
        lines.append(ident + "".join(f" {r[c]:>8}" for c in LLO_COUNTS)
                     + f" {r['row_bundles']:>6} {r['vmem_bytes'] / 1024:>9.0f}"
                     + f" {r['vmem_operands']:>7} {'yes' if r['cost_estimate'] else 'no':>8}")
    per_push = ("bundles", "valu", "xlu", "eup", "vld", "vst", "spill")
    lines += ["", (f"Per MXU push (vmatmul) and against {BASELINE} (x base: the same figure / "
                   "the baseline's); Mosaic vreg ops of the whole kernel body"),
              head + "".join(f" {c + '/p':>10}" for c in per_push)
              + f" {'bund x':>7} {'valu x':>7}" + "".join(f" {c:>13}" for c in MOSAIC_COUNTS)]
    for r in rows:
        if "error" in r:
            continue
        ref = base.get(_key(r))
        ratio = {k: (_per_push(r, k) / _per_push(ref, k)
                     if ref and _per_push(ref, k) and _per_push(r, k) is not None else None)
                 for k in ("bundles", "valu")}
        lines.append(f"{r['impl']:<12} {r['direction']:<4} {r['seq_len']:>6} "
                     f"{r['head_dim']:>4} {r['block']:>4}"
                     + "".join(f" {_fmt(_per_push(r, c)):>10}" for c in per_push)
                     + f" {_fmt(ratio['bundles']):>7} {_fmt(ratio['valu']):>7}"
                     + "".join(f" {r.get(c, 'n/a'):>13}" for c in MOSAIC_COUNTS))
    shapes = dict.fromkeys((r["seq_len"], r["head_dim"], r["block"]) for r in rows
                           if "error" not in r)
    for shape in shapes:
        lines += ["", (f"Where the block step's vector work (valu + xlu + eup ops) comes from, "
                       f"T={shape[0]} D={shape[1]} blk={shape[2]}: top source functions")]
        for r in rows:
            if "error" in r or (r["seq_len"], r["head_dim"], r["block"]) != shape:
                continue
            total = sum(r["sources"].values()) or 1
            top = list(r["sources"].items())[:6]
            lines.append(f"  {r['impl']} {r['direction']} ({total} ops): " + ", ".join(
                f"{name} {100 * n / total:.0f}%" for name, n in top))
    notes = sorted({f"{r['impl']} {r['direction']}: {n}" for r in rows for n in r.get("notes", ())})
    lines += ["", *notes] if notes else []
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--head-dims", default="128,64")
    parser.add_argument("--blocks", default="128,512", help="TPU blocks (GPU: each kernel's own)")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--triton-python",
                        help="a Python with `triton` installed (its own venv): adds the GPU table")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Case(**json.loads(args.child)))))
        return
    if args.gpu_child:
        print(json.dumps(gpu_child([Case(**c) for c in json.loads(args.gpu_child[0])],
                                   args.gpu_child[1])))
        return
    impls = args.impls.split(",")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}; choose from {IMPLS}")
    lengths, dims = [int(x) for x in args.lengths.split(",")], [
        int(x) for x in args.head_dims.split(",")]
    cases = [Case(impl, t, d, blk) for t in lengths for d in dims
             for blk in map(int, args.blocks.split(",")) for impl in impls]
    results: dict[str, Any] = {"topology": TOPOLOGY}
    try:
        results["tpu"] = measure(cases)
        print(tables(results["tpu"]))
    except RuntimeError as err:
        results["tpu_unavailable"] = str(err)
        print(f"TPU signals unavailable: {err}")
    if args.triton_python:
        gpu_cases = [Case(impl, t, d, 0) for t in lengths for d in dims for impl in GPU_IMPLS
                     if impl in impls or impl == GPU_BASELINE]
        try:
            results["gpu"], results["triton"] = gpu_measure(gpu_cases, args.triton_python)
            print("\n" + gpu_table(results["gpu"], results["triton"]))
        except RuntimeError as err:
            results["gpu_unavailable"] = str(err)
            print(f"\nGPU signals unavailable: {err}")
    else:
        print(f"\nGPU signals: not requested; {GPU_HOW}")
    save_run(args, results)


if __name__ == "__main__":
    main()
