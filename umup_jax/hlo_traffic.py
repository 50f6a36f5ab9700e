"""Kernels and memory traffic of a compiled XLA program, read from its HLO text.

A compiled step is a sequence of kernels: each top-level instruction of the entry computation,
and of the bodies of the ``while`` loops it runs (a scan over layers, gradient accumulation,
the chunked loss), that does work (a fusion, a GEMM custom call, a copy, a collective, …).
What a kernel reads and writes in device memory is, to first order, its operands and results:

    traffic = Σ_kernels runs · (bytes read + bytes written)

with ``runs`` the product of the trip counts of the loops around it (XLA records a loop's
``known_trip_count`` in its backend config; a loop without one counts once and is reported).
Three refinements keep the count from charging what a kernel does not touch:

* an operand that a fusion only slices (``dynamic-slice``, ``slice``, ``gather``, possibly
  after a bitcast or convert: a scanned layer's weights, the picked logits) counts with the
  slices' sizes;
* a fusion whose root is a ``dynamic-update-slice`` writes in place (a scan stacking its
  residuals): it writes the update, and the buffer it updates is not read;
* a custom call's byte-typed (``s8``/``u8``) results are workspace (cuBLAS's) and not counted.

It is an estimate from above of what the device moves, not a measurement: caches, a kernel
that reads an operand twice, and what XLA's emitters fuse further are not seen.  What it is for
is comparing two programs compiled alike (:mod:`umup_jax.gpu_target` compiles for an H100 on
the CPU): our u-μP step against a plain Llama's, or a step before and after a change, which on
a GPU at small widths is bound by memory traffic rather than by its GEMMs.  Kernels are of three
kinds: ``gemm`` (cuBLAS calls, ``dot``/``convolution`` instructions and fusions holding one,
Triton GEMM fusions), ``attention`` (cuDNN's fused attention) and ``other``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from umup_jax.hlo_check import (
    _BACKEND_KIND, _COMPUTATION, _OP_NAME, _TARGET, Instruction, instructions,
)

# Bytes per element of XLA's primitive types (sub-byte types are packed: s4/u4 count ½).
ELEMENT_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_CALLED = re.compile(r"\b(?:to_apply|true_computation|false_computation|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")

# Instructions that launch nothing: they name, group or alias buffers, or hold other
# computations (whose instructions are counted where they run).
NO_KERNEL = frozenset({
    "parameter", "constant", "bitcast", "get-tuple-element", "tuple", "while", "conditional",
    "call", "opt-barrier", "after-all", "add-dependency", "partition-id", "replica-id",
    "domain",
})
SLICING = frozenset({"dynamic-slice", "slice", "gather"})
_PASS_THROUGH = frozenset({"bitcast", "convert"})  # elementwise: a slice of them reads a slice
KINDS = ("gemm", "attention", "other")


def _arrays(type_text: str) -> list[tuple[str, int]]:
    """(element type, element count) of every array in a type's text."""
    out = []
    for element, dims in _ARRAY.findall(type_text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        out.append((element, n))
    return out


def type_bytes(type_text: str, workspace: bool = True) -> float:
    """Bytes of every array in a type's text (``f32[8,128]{1,0}``, or a tuple of them); with
    ``workspace=False`` byte-typed (``s8``/``u8``) arrays are left out."""
    return sum(n * ELEMENT_BYTES[element] for element, n in _arrays(type_text)
               if element in ELEMENT_BYTES and (workspace or element not in ("s8", "u8")))


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of the program: bytes it reads and writes each time it runs, and how many
    times it runs per call of the program."""

    name: str
    opcode: str
    kind: str  # one of KINDS
    reads: float
    writes: float
    runs: int
    op_name: str

    @property
    def traffic(self) -> float:
        """runs · (reads + writes), in bytes."""
        return self.runs * (self.reads + self.writes)


def _parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], Optional[str]]:
    """({computation: its instructions}, the ENTRY computation's name)."""
    computations: dict[str, list[Instruction]] = {}
    for inst in instructions(hlo_text):
        computations.setdefault(inst.computation, []).append(inst)
    entry = next((c.group(1) for line in hlo_text.splitlines()
                  if line.startswith("ENTRY") and (c := _COMPUTATION.match(line))), None)
    return computations, entry


def _holds_a_dot(computation: str, computations: dict[str, list[Instruction]],
                 seen: Optional[set] = None) -> bool:
    seen = set() if seen is None else seen
    if computation in seen:
        return False
    seen.add(computation)
    for inst in computations.get(computation, ()):
        if inst.opcode in ("dot", "convolution"):
            return True
        for called in _CALLED.findall(inst.line):
            if _holds_a_dot(called, computations, seen):
                return True
    return False


def _kind(inst: Instruction, computations: dict[str, list[Instruction]]) -> str:
    target = _TARGET.search(inst.line)
    if inst.opcode == "custom-call" and target:
        t = target.group(1)
        if t.startswith("__cudnn$fmha"):
            return "attention"
        if t.startswith("__cublas") or "matmul" in t or "gemm" in t:
            return "gemm"
        return "other"
    if inst.opcode in ("dot", "convolution"):
        return "gemm"
    if inst.opcode == "fusion":
        backend = _BACKEND_KIND.search(inst.line)
        if backend and "gemm" in backend.group(1):
            return "gemm"
        called = _CALLED.findall(inst.line)
        if called and _holds_a_dot(called[0], computations):
            return "gemm"
    return "other"


def _fusion_bytes(inst: Instruction, fused: list[Instruction]) -> tuple[float, float]:
    """(reads, writes) of a fusion, its fused computation's slicing and in-place update
    taken into account."""
    by_name = {i.name: i for i in fused}
    params = {}
    for i in fused:
        if i.opcode == "parameter":
            m = re.search(r"parameter\((\d+)\)", i.line)
            if m:
                params[int(m.group(1))] = i.name
    uses: dict[str, list[Instruction]] = {}
    for i in fused:
        for o in i.operands:
            uses.setdefault(o, []).append(i)

    def consumers(name: str) -> list[Instruction]:
        """The instructions reading ``name``, looking through bitcasts and converts (an
        element converted and then gathered is the only one read)."""
        out = []
        for u in uses.get(name, ()):
            out.extend(consumers(u.name) if u.opcode in _PASS_THROUGH else [u])
        return out

    root = next((i for i in fused if i.root), None)
    roots = ([by_name[o] for o in root.operands if o in by_name]
             if root is not None and root.opcode == "tuple" else [root] if root else [])
    in_place = {r.operands[0] for r in roots if r.opcode == "dynamic-update-slice"}
    writes = 0.0
    for r in roots:
        if r.opcode == "dynamic-update-slice":
            writes += type_bytes(r.operand_texts[1]) if len(r.operand_texts) > 1 else 0.0
        else:
            writes += type_bytes(r.result)
    reads = 0.0
    for index, outer_type in enumerate(inst.operand_texts):
        param = params.get(index)
        users = consumers(param) if param else []
        if param and users and all(u.opcode in SLICING
                                   and _made_from(param, u.operands[0], by_name)
                                   for u in users):
            # The sliced elements, in the operand's element type.
            element = ELEMENT_BYTES.get((_arrays(outer_type) or [("", 0)])[0][0], 0)
            reads += sum(n * element for u in users for _, n in _arrays(u.result))
        elif param and any(_made_from(param, r, by_name) for r in in_place):
            continue  # updated in place: only the update moves
        else:
            reads += type_bytes(outer_type)
    return reads, writes


def _made_from(param: str, name: str, by_name: dict[str, Instruction]) -> bool:
    """Whether ``name`` is ``param`` or made from it by bitcasts and converts alone."""
    while name != param and name in by_name and by_name[name].opcode in _PASS_THROUGH:
        name = by_name[name].operands[0]
    return name == param


def _bytes(inst: Instruction, computations: dict[str, list[Instruction]]) -> tuple[float, float]:
    if inst.opcode == "fusion":
        called = _CALLED.findall(inst.line)
        if called and called[0] in computations:
            return _fusion_bytes(inst, computations[called[0]])
    if inst.opcode in SLICING:
        size = type_bytes(inst.result)
        return size, size
    if inst.opcode == "dynamic-update-slice":
        size = type_bytes(inst.operand_texts[1]) if len(inst.operand_texts) > 1 else 0.0
        return size, size
    reads = sum(type_bytes(t) for t in inst.operand_texts)
    return reads, type_bytes(inst.result, workspace=inst.opcode != "custom-call")


def _runs(computations: dict[str, list[Instruction]], entry: Optional[str]
          ) -> tuple[dict[str, int], int]:
    """({computation the program runs: how many times per call}, how many loops had no known
    trip count)."""
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    runs = {entry: 1}
    unknown = 0
    todo = [entry]
    while todo:
        c = todo.pop()
        for inst in computations.get(c, ()):
            if inst.opcode == "while":
                trip = _TRIP_COUNT.search(inst.line)
                unknown += trip is None
                n = int(trip.group(1)) if trip else 1
                targets = [(b, n) for b in _BODY.findall(inst.line)]
            elif inst.opcode == "conditional":
                # Each branch counted as if it ran: an upper bound.
                branches = _BRANCHES.search(inst.line)
                names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")]
                         if branches else _CALLED.findall(inst.line))
                targets = [(b, 1) for b in names]
            elif inst.opcode == "call":
                targets = [(b, 1) for b in _CALLED.findall(inst.line)]
            else:
                continue
            for body, n in targets:
                if body in computations and body not in runs:
                    runs[body] = runs[c] * n
                    todo.append(body)
    return runs, unknown


def kernels(hlo_text: str) -> tuple[list[Kernel], int]:
    """(every kernel the program runs, how many loops had no known trip count)."""
    computations, entry = _parse(hlo_text)
    runs, unknown = _runs(computations, entry)
    out = []
    for computation, n in runs.items():
        for inst in computations[computation]:
            if inst.opcode in NO_KERNEL or inst.opcode.endswith("-done"):
                continue
            reads, writes = _bytes(inst, computations)
            op_name = _OP_NAME.search(inst.line)
            out.append(Kernel(name=inst.name, opcode=inst.opcode,
                              kind=_kind(inst, computations), reads=reads, writes=writes,
                              runs=n, op_name=op_name.group(1) if op_name else ""))
    return out, unknown


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]")
_MESH_AXIS = re.compile(r"'([^']+)'=(\d+)")
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")


