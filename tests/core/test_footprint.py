"""The footprint model's pure parts: optimizer state by name and options, bytes by dtype, the sum."""
from __future__ import annotations

import pytest

from mxnet_mirror_hook.core.footprint import (Footprint, gradient_count, known_optimizers,
                                              optimizer_state_bytes, optimizer_state_tensors,
                                              tensor_bytes)

SHAPE = (10, 4)


def test_sgd_without_momentum_keeps_no_state_and_with_momentum_one_array_of_the_weights_dtype():
    assert optimizer_state_tensors("sgd", SHAPE, "float32") == ()
    assert optimizer_state_tensors("sgd", SHAPE, "float64", {"momentum": 0.9}) == ((SHAPE, "float64"),)
    assert optimizer_state_tensors("NAG", SHAPE, "float32", {"momentum": 0.5}) == ((SHAPE, "float32"),)


def test_signum_has_momentum_by_default():
    assert optimizer_state_tensors("signum", SHAPE, "float32") == ((SHAPE, "float32"),)
    assert optimizer_state_tensors("signum", SHAPE, "float32", {"momentum": 0.0}) == ()


def test_adam_family_keeps_two_arrays_and_ftml_three():
    for name in ("adam", "bertadam", "lamb", "nadam", "adamax"):
        assert optimizer_state_bytes(name, SHAPE, "float16") == 2 * 40 * 2, name
    assert optimizer_state_bytes("ftml", SHAPE, "float32") == 3 * 40 * 4


def test_optimizers_that_ignore_the_weights_dtype_keep_float32_state():
    # AdaGrad, RMSProp, AdaDelta and Ftrl call zeros() without a dtype: float32 always.
    assert optimizer_state_tensors("rmsprop", SHAPE, "float64") == ((SHAPE, "float32"),)
    assert len(optimizer_state_tensors("rmsprop", SHAPE, "float64", {"centered": True})) == 3
    assert optimizer_state_bytes("adagrad", SHAPE, "float16") == 40 * 4
    assert optimizer_state_bytes("adadelta", SHAPE, "float64") == 2 * 40 * 4


def test_multi_precision_adds_a_float32_master_copy_and_float32_state_for_float16_weights_only():
    assert optimizer_state_tensors("sgd", SHAPE, "float16", {"momentum": 0.9, "multi_precision": True}) \
        == ((SHAPE, "float32"), (SHAPE, "float32"))
    assert optimizer_state_bytes("adam", SHAPE, "float16", {"multi_precision": True}) == 3 * 40 * 4
    assert optimizer_state_bytes("adam", SHAPE, "float32", {"multi_precision": True}) == 2 * 40 * 4


def test_dcasgd_keeps_the_previous_weight_and_groupadagrad_one_value_per_row():
    assert optimizer_state_tensors("dcasgd", SHAPE, "float32") == ((SHAPE, "float32"),)
    assert optimizer_state_bytes("dcasgd", SHAPE, "float32", {"momentum": 0.9}) == 2 * 40 * 4
    assert optimizer_state_tensors("groupadagrad", SHAPE, "float32") == (((10, 1), "float32"),)


def test_no_optimizer_means_no_state_and_an_unknown_one_is_refused():
    assert optimizer_state_bytes(None, SHAPE, "float32") == 0
    with pytest.raises(ValueError, match="knows"):
        optimizer_state_bytes("adamw", SHAPE, "float32")
    assert "bertadam" in known_optimizers() and "adamw" not in known_optimizers()


def test_bytes_follow_the_dtype_and_gradients_follow_grad_req():
    assert [tensor_bytes((3, 5), d) for d in ("float16", "float32", "float64")] == [30, 60, 120]
    assert [gradient_count(r) for r in ("null", "write", "add")] == [0, 1, 1]
    with pytest.raises(ValueError):
        gradient_count("sometimes")


def test_the_footprint_total_is_the_sum_of_its_parts_and_the_summary_names_them():
    found = Footprint.from_bytes(parameters=2 << 20, gradients=2 << 20, optimizer_state=4 << 20,
                                 activations=10 << 20, mkldnn_copies=1 << 20)
    assert found.total == pytest.approx(19.0)
    assert found.beside_activations == pytest.approx(9.0)
    assert found.to_dict()["total"] == pytest.approx(19.0)
    assert found.to_dict()["optimizer_state"] == pytest.approx(4.0)
    line = found.summary()
    assert line.startswith("footprint 19 MB (") and "optimizer 4" in line and "mkldnn 1" in line
    assert "workspace" not in line  # parts under half a MB are left out of the line
