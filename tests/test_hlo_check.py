"""The HLO reading behind the GPU FP8/cuDNN tests, on synthetic HLO text (the shapes and
spelling of XLA's GPU output, operands named as compiled HLO prints them, or with inline
types) and on this machine's compiled step (the op_name scopes that map every forward and
backward matmul to its FP8 group, every dot's operand types, the CPU's upcast FP8 matmuls
reported as such)."""

import jax
import jax.numpy as jnp
import pytest
from flax.core import meta as flax_meta

from umup_jax import fp8 as fp8_lib
from umup_jax import hlo_check
from umup_jax.model import Decoder, ModelConfig, abstract_params

META = ('metadata={{op_name="jit(step)/{path}/dot_general" source_file="model.py" '
        'source_line=1}}')


INLINE = {"types": False}  # what gemm() and dot() write; set by the `operand_style` fixture


def _operands(*typed):
    """An operand list as compiled HLO prints it (``%x, %w``: XLA's default print options
    leave out operand shapes) or, with ``INLINE['types']``, with inline types."""
    if INLINE["types"]:
        return ", ".join(f"{t} %{n}" for t, n in typed)
    return ", ".join(f"%{n}" for _, n in typed)


def _defs(*typed):
    """The lines defining named operands (a convert fusion each), as the module holds them."""
    return [f"  %{n} = {t} fusion(%p), kind=kLoop, calls=%convert" for t, n in typed]


def gemm(name, target, a, b, path, result="bf16[128,384]{1,0}"):
    typed = ((f"{a}[128,128]{{1,0}}", f"{name}.x"), (f"{b}[384,128]{{1,0}}", f"{name}.w"),
             ("f32[]", "one"), ("f32[]", "one.1"))
    return "\n".join(_defs(*typed[:2]) + [
        f'  %{name} = ({result}, s8[33554432]{{0}}) custom-call({_operands(*typed)}), '
        f'custom_call_target="{target}", ' + META.format(path=path)
        + ', backend_config={"gemm_backend_config":{}}'])


def dot(name, a, b, path):
    """A dot XLA left outside cuBLAS(Lt) (a fused Triton GEMM), its operands defined too."""
    typed = ((f"{a}[128,128]{{1,0}}", f"{name}.x"), (f"{b}[128,64]{{1,0}}", f"{name}.y"))
    return "\n".join(_defs(*typed) + [
        f"  %{name} = bf16[128,64]{{1,0}} dot({_operands(*typed)}), lhs_contracting_dims={{1}}, "
        "rhs_contracting_dims={0}, " + META.format(path=path)])


@pytest.fixture(params=["names", "inline"])
def operand_style(request):
    """Every synthetic test in both spellings: operands by name (what ``Compiled.as_text``
    prints) and with inline types (other dumps)."""
    INLINE["types"] = request.param == "inline"
    yield request.param
    INLINE["types"] = False


F8 = hlo_check.FP8_GEMM_TARGET
LAYER = "jvp(Decoder.loss)/Decoder/layer_0"
BWD = "transpose(jvp(Decoder.loss))/Decoder/layer_0"


def module(*lines):
    return "\n".join(["HloModule jit_step, entry_computation_layout={()->()}", "",
                      "ENTRY %main.1 () -> () {", "  %p = bf16[128,384]{1,0} parameter(0)",
                      "  %one = f32[] constant(1)", "  %one.1 = f32[] constant(1)", *lines, "}"])


def paper_large_ok():
    return module(
    gemm("cc.1", F8, "f8e4m3fn", "f8e4m3fn", f"{LAYER}/fp8_qkv"),
    gemm("cc.2", F8, "f8e5m2", "f8e4m3fn", f"{BWD}/fp8_qkv"),
    gemm("cc.3", F8, "f8e4m3fn", "f8e5m2", f"{BWD}/fp8_qkv"),
    gemm("cc.4", "__cublas$gemm", "bf16", "bf16", f"{LAYER}/fp8_attn_out"),
    gemm("cc.5", "__cublas$lt$matmul", "bf16", "bf16", f"{BWD}/fp8_attn_out"),
    gemm("cc.6", F8, "f8e4m3fn", "f8e4m3fn", f"{LAYER}/fp8_ffn_in"),
    gemm("cc.7", "__cublas$gemm", "bf16", "bf16", f"{LAYER}/fp8_ffn_down"),
    gemm("cc.8", F8, "f8e4m3fn", "f8e4m3fn", "jvp(Decoder.loss)/Decoder/fp8_readout"),
        *_defs(*[("bf16[4,128,2,64]{3,2,1,0}", n) for n in ("q", "k", "v")]),
        '  %fmha = (bf16[4,128,2,64]{3,2,1,0}, f32[4,2,128]{2,1,0}, u8[0]{0}) custom-call('
        + _operands(*[("bf16[4,128,2,64]{3,2,1,0}", n) for n in ("q", "k", "v")])
        + '), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/x"}',
        '  %fmha.out = bf16[4,128,2,64]{3,2,1,0} get-tuple-element(%fmha), index=0',
        '  ROOT %fmha.bwd = (bf16[4,128,2,64]{3,2,1,0}) custom-call('
        + _operands(("bf16[4,128,2,64]{3,2,1,0}", "fmha.out"), ("f32[]", "one"))
        + '), custom_call_target="__cudnn$fmhaSoftmaxBackward"',
    )


