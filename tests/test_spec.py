"""Compressor specs ("kind:arg") round-trip through `parse_spec`, bad ones fail on one line; the package's names."""

import ast
import importlib
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustsgd_jax import compress

# A small tree for topk_level, which sizes k from the shapes (numpy only: nothing is compiled here).
PARAMS = {"conv": np.zeros((3, 3, 4, 8), np.float32), "dense": np.zeros((32, 24), np.float32), "b": np.zeros(8)}

NO_ARG = ("none", "sgd", "signsgd")
INT_ARG = ("powersgd", "topk_level", "qsgd")
RATIO_ARG = ("topk", "randomk")


def test_the_strategies_cover_every_kind():
    assert set(NO_ARG + INT_ARG + RATIO_ARG) == set(compress.SPEC_KINDS)


# Canonical spec strings from_spec accepts: no spaces, an integer >= 1 written by str(), a ratio in (0, 1] by repr().
canonical_specs = st.one_of(
    st.sampled_from(NO_ARG),
    st.builds(lambda kind, n: f"{kind}:{n}", st.sampled_from(INT_ARG), st.integers(1, 512)),
    st.builds(
        lambda kind, r: f"{kind}:{r!r}",
        st.sampled_from(RATIO_ARG),
        st.floats(min_value=0, max_value=1, exclude_min=True, allow_subnormal=False),
    ),
)


@settings(max_examples=300, deadline=None)
@given(canonical_specs)
def test_canonical_specs_round_trip(s):
    spec = compress.parse_spec(s)
    assert isinstance(spec, compress.Spec)
    assert str(spec) == s
    assert compress.parse_spec(str(spec)) == spec
    assert spec.number == (0.0 if spec.arg is None else float(s.split(":")[1]))
    assert compress.from_spec(spec, PARAMS).name == compress.from_spec(s, PARAMS).name


@settings(max_examples=100, deadline=None)
@given(canonical_specs, st.sampled_from(["", " ", "  "]), st.sampled_from(["", " ", "\t"]))
def test_spaces_around_the_parts_are_dropped(s, outer, inner):
    kind, _, arg = s.partition(":")
    spaced = f"{outer}{kind}{inner}:{inner}{arg}{outer}" if arg else f"{outer}{kind}{outer}"
    assert str(compress.parse_spec(spaced)) == s


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("powerful:4", "unknown compressor spec"),
        ("adam", "unknown compressor spec"),
        ("topk_levels:2", "unknown compressor spec"),
        ("powersgd", "needs an argument"),
        ("topk", "needs an argument"),
        ("qsgd", "needs an argument"),
        ("topk_level", "needs an argument"),
        ("randomk", "needs an argument"),
        ("none:1", "takes no argument"),
        ("signsgd:2", "takes no argument"),
        ("sgd:0.5", "takes no argument"),
        ("powersgd:1.5", "bad argument"),
        ("powersgd:4e0", "bad argument"),
        ("topk_level:0.5", "bad argument"),
        ("qsgd:2.", "bad argument"),
        ("topk:1e", "bad argument"),
        ("randomk:.", "bad argument"),
        ("", "cannot parse"),
        (":4", "cannot parse"),
        ("powersgd::4", "cannot parse"),
        ("PowerSGD:4", "cannot parse"),
        ("powersgd:four", "cannot parse"),
        ("topk:0.1:2", "cannot parse"),
        ("topk:0.1\nrm -rf", "cannot parse"),
        ("powersgd 4", "cannot parse"),
    ],
)
def test_bad_specs_raise_one_line_naming_the_forms(spec, reason):
    for parse in (compress.parse_spec, lambda s: compress.from_spec(s, PARAMS)):
        with pytest.raises(ValueError, match=reason) as e:
            parse(spec)
        message = str(e.value)
        assert "\n" not in message
        assert compress.SPEC_HELP in message


@pytest.mark.parametrize("spec", ["topk:1.5", "topk:0", "randomk:-0.1", "powersgd:0", "qsgd:0", "topk_level:0"])
def test_parsable_specs_out_of_range_fail_on_one_line(spec):
    compress.parse_spec(spec)  # well formed: the constructor refuses the value
    with pytest.raises(ValueError) as e:
        compress.from_spec(spec, PARAMS)
    assert "\n" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("abcdeknoprstgqwl_:.0123456789eE+- \n"), max_size=16))
def test_any_text_parses_or_fails_on_one_line(s):
    try:
        spec = compress.parse_spec(s)
    except ValueError as e:
        assert "\n" not in str(e) and compress.SPEC_HELP in str(e)
    else:
        assert compress.parse_spec(str(spec)) == spec


# --------------------------------------------------------------------------
# The package's public names and layout.
# --------------------------------------------------------------------------

# Names the README, the tests, the attacks and the experiments write as compress.NAME.
USED_NAMES = [
    "Dense", "Sparse", "LowRank", "Quantized", "Signs", "DenseThenLowRank", "MESSAGE_TYPES", "is_message", "as_sent",
    "decompress", "worker_message", "WireCost", "message_cost", "matrix_shape", "to_matrix", "from_matrix",
    "Compressor", "CompressorState", "none", "wire_cost", "training_words", "topk", "randomk", "TOPK_SELECTIONS",
    "qsgd", "signsgd", "powersgd", "powersgd_pytorch", "PYTORCH_POWERSGD_DEFAULTS", "powersgd_plan",
    "orthonormal_columns", "DEPENDENT_RESIDUE", "powersgd_words", "topk_level_k", "topk_level", "Spec", "SPEC_HELP",
    "SPEC_KINDS", "parse_spec", "from_spec", "CompressionState", "as_optax", "last_message", "compressor_state",
]  # fmt: skip


def test_public_names_include_those_in_use():
    assert sorted(set(compress.__all__)) == sorted(compress.__all__)
    assert not set(USED_NAMES) - set(compress.__all__)
    for name in compress.__all__:
        assert hasattr(compress, name), name


def test_public_names_are_the_objects_of_their_modules():
    for name in compress.__all__:
        obj = getattr(compress, name)
        owner = getattr(obj, "__module__", None)
        if isinstance(owner, str) and owner.startswith("trustsgd_jax.compress."):
            assert getattr(importlib.import_module(owner), name) is obj, name


PACKAGE = pathlib.Path(compress.__file__).parent
# Each module imports only from those before it.
LAYERS = ["messages", "base", "sparse", "quantize", "low_rank", "levels", "spec", "optax_face"]


def test_modules_import_one_way_and_nothing_private():
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted([*LAYERS, "__init__"])
    for position, module in enumerate(LAYERS):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trustsgd_jax.compress"):
                source = node.module.rpartition(".")[2]
                assert source in LAYERS[:position], f"{module} imports from {source}"
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module} imports private {private} from {source}"