def group_size(line: str, partitions: int) -> int:
    """How many devices take part in each group of a collective, from its ``replica_groups``
    in any of the forms XLA prints: listed (``{{0,1},{2,3}}``), iota (``[2,4]<=[8]``: 2
    groups of 4), over named mesh axes (XLA 0.12 and later: ``mesh['data'=2,'fsdp'=4] {'fsdp'}``,
    possibly with ``device_ids=(…)`` between; no axis set: all of them), or empty (every one
    of the module's ``partitions``)."""
    if (m := _IOTA_GROUPS.search(line)):
        return int(m.group(2))
    if (m := _LISTED_GROUPS.search(line)):
        return len([d for d in m.group(1).split(",") if d])
    if (m := _MESH_GROUPS.search(line)):
        sizes = {a: int(n) for a, n in _MESH_AXIS.findall(m.group(1))}
        tail = line[m.end():]
        if tail.startswith(", device_ids="):  # skip its balanced parentheses
            depth, i = 0, len(", device_ids=")
            for i in range(i, len(tail)):
                depth += tail[i] == "("
                depth -= tail[i] == ")"
                if depth == 0:
                    break
            tail = tail[i + 1:]
        axes = re.match(r"\s*\{([^}]*)\}", tail)
        names = re.findall(r"'([^']+)'", axes.group(1)) if axes else list(sizes)
        n = 1
        for a in names:
            n *= sizes.get(a, 1)
        return n
    return partitions