@pytest.mark.usefixtures("operand_style")
def test_parses_gemms_and_groups():
    hlo = paper_large_ok()
    found = hlo_check.gemms_by_group(hlo)
    counts = lambda fp8, other: {"fp8": fp8, "fp8_triton": 0, "other": other,  # noqa: E731
                                 "f8_dot": 0}
    assert found == {"qkv": counts(3, 0), "attn_out": counts(0, 2), "ffn_in": counts(1, 0),
                     "ffn_down": counts(0, 1), "readout": counts(1, 0)}
    assert hlo_check.fp8_policy_problems(hlo, fp8_lib.PRESETS["paper_large"]) == []
    assert hlo_check.cudnn_attention_calls(hlo) == {"forward": 1, "backward": 1}
    by_name = {i.name: i for i in hlo_check.instructions(hlo)}
    assert by_name["cc.1"].operand_types == ("f8e4m3fn", "f8e4m3fn", "f32", "f32")
    assert by_name["cc.1"].group == "qkv"
    assert by_name["cc.2"].operand_types[:2] == ("f8e5m2", "f8e4m3fn")
    # A tuple-valued operand has no element type; a get-tuple-element of it has its own.
    assert by_name["fmha.out"].operand_types == ()
    assert by_name["fmha.bwd"].operand_types == ("bf16", "f32")


@pytest.mark.parametrize("op_name, group", [
    (f"{LAYER}/fp8_ffn_down/dot_general", "ffn_down"),
    # The down-projection's backward, traced anew inside ops.recompute_middle's custom VJP.
    (f"{BWD}/transpose(transpose(jvp(Decoder.loss)))/Decoder/layer_0/jvp(fp8_ffn_down)/dot_general",
     "ffn_down"),
    (f"{BWD}/transpose(jvp(fp8_qkv))/dot_general", "qkv"),
    (f"{LAYER}/fp8_ffn_in", "ffn_in"),
    # Not a scope: a longer name, or the text inside another segment.
    (f"{LAYER}/fp8_ffn_inner/dot_general", None),
    (f"{LAYER}/my_fp8_qkv/dot_general", None),
    (f"{LAYER}/attention/dot_general", None),
])
def test_group_scope_is_read_inside_transform_wrappers(op_name, group):
    inst = hlo_check.Instruction("d", "dot", "f32[2,2]", ("f32", "f32"), None, op_name)
    assert inst.group == group


@pytest.mark.usefixtures("operand_style")
def test_long_operand_lists_lose_xlas_index_comments():
    """XLA prints ``/*index=5*/`` before every fifth operand of a long list (a multi-operand
    all-reduce, a fusion of many inputs): the operand is still named and typed.  Before
    2026-12-07 it was read as the name ``/*index=5*/%p5``, untyped, and its bytes were
    missing from :mod:`umup_jax.hlo_traffic`'s counts (0.6-3% of the H100 steps' traffic)."""
    params = "\n".join(f"  %p{i} = f32[{i + 1}]{{0}} parameter({i})" for i in range(11))
    operands = ", ".join(("/*index=5*/" if i == 5 else "/*index=10*/" if i == 10 else "")
                         + f"%p{i}" for i in range(11))
    text = ("HloModule m\n\nENTRY %main () -> f32[] {\n" + params + "\n"
            f"  ROOT %f = f32[] fusion({operands}), kind=kLoop, calls=%c\n}}\n")
    fusion = next(i for i in hlo_check.instructions(text) if i.name == "f")
    assert fusion.operands == tuple(f"p{i}" for i in range(11))
    assert fusion.operand_texts == tuple(f"f32[{i + 1}]{{0}}" for i in range(11))
    assert fusion.operand_types == ("f32",) * 11


