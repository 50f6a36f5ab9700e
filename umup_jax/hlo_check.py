"""What the compiled HLO of a step really runs: FP8 GEMMs per matmul group, cuDNN attention.

An FP8 policy only says what is *cast*; whether the GEMM then runs in FP8 is XLA's decision (a
dot of upcast operands computes the same numbers at BF16 speed).  On a CUDA GPU, XLA's GEMM
rewriter turns a dot of f8 operands into a cuBLASLt custom call with target
:data:`FP8_GEMM_TARGET` (``xla/service/gpu/cublas_cudnn.cc``: ``kCublasLtMatmulF8CallTarget``);
a BF16 GEMM becomes ``__cublas$gemm`` or ``__cublas$lt$matmul``.  cuDNN's fused attention
(``jax.nn.dot_product_attention(implementation='cudnn')``) is a custom call whose target starts
with :data:`CUDNN_ATTENTION_PREFIX` (``__cudnn$fmhaSoftmax`` forward,
``__cudnn$fmhaSoftmaxBackward`` backward, jax/_src/cudnn/fused_attention_stablehlo.py).

Each custom call keeps the ``op_name`` metadata of the dot it replaced, and the model runs every
linear inside a ``jax.named_scope('fp8_<group>')`` (:func:`umup_jax.model.linear_for`), in the
forward pass and in its transpose (``…/transpose(jvp(…))/…/fp8_qkv/dot_general``, or
``…/jvp(fp8_ffn_down)/dot_general`` for the down-projection, whose backward
:func:`umup_jax.ops.recompute_middle` traces anew), so the group of each GEMM is read from its
op_name.

These are plain functions of the HLO text (``jax.jit(f).lower(…).compile().as_text()``),
unit-tested on CPU with synthetic HLO and with this machine's compiled steps;
``tests/test_fp8_gpu.py`` applies them on a GPU.

Compiled HLO text names an instruction's operands without their types
(``custom-call(%fusion.2, %param_1, %constant.1), custom_call_target=…``: XLA's default
``HloPrintOptions`` has ``print_operand_shape`` off, and ``Compiled.as_text`` uses them), so
an operand's element type is read off the line that defines it; names are unique in a module,
fused computations' parameters included.  Text that does print operand types inline (HLO
dumped with other options) is read as it stands.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Optional

from umup_jax import fp8 as fp8_lib

FP8_GEMM_TARGET = "__cublas$lt$matmul$f8"
BF16_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
CUDNN_ATTENTION_PREFIX = "__cudnn$fmha"
FP8_TYPES = ("f8e4m3fn", "f8e5m2", "f8e4m3", "f8e4m3fnuz", "f8e5m2fnuz")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
# A computation's header: ``%name (params) -> type {`` or ``ENTRY %main.1 (…) -> … {``.
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BACKEND_KIND = re.compile(r'"kind":"([^"]+)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TYPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[")
# A scope is a path segment, possibly inside a transform's wrapper: ``…/fp8_qkv/…``, or
# ``…/jvp(fp8_ffn_down)/…`` where a custom VJP's backward re-traces the scoped function.
_GROUP = re.compile(r"(?:^|/|\()fp8_(" + "|".join(fp8_lib.GROUPS) + r")(?=/|\)|$)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: its name, opcode, result type text, operand element types,
    custom-call target (if any), op_name metadata, and where it sits and what it calls."""

    name: str
    opcode: str
    result: str
    operand_types: tuple[str, ...]
    target: Optional[str]
    op_name: str
    computation: str = ""  # the computation holding it
    calls: tuple[str, ...] = ()  # the computations it calls (a fusion's ``calls=``, …)
    backend_kind: Optional[str] = None  # a fusion's kind: ``__triton_gemm``, ``__triton``, …
    operands: tuple[str, ...] = ()  # the operands' names, in order
    # Each operand's whole type text, in order (``f32[8,128]{1,0}``, a tuple's; "" if unknown).
    operand_texts: tuple[str, ...] = ()
    root: bool = False  # its computation's ROOT
    line: str = dataclasses.field(default="", repr=False, compare=False)  # as printed

    @property
    def group(self) -> Optional[str]:
        """The FP8 matmul group (``qkv``, ``attn_out``, …) from the op_name's ``fp8_<group>``
        scope, or ``None``."""
        m = _GROUP.search(self.op_name)
        return m.group(1) if m else None