def wire_bytes(opcode: str, operand_bytes: float, n: int) -> float:
    """Bytes each device sends for one collective over groups of ``n`` (ring algorithms, as
    NCCL's): all-reduce 2(n−1)/n of its data, all-gather (n−1) shards, reduce-scatter and
    all-to-all (n−1)/n of their input, a collective-permute its data."""
    if n <= 1:
        return 0.0
    return operand_bytes * {"all-reduce": 2 * (n - 1) / n, "all-gather": n - 1,
                            "reduce-scatter": (n - 1) / n, "all-to-all": (n - 1) / n,
                            "collective-permute": 1.0}[opcode]


def collectives(hlo_text: str) -> dict:
    """``{opcode: {"in_loops": launches, "outside": launches, "bytes": operand bytes}}`` per
    call of the program, for each collective it runs (an async ``…-start`` counted as its
    opcode): ``in_loops`` the launches that loops repeat (a body's, times its trip count;
    a loop without a known count runs once, as in :func:`kernels`), ``outside`` the rest;
    plus ``"unknown_trip_counts"``.

    ``bytes`` are the operands' (what each device sends in: an all-reduce's data, an
    all-gather's shard, a reduce-scatter's whole input), not the results': XLA 0.12 types an
    async ``all-reduce-start`` as the tuple of its aliased operand and its result, which would
    count the data twice.  ``wire_bytes``: what each device sends over the links, by
    :func:`wire_bytes` for its groups' size (:func:`group_size`).  "In loops" is what gradient accumulation or a chunked loss would
    repeat every trip (:func:`umup_jax.train.splits_over_data_replicas`)."""
    computations, entry = _parse(hlo_text)
    runs, unknown = _runs(computations, entry)
    partitions = _PARTITIONS.search(hlo_text[:hlo_text.find("\n")])
    partitions = int(partitions.group(1)) if partitions else 1
    out: dict = {}
    for computation, n in runs.items():
        for inst in computations[computation]:
            opcode = inst.opcode.removesuffix("-start")
            if opcode not in COLLECTIVES:
                continue
            row = out.setdefault(opcode, {"in_loops": 0, "outside": 0, "bytes": 0.0,
                                          "wire_bytes": 0.0})
            row["in_loops" if n > 1 else "outside"] += n
            data = sum(type_bytes(t) for t in inst.operand_texts)
            row["bytes"] += n * data
            row["wire_bytes"] += n * wire_bytes(opcode, data, group_size(inst.line, partitions))
    out["unknown_trip_counts"] = unknown
    return out


def traffic(hlo_text: str) -> dict:
    """``{kind: {"kernels": launches per call, "bytes": traffic}}`` for each of :data:`KINDS`,
    plus ``"total"`` and ``"unknown_trip_counts"`` (loops counted once for want of one)."""
    found, unknown = kernels(hlo_text)
    out: dict = {k: {"kernels": 0, "bytes": 0.0} for k in (*KINDS, "total")}
    for k in found:
        for key in (k.kind, "total"):
            out[key]["kernels"] += k.runs
            out[key]["bytes"] += k.traffic
    out["unknown_trip_counts"] = unknown
    return out