def test_policy_mismatches_are_reported():
    # paper_simple wants every group in FP8: attn_out and ffn_down ran in bf16.
    problems = hlo_check.fp8_policy_problems(paper_large_ok(), fp8_lib.PRESETS["paper_simple"])
    assert problems == [
        "group 'attn_out' is 'fp8' in the policy but has no FP8 GEMM (__cublas$lt$matmul$f8 "
        "with f8 operands); 2 non-FP8 GEMM(s)",
        "group 'ffn_down' is 'fp8' in the policy but has no FP8 GEMM (__cublas$lt$matmul$f8 "
        "with f8 operands); 1 non-FP8 GEMM(s)"]
    # 'none' wants no FP8 GEMM at all.
    assert len(hlo_check.fp8_policy_problems(paper_large_ok(), fp8_lib.PRESETS["none"])) == 3
    # An upcast backward GEMM in an FP8 group, and an f8 target fed bf16 operands.
    upcast = module(gemm("a", F8, "f8e4m3fn", "f8e4m3fn", f"{LAYER}/fp8_qkv"),
                    gemm("b", "__cublas$gemm", "bf16", "bf16", f"{BWD}/fp8_qkv"),
                    gemm("c", F8, "bf16", "bf16", f"{LAYER}/fp8_ffn_in"),
                    # an FP8 dot XLA left in a fusion (Triton): reported, not counted
                    dot("d", "f8e4m3fn", "f8e4m3fn", f"{LAYER}/fp8_ffn_down"))
    policy = {"qkv": "fp8", "ffn_in": "fp8", "ffn_down": "fp8"}
    assert hlo_check.fp8_policy_problems(upcast, policy) == [
        "group 'qkv' is 'fp8' in the policy but 1 of its GEMMs are not FP8 (upcast)",
        "group 'ffn_in' is 'fp8' in the policy but has no FP8 GEMM (__cublas$lt$matmul$f8 "
        "with f8 operands); 1 non-FP8 GEMM(s)",
        "group 'ffn_down' is 'fp8' in the policy but has no FP8 GEMM (__cublas$lt$matmul$f8 "
        "with f8 operands); 0 non-FP8 GEMM(s), 1 dot(s) of f8 operands outside "
        "cuBLASLt"]
    assert hlo_check.cudnn_attention_calls(upcast) == {"forward": 0, "backward": 0}


def _triton_gemm(name, a, b, path):
    """XLA:GPU's Triton GEMM fusion (the computation holding the dot, and the fusion calling
    it from the entry), as the H100 compile of jax 0.11 prints it."""
    typed = ((f"{a}[128,128]{{1,0}}", f"{name}.p0"), (f"{b}[128,384]{{1,0}}", f"{name}.p1"))
    computation = "\n".join([
        f"%{name}_computation (p0: {a}[128,128], p1: {b}[128,384]) -> bf16[128,384] {{",
        f"  %{name}.p0 = {a}[128,128]{{1,0}} parameter(0)",
        f"  %{name}.p1 = {b}[128,384]{{1,0}} parameter(1)",
        f"  %{name}.dot = f32[128,384]{{1,0}} dot({_operands(*typed)}), "
        "lhs_contracting_dims={1}, rhs_contracting_dims={0}, " + META.format(path=path),
        f"  ROOT %{name}.out = bf16[128,384]{{1,0}} convert(%{name}.dot)",
        "}", ""])
    fusion = (f"  %{name} = bf16[128,384]{{1,0}} fusion("
              + _operands(("bf16[128,128]{1,0}", "one"), ("bf16[128,384]{1,0}", "one.1"))
              + f"), kind=kCustom, calls=%{name}_computation, "
              + META.format(path=path) + ', backend_config={"operation_queue_id":"0",'
              '"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}')
    return computation, fusion