def _operands(rest: str) -> str:
    """The text inside the opcode's parentheses (``rest`` starts after the '(')."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:i]
    return rest


_COMMENT = re.compile(r"/\*.*?\*/")


def _split_operands(operands: str) -> list[str]:
    """The operand list split at its top-level commas (a layout ``{1,0}`` or a shape
    ``[128,64]`` inside an inline-typed operand holds commas of its own), without the
    ``/*index=5*/`` comments XLA prints before every fifth operand of a long list."""
    operands = _COMMENT.sub("", operands)
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(operands):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(operands[start:i])
            start = i + 1
    parts.append(operands[start:])
    return [p.strip() for p in parts if p.strip()]


def _element_type(type_text: str) -> Optional[str]:
    """``f8e4m3fn`` of ``f8e4m3fn[128,128]{1,0}``; ``None`` for a tuple or no type."""
    m = _TYPE.match(type_text.strip())
    return m.group(1) if m else None


def _operand_type(operand: str, defined: Mapping[str, Optional[str]]) -> Optional[str]:
    """One operand's element type: inline (``f32[2]{0} %x``) or from the instruction that
    defines the name (``%x``)."""
    inline = _TYPE.match(operand)
    if inline:
        return inline.group(1)
    return defined.get(operand.split()[-1].lstrip("%"))


def instructions(hlo_text: str) -> list[Instruction]:
    """Every instruction of every computation in an HLO module's text, each operand's element
    type resolved (an operand of unknown type, such as a tuple, is left out)."""
    parsed, computation = [], ""
    for line in hlo_text.splitlines():
        if (m := _INSTRUCTION.match(line)):
            parsed.append((line, computation, m.groups()))
        elif (c := _COMPUTATION.match(line)):
            computation = c.group(1)
    results = {name: result for _, _, (name, result, _, _) in parsed}
    defined = {name: _element_type(result) for name, result in results.items()}
    out = []
    for line, computation, (name, result, opcode, rest) in parsed:
        operands = _split_operands(_operands(rest))
        types = (_operand_type(o, defined) for o in operands)
        names = tuple(o.split()[-1].lstrip("%") for o in operands)
        texts = tuple(o.rsplit(" ", 1)[0] if _TYPE.match(o) and " " in o
                      else results.get(n, "") for o, n in zip(operands, names))
        target = _TARGET.search(line)
        op_name = _OP_NAME.search(line)
        kind = _BACKEND_KIND.search(line)
        out.append(Instruction(
            name=name, opcode=opcode, result=result,
            operand_types=tuple(t for t in types if t),
            target=target.group(1) if target else None,
            op_name=op_name.group(1) if op_name else "",
            computation=computation,
            calls=tuple(_CALLS.findall(line)),
            backend_kind=kind.group(1) if kind else None,
            operands=names, operand_texts=texts, root=line.lstrip().startswith("ROOT "),
            line=line,
        ))
    return out


def triton_gemm_computations(insts: Iterable[Instruction]) -> set[str]:
    """The computations of XLA:GPU's Triton GEMM fusions (backend kind ``__triton_gemm`` or
    ``__triton_nested_gemm_fusion``) and every computation they call: a ``dot`` there is a
    GEMM that XLA's autotuner gave to a Triton kernel instead of cuBLAS(Lt)."""
    insts = list(insts)
    calls = {}
    for i in insts:
        calls.setdefault(i.computation, set()).update(i.calls)
    todo = [c for i in insts if i.opcode == "fusion" and i.backend_kind
            and i.backend_kind.startswith("__triton") and "gemm" in i.backend_kind
            for c in i.calls]
    found: set[str] = set()
    while todo:
        c = todo.pop()
        if c not in found:
            found.add(c)
            todo.extend(calls.get(c, ()))
    return found


def custom_calls(hlo_text: str, prefix: str = "") -> list[Instruction]:
    """The custom calls whose target starts with ``prefix``."""
    return [i for i in instructions(hlo_text)
            if i.opcode == "custom-call" and i.target and i.target.startswith(prefix)]


def is_fp8_gemm(inst: Instruction) -> bool:
    """A cuBLASLt FP8 GEMM: the f8 target with (at least) its two matrix operands in FP8."""
    return inst.target == FP8_GEMM_TARGET and _n_f8(inst) >= 2


def _n_f8(inst: Instruction) -> int:
    """How many of the instruction's operands are FP8."""
    return sum(t in FP8_TYPES for t in inst.operand_types)


_NO_GEMMS = {"fp8": 0, "fp8_triton": 0, "other": 0, "f8_dot": 0}


