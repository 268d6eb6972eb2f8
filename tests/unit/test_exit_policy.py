"""Where exits are checked (``octomil.engine.exit_policy``): only where a check can pay."""

import octomil  # noqa: F401, I001  (loads OpenBLAS; must precede every mlx import)

import mlx.core as mx

from octomil.config import resolve_early_exit
from octomil.engine.exit_policy import ExitPolicy, default_exit_layers, entropy_nats


def test_candidates_leave_room_for_the_head_cost():
    # 30 layers, head worth 8 layers: an exit after depth d saves 30 - d, which must exceed 8.
    assert default_exit_layers(30, 15, head_cost_layers=8.0) == (15, 18, 21)
    assert default_exit_layers(30, 8, head_cost_layers=8.0) == (8, 14, 21)
    assert default_exit_layers(30, 15, head_cost_layers=7.97) == (15, 18, 22)


def test_no_candidate_when_no_depth_can_pay():
    """Regression: quality (min 23 of 30) used to check at 23/26/29, where a check never pays."""
    assert default_exit_layers(30, 23, head_cost_layers=8.0) == ()
    policy = ExitPolicy.from_settings(resolve_early_exit("quality"), 30, head_cost_layers=8.0)
    assert policy is not None and policy.exit_layers == ()


def test_last_layer_is_never_a_candidate():
    assert max(default_exit_layers(4, 1, head_cost_layers=0.0)) == 3


def test_user_layers_are_kept_within_range():
    policy = ExitPolicy.from_settings(
        resolve_early_exit("balanced"), 30, exit_layers=(3, 16, 29, 30, 40)
    )
    assert policy.exit_layers == (16, 29)


def test_disabled_settings_give_no_policy():
    assert ExitPolicy.from_settings(resolve_early_exit(), 30) is None


def test_entropy_in_nats():
    uniform = mx.zeros((1, 8))
    assert abs(entropy_nats(uniform).item() - mx.log(mx.array(8.0)).item()) < 1e-6
    peaked = mx.array([[100.0, 0.0, 0.0]])
    assert entropy_nats(peaked).item() < 1e-6