@pytest.mark.usefixtures("operand_style")
def test_an_upcast_gemm_left_in_a_fusion_is_not_fp8():
    """A bf16 dot in a Triton GEMM fusion inside an FP8 group is an upcast GEMM, even when the
    group also has its cuBLASLt FP8 GEMMs; a dot of f8 operands there is an FP8 GEMM that
    Triton runs, counted as one only when asked (``triton_counts``)."""
    up_comp, up_fusion = _triton_gemm("gemm_fusion_dot.3", "bf16", "bf16", f"{BWD}/fp8_qkv")
    f8_comp, f8_fusion = _triton_gemm("gemm_fusion_dot.4", "f8e4m3fn", "f8e4m3fn",
                                      f"{LAYER}/fp8_ffn_in")
    f8_bf16_comp, f8_bf16_fusion = _triton_gemm("gemm_fusion_dot.5", "f8e5m2", "f8e4m3fn",
                                                f"{LAYER}/fp8_attn_out")
    fused = "\n".join([
        "HloModule jit_step, entry_computation_layout={()->()}", "",
        up_comp, f8_comp, f8_bf16_comp,
        "ENTRY %main.1 () -> () {",
        "  %one = f32[] constant(1)", "  %one.1 = f32[] constant(1)",
        gemm("cc.1", F8, "f8e4m3fn", "f8e4m3fn", f"{LAYER}/fp8_qkv"),
        gemm("cc.2", F8, "f8e5m2", "f8e4m3fn", f"{BWD}/fp8_qkv"),
        up_fusion, f8_fusion, f8_bf16_fusion,
        "}"])
    found = hlo_check.gemms_by_group(fused)
    assert found["qkv"] == {"fp8": 2, "fp8_triton": 0, "other": 1, "f8_dot": 0}
    assert found["ffn_in"] == {"fp8": 0, "fp8_triton": 1, "other": 0, "f8_dot": 0}
    assert found["attn_out"] == {"fp8": 0, "fp8_triton": 1, "other": 0, "f8_dot": 0}
    policy = {"qkv": "fp8", "ffn_in": "fp8"}  # attn_out: bf16
    assert hlo_check.fp8_policy_problems(fused, policy) == [
        "group 'qkv' is 'fp8' in the policy but 1 of its GEMMs are not FP8 (upcast)",
        "group 'attn_out' is bf16 in the policy but has 1 FP8 GEMM(s) "
        "(__cublas$lt$matmul$f8 or Triton)",
        "group 'ffn_in' is 'fp8' in the policy but has no FP8 GEMM (__cublas$lt$matmul$f8 "
        "with f8 operands); 0 non-FP8 GEMM(s), 1 FP8 dot(s) in Triton GEMM fusions "
        "(not cuBLASLt)"]
    assert hlo_check.fp8_policy_problems(fused, policy, triton_counts=True) == [
        "group 'qkv' is 'fp8' in the policy but 1 of its GEMMs are not FP8 (upcast)",
        "group 'attn_out' is bf16 in the policy but has 1 FP8 GEMM(s) "
        "(__cublas$lt$matmul$f8 or Triton)"]
    assert hlo_check.fp8_policy_problems(
        fused, {**policy, "attn_out": "fp8_e5m2_input"}, triton_counts=True) == [
        "group 'qkv' is 'fp8' in the policy but 1 of its GEMMs are not FP8 (upcast)"]
    assert hlo_check.triton_gemm_computations(hlo_check.instructions(fused)) == {
        "gemm_fusion_dot.3_computation", "gemm_fusion_dot.4_computation",
        "gemm_fusion_dot.5_computation"}


def test_every_matmul_of_the_step_carries_its_group_scope():
    """On this machine's compiled gradient (CPU: plain dots), every forward and transposed
    (backward) matmul of a linear is named by its fp8_<group> scope, scanned or not; every dot's
    two operand types are read (compiled HLO names operands without types: reading only inline
    types found none, and every FP8 GEMM on a GPU would have looked upcast); and the CPU's
    matmuls, which take the FP8-cast values upcast to bf16, are reported as no FP8 GEMM in every
    group of ``paper_simple``."""
    for scan in (False, True):
        cfg = ModelConfig(vocab_size=32, width=16, depth=1, num_heads=1, seq_len=8,
                          dtype="bfloat16", fp8="paper_simple", scan_layers=scan)
        model = Decoder(cfg)
        params = flax_meta.unbox(abstract_params(model))
        tokens = jnp.zeros((2, 8), jnp.int32)
        hlo = jax.jit(jax.grad(lambda p: model.apply(p, tokens, tokens, method=Decoder.loss))
                      ).lower(params).compile().as_text()
        dots = [i for i in hlo_check.instructions(hlo) if i.opcode == "dot"]
        by_group: dict = {}
        for d in dots:
            key = (d.group, "transpose(" in d.op_name)
            by_group[key] = by_group.get(key, 0) + 1
        for group in fp8_lib.GROUPS:
            assert by_group.get((group, False)), (scan, group, by_group)  # forward
            assert by_group.get((group, True)), (scan, group, by_group)  # backward
        # The attention's own two matmuls (and their transposes) belong to no group.
        assert by_group.get((None, False), 0) >= 2
        assert all(len(d.operand_types) == 2 for d in dots), [
            (d.name, d.operand_types) for d in dots if len(d.operand_types) != 2]
        assert {t for d in dots for t in d.operand_types} == {"bf16", "f32"}
        problems = hlo_check.fp8_policy_problems(hlo, fp8_lib.PRESETS["paper_simple"])
        assert len(problems) == len(fp8_lib.GROUPS), problems
        assert all("has no FP8 GEMM" in p and " 0 non-FP8" not in p for p in problems), problems
        assert hlo_check.fp8_policy_problems(hlo, fp8_lib.PRESETS["none"]) == []