def gemms_by_group(hlo_text: str) -> dict[Optional[str], dict[str, int]]:
    """{group (or None): {'fp8': n, 'fp8_triton': t, 'other': m, 'f8_dot': k}} of each matmul
    group:

    * ``fp8``: cuBLASLt FP8 GEMMs (:func:`is_fp8_gemm`);
    * ``fp8_triton``: ``dot`` instructions of two FP8 operands inside a Triton GEMM fusion
      (:func:`triton_gemm_computations`): an FP8 GEMM that XLA gave to a Triton kernel, which
      reads the FP8 operands itself (XLA 0.11's default for small GEMMs, and wherever its
      autotuner finds Triton faster than cuBLASLt);
    * ``other``: every other GEMM, the BF16/FP32 cuBLAS calls (:data:`BF16_GEMM_TARGETS`)
      *and* the plain ``dot`` instructions without FP8 operands, which on a GPU are GEMMs XLA
      kept in a fusion (a Triton GEMM) instead of handing them to cuBLAS; an upcast matmul
      lowered that way is counted too;
    * ``f8_dot``: other ``dot`` instructions with FP8 operands (the CPU's emulation, a fusion
      of another kind), for diagnosis: not counted as FP8 GEMMs."""
    insts = instructions(hlo_text)
    triton = triton_gemm_computations(insts)
    out: dict[Optional[str], dict[str, int]] = {}
    for inst in insts:
        if inst.opcode == "custom-call" and (inst.target == FP8_GEMM_TARGET
                                             or inst.target in BF16_GEMM_TARGETS):
            kind = "fp8" if is_fp8_gemm(inst) else "other"
        elif inst.opcode == "dot":
            if _n_f8(inst) < 2:
                kind = "other"
            else:
                kind = "fp8_triton" if inst.computation in triton else "f8_dot"
        else:
            continue
        counts = out.setdefault(inst.group, dict(_NO_GEMMS))
        counts[kind] += 1
    return out


def fp8_policy_problems(hlo_text: str, policy: Mapping[str, str],
                        triton_counts: bool = False) -> list[str]:
    """What the compiled step does differently from the FP8 ``policy`` ({group: mode}):

    * an FP8 group (any mode but ``bf16``) without an FP8 GEMM, or with a GEMM that is not FP8
      (an upcast matmul: the cast happened, the FP8 GEMM did not);
    * a BF16 group with an FP8 GEMM.

    An FP8 GEMM is a cuBLASLt one (:data:`FP8_GEMM_TARGET` with f8 operands); with
    ``triton_counts`` a Triton GEMM fusion's dot of f8 operands is one too (what XLA's default
    options may give; compile with ``xla_gpu_enable_triton_gemm=False`` for cuBLASLt only).
    An empty list means the HLO matches the policy.
    """
    found = gemms_by_group(hlo_text)
    problems = []
    for group in fp8_lib.GROUPS:
        counts = found.get(group, _NO_GEMMS)
        mode = policy.get(group, "bf16")
        n_fp8 = counts["fp8"] + (counts["fp8_triton"] if triton_counts else 0)
        if mode == "bf16":
            n_any = counts["fp8"] + counts["fp8_triton"]
            if n_any:
                problems.append(f"group {group!r} is bf16 in the policy but has "
                                f"{n_any} FP8 GEMM(s) ({FP8_GEMM_TARGET} or Triton)")
        else:
            if not n_fp8:
                notes = ""
                if counts["fp8_triton"]:
                    notes += (f", {counts['fp8_triton']} FP8 dot(s) in Triton GEMM fusions "
                              "(not cuBLASLt)")
                if counts["f8_dot"]:
                    notes += f", {counts['f8_dot']} dot(s) of f8 operands outside cuBLASLt"
                what = f"{FP8_GEMM_TARGET}{' or Triton' if triton_counts else ''}"
                problems.append(f"group {group!r} is {mode!r} in the policy but has no FP8 GEMM "
                                f"({what} with f8 operands); "
                                f"{counts['other']} non-FP8 GEMM(s){notes}")
            elif counts["other"]:
                problems.append(f"group {group!r} is {mode!r} in the policy but "
                                f"{counts['other']} of its GEMMs are not FP8 (upcast)")
    return problems


def cudnn_attention_calls(hlo_text: str) -> dict[str, int]:
    """{'forward': n, 'backward': m} cuDNN fused-attention custom calls."""
    calls = custom_calls(hlo_text, CUDNN_ATTENTION_PREFIX)
    backward = sum("Backward" in c.target for c in calls)
    return {"forward": len(calls) - backward, "backward": backward}


def describe(found: Mapping[Optional[str], Mapping[str, int]],
             groups: Iterable[Optional[str]] = (*fp8_lib.GROUPS, None)) -> str:
    """One line per group: its FP8 and other GEMM counts (for failure messages)."""
    rows = []
    for g in groups:
        c = found.get(g, _NO_GEMMS)
        rows.append(f"{g or '(no group)'}: {c['fp8']} fp8, {c['fp8_triton']} fp8 Triton, "
                    f"{c['other']} other GEMM, {c['f8_dot']} f8 dot")
    return "; ".join(rows)
