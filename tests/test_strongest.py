"""Consistent compression-aware objectives and the `strongest` threat model (issue 12)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustsgd_jax import compress, data, models
from trustsgd_jax.attacks import audit, errors, factored, gradients, invert, landscape, objectives, victim

SPECS = ["none", "powersgd:1", "powersgd:2", "topk:0.05", "randomk:0.1", "qsgd:4", "signsgd"]


@pytest.fixture(scope="module")
def setting():
    ds = data.load("cifar10", source="sample")
    x = data.normalize(ds.x_train[:2, ::2, ::2], "cifar10")  # 16x16 real images keep it fast
    y = ds.y_train[:2]
    model = models.make_model("convnet", 10, norm="batch", width=8)
    variables = models.init_variables(model, jax.random.key(0), (16, 16, 3))
    return model, variables, x, y


def round_message(model, variables, x, y, spec, bn_statistics):
    """Worker 0's message in a 2-worker round, local BatchNorm: the attacker's model of the victim is exact."""
    c = compress.from_spec(spec, variables["params"])
    round_ = victim.make_round(model, c, workers=2, bn_statistics=bn_statistics, batchnorm="local")
    return round_(variables, x[:, None], y[:, None]).message


# Every compressor in eval mode; train mode (local BatchNorm: the attacker's forward pass is exact) for one of each
# kind of message: dense, low-rank, sparse.
CASES = [(spec, "eval") for spec in SPECS] + [(spec, "train") for spec in ("none", "powersgd:1", "topk:0.05")]


@pytest.mark.parametrize("spec,bn_statistics", CASES)
def test_adaptive_objective_is_zero_at_the_truth_and_larger_away_from_it(setting, spec, bn_statistics):
    model, variables, x, y = setting
    msg = round_message(model, variables, x, y, spec, bn_statistics)
    attacker = invert.attack_model(model)
    train = bn_statistics == "train"
    victim_x, victim_y = jnp.asarray(x[:1]), jnp.asarray(y[:1])
    perturbed = victim_x + 0.3 * jax.random.normal(jax.random.key(1), victim_x.shape)
    names = objectives.applicable_objectives(msg)
    consistent = [n for n in names if n in ("observed", "factors", "sent_coordinates")]
    if spec in ("qsgd:4", "signsgd"):  # quantised: only the decoded message, which the quantiser moved
        assert names == ["observed"] and objectives.adaptive_objective(msg) is None
        consistent = []
    if spec == "none":
        assert names == ["observed"]
    for name in consistent if spec == "none" else [n for n in consistent if n != "observed"]:
        weights = [1.0] * len(jax.tree.leaves(variables["params"]))
        loss = jax.jit(objectives.matching_loss(attacker, variables, name, weights, train))
        at_truth, away = float(loss(victim_x, msg, victim_y)), float(loss(perturbed, msg, victim_y))
        chex.assert_trees_all_close(at_truth, 0.0, atol=2e-5)
        assert away > at_truth + 1e-3, (name, at_truth, away)
    consistency = jax.jit(objectives.consistency_loss(attacker, variables, train))
    c_truth, c_away = float(consistency(victim_x, msg, victim_y)), float(consistency(perturbed, msg, victim_y))
    if spec != "qsgd:4":  # QSGD rounds stochastically: its expectation, not its draw, is the gradient
        chex.assert_trees_all_close(c_truth, 0.0, atol=2e-5)
    assert c_away > c_truth


# SGD (observed+bn) is checked with the exact gradient below.
SYNC_SPECS = ["powersgd:1", "topk:0.05"]


@pytest.mark.parametrize("spec", SYNC_SPECS)
def test_with_batchnorm_traffic_every_objective_is_exact_on_a_synchronised_round(setting, spec):
    """Synchronised BatchNorm, train mode, 2 workers: from the link's traffic the +bn objectives are zero at the truth.

    Without it the attacker normalises by the dummy batch alone and misses the other worker's statistics: even the
    observed loss is far from zero at the truth. The tolerance is float32's over a few thousand entries.
    """
    model, variables, x, y = setting
    c = compress.from_spec(spec, variables["params"])
    seen = victim.make_round(model, c, workers=2, bn_statistics="train", batchnorm="sync")(
        variables, x[:, None], y[:, None]
    )
    msg = objectives.WithBatchNorm(seen.message, seen.bn)
    names = objectives.applicable_objectives(msg)
    plain = objectives.applicable_objectives(seen.message)
    assert names == plain + [n + "+bn" for n in plain]
    attacker = invert.attack_model(model)
    victim_x, victim_y = jnp.asarray(x[:1]), jnp.asarray(y[:1])
    perturbed = victim_x + 0.3 * jax.random.normal(jax.random.key(1), victim_x.shape)
    weights = [1.0] * len(jax.tree.leaves(variables["params"]))
    own = float(
        jax.jit(objectives.matching_loss(attacker, variables, "observed", weights, True))(victim_x, msg, victim_y)
    )
    assert own > 0.05  # the other worker's statistics, which the plain attacker lacks
    consistent = [n for n in names if n in ("factors+bn", "sent_coordinates+bn")]
    assert len(consistent) == 1
    for name in consistent:
        loss = jax.jit(objectives.matching_loss(attacker, variables, name, weights, True))
        at_truth, away = float(loss(victim_x, msg, victim_y)), float(loss(perturbed, msg, victim_y))
        chex.assert_trees_all_close(at_truth, 0.0, atol=2e-5)
        assert away > at_truth + 1e-3, (name, at_truth, away)
    consistency = jax.jit(objectives.consistency_loss(attacker, variables, True))
    chex.assert_trees_all_close(float(consistency(victim_x, msg, victim_y)), 0.0, atol=2e-5)
    assert float(consistency(perturbed, msg, victim_y)) > 1e-3
    with pytest.raises(errors.AttackError, match="BatchNorm traffic"):
        objectives.matching_loss(attacker, variables, "observed+bn", weights, True).prepare(seen.message)
    with pytest.raises(errors.AttackError, match="unknown objective"):
        objectives.matching_loss(attacker, variables, "observed+bnx", weights, True)


def test_wire_bn_gradient_is_the_sent_gradient_and_needs_the_backward_traffic(setting):
    """The +bn gradient equals worker 0's sent gradient exactly; dropping the backward cotangents breaks it."""
    model, variables, x, y = setting
    seen = victim.make_round(model, compress.none(), workers=2, bn_statistics="train", batchnorm="sync")(
        variables, x[:, None], y[:, None]
    )
    attacker = invert.attack_model(model)
    sent = jax.tree.leaves(compress.decompress(seen.message))
    grads, mismatch = gradients.wire_bn_param_grads(
        attacker, variables, jnp.asarray(x[:1]), jnp.asarray(y[:1]), seen.bn
    )
    for a, b in zip(jax.tree.leaves(grads), sent, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    assert float(mismatch) < 1e-10
    # The factored route (what the +bn objectives use) gives the same gradient, kernels as their factors.
    z = jnp.asarray(x[1:]) + 0.1  # away from the truth, where the mismatch is not zero
    plain, plain_mismatch = gradients.wire_bn_param_grads(attacker, variables, z, jnp.asarray(y[:1]), seen.bn)
    fast, fast_mismatch = gradients.wire_bn_param_grads(
        attacker, variables, z, jnp.asarray(y[:1]), seen.bn, factored=True
    )
    assert any(isinstance(g, factored.Factored) for g in fast)
    for a, b in zip(fast, jax.tree.leaves(plain), strict=True):
        a = a.dense(b.shape) if isinstance(a, factored.Factored) else a
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(fast_mismatch), float(plain_mismatch), rtol=1e-5)
    assert float(plain_mismatch) > 1e-3
    msg = objectives.WithBatchNorm(seen.message, seen.bn)
    assert objectives.applicable_objectives(msg) == ["observed", "observed+bn"]
    weights = [1.0] * len(sent)
    loss = jax.jit(objectives.matching_loss(attacker, variables, "observed+bn", weights, True))
    chex.assert_trees_all_close(float(loss(jnp.asarray(x[:1]), msg, jnp.asarray(y[:1]))), 0.0, atol=2e-5)
    forward_only = jax.tree.map(lambda t: t, seen.bn)
    for layer in forward_only.values():
        layer["BatchNorm_0"]["grad_received"] = jnp.zeros_like(layer["BatchNorm_0"]["grad_received"])
    grads, _ = gradients.wire_bn_param_grads(attacker, variables, jnp.asarray(x[:1]), jnp.asarray(y[:1]), forward_only)
    first = jax.tree.leaves(grads)[0], sent[0]  # Conv_0's kernel lies before every BatchNorm: the path matters
    assert float(jnp.abs(first[0] - first[1]).max()) > 1e-3 * float(jnp.abs(first[1]).max())


def test_strongest_on_a_synchronised_round_runs_the_bn_candidates(setting):
    model, variables, x, y = setting
    r = audit.audit(
        model,
        variables,
        x[:1],
        y[:1],
        compress.none(),
        dataset="cifar10",
        threat="strongest",
        workers=2,
        other_images=x[1:2][:, None, None],
        other_labels=y[1:2][:, None, None],
        bn_statistics="train",
        batchnorm="sync",
        config=invert.AttackConfig(iterations=20, chunk=10),
        progress=False,
    )
    assert set(r.candidate_ssim) == {"observed", "observed+bn"} and r.chosen[0] in r.candidate_ssim


def test_unknown_or_inapplicable_threat_fails_with_one_line(setting):
    model, variables, x, y = setting
    dense = round_message(model, variables, x, y, "qsgd:4", "eval")
    for threat, message in (("oracle", "unknown threat model 'oracle'; use one of"), ("adaptive", "does not apply")):
        with pytest.raises(errors.AttackError, match=message) as e:
            invert.threat_objectives(threat, dense)
        assert "\n" not in str(e.value)
    assert invert.threat_objectives("strongest", dense) == ["observed"]


def test_strongest_selects_by_consistency_never_by_the_originals(setting):
    """The audit's choice equals that of `invert_gradients`, which never receives an image."""
    model, variables, x, y = setting
    c = compress.powersgd(1)
    cfg = invert.AttackConfig(iterations=60, chunk=30, restarts=2, parallel=4)
    other = x[::-1][:, None, None]
    r = audit.audit(
        model,
        variables,
        x,
        y,
        c,
        dataset="cifar10",
        threat="strongest",
        config=cfg,
        workers=2,
        other_images=other,
        other_labels=y[::-1][:, None, None],
        bn_statistics="eval",
        progress=False,
    )
    assert r.reconstructions.shape == x.shape and len(r.chosen) == 2
    assert set(r.candidate_ssim) == {"observed", "factors", "factors_residual"}
    assert set(r.chosen) <= set(r.candidate_ssim)
    assert np.all(r.upper_bound_ssim >= r.per_image["ssim"] - 1e-6)
    for name, s in r.candidate_ssim.items():
        assert np.all(r.upper_bound_ssim >= s - 1e-6), name
    # The same messages inverted without any image in reach give the same choice.
    round_ = victim.make_round(model, c, workers=2, bn_statistics="eval")
    msgs = [
        round_(variables, np.stack([x[i : i + 1], other[i, 0]]), np.stack([y[i : i + 1], y[::-1][i : i + 1]])).message
        for i in range(2)
    ]
    inv = invert.invert_gradients(
        invert.attack_model(model),
        variables,
        msgs,
        y[:, None],
        (16, 16, 3),
        "cifar10",
        threat="strongest",
        config=cfg,
        progress=False,
    )
    assert inv.chosen == r.chosen
    np.testing.assert_allclose(inv.loss, r.matching_loss, rtol=1e-6)


@pytest.mark.parametrize("spec", ["powersgd:1", "topk:0.05"])
def test_candidates_side_by_side_in_one_program_equal_one_program_each(setting, spec):
    """`strongest`'s objectives side by side in one program (parallel=8) or one program each (parallel=2): same attacks.

    Both batch the two images' attacks two at a time (vmap), so only the lanes differ.
    """
    model, variables, x, y = setting
    msgs = [
        round_message(model, variables, x, y, spec, "eval"),
        round_message(model, variables, x[::-1], y[::-1], spec, "eval"),
    ]
    y = np.stack([y, y[::-1]])[:, :1]
    names = tuple(objectives.applicable_objectives(msgs[0]))
    assert len(names) == 3
    attacker = invert.attack_model(model)
    out = {}
    for parallel in (2, 8):
        cfg = invert.AttackConfig(iterations=20, chunk=10, parallel=parallel)
        out[parallel] = invert.invert_gradients(
            attacker,
            variables,
            msgs,
            y,
            (16, 16, 3),
            "cifar10",
            threat="strongest",
            config=cfg,
            progress=False,
        )
    for name in names:  # each lane keeps its own objective: swapped lanes would differ here
        np.testing.assert_allclose(out[8].candidates[name], out[2].candidates[name], rtol=1e-4, atol=1e-4)
    assert out[8].chosen == out[2].chosen
    np.testing.assert_allclose(out[8].loss, out[2].loss, rtol=1e-4, atol=1e-6)
    # The compiled lanes' final losses are each objective's own.
    cfg = invert.AttackConfig(iterations=1, parallel=3, devices=1)
    z = jnp.asarray(x[None, :1]) + 0.1
    msg, yy = jax.tree.map(lambda t: t[None], msgs[0]), jnp.asarray(y[None, 0])
    together = invert.compile_attack(attacker, variables, names, cfg, "cifar10", (16, 16, 3), train=False, width=1)
    lanes = together.final_loss(tuple(z for _ in names), msg, yy)
    assert isinstance(lanes, tuple) and len(lanes) == len(names)
    for name, lane in zip(names, lanes, strict=True):
        alone = invert.compile_attack(attacker, variables, name, cfg, "cifar10", (16, 16, 3), train=False, width=1)
        np.testing.assert_allclose(np.asarray(lane), np.asarray(alone.final_loss(z, msg, yy)), rtol=1e-5)
    assert len({float(lane[0]) for lane in lanes}) == len(names)  # the objectives differ, so a mix-up shows


def test_loss_profile_is_zero_at_the_truth_and_rises_with_the_noise(setting):
    model, variables, x, y = setting
    msg = round_message(model, variables, x, y, "none", "eval")
    profile = landscape.loss_profile(
        invert.attack_model(model), variables, msg, x[:1], y[:1], others=x[1:][:, None], sigmas=(0.01, 0.3, 3.0)
    )
    assert profile.at_truth < 1e-5
    assert profile.loss[0] < profile.loss[1] < profile.loss[2] and profile.loss[0] < profile.random_images


def _plain_reference_loss(model, variables, objective, train):
    """Each objective written directly on the plain autodiff gradient: the formulas, not this package's views."""

    def loss(x, msg, y):
        grads = jax.tree.leaves(gradients.param_grads(model, variables, x, y, train))
        leaves = objectives.message_leaves(msg)
        feats, targets, support, outside, total = [], [], 0.0, 0.0, 0.0
        for g, m in zip(grads, leaves):
            if objective in ("factors", "factors_residual") and isinstance(m, compress.LowRank):
                mat = compress.to_matrix(g)  # [C_out, K]
                feats.append(jnp.concatenate([(mat.T @ m.p_hat).ravel(), (mat @ m.q_prev).ravel()]))
                targets.append(jnp.concatenate([m.q.ravel(), m.p.ravel()]))
                proj = m.p_hat @ (m.p_hat.T @ mat)
                outside += jnp.sum((mat - proj) ** 2)
                total += jnp.sum(mat**2)
            elif objective == "sent_coordinates" and isinstance(m, compress.Sparse):
                feats.append(g.ravel()[m.indices])
                targets.append(m.values)
            else:
                feats.append(g.ravel())
                targets.append(m.dense().ravel())
        f, t = jnp.concatenate(feats), jnp.concatenate(targets)
        out = 1 - f @ t / (jnp.linalg.norm(f) * jnp.linalg.norm(t))
        if objective in ("sent_coordinates", "cosine_support"):
            scale = jnp.linalg.norm(t) / jnp.linalg.norm(f)
            for g, m in zip(grads, leaves):
                if isinstance(m, compress.Sparse) and m.indices_on_wire:
                    unsent = jnp.abs(g.ravel().at[m.indices].set(0.0)) * scale
                    support += jnp.sum(jax.nn.relu(unsent - jnp.min(jnp.abs(m.values))) ** 2)
            out = out + support / jnp.sum(t**2)
        if objective == "factors_residual":
            out = out + outside / total
        return out

    return loss


# Observed on a dense target is test_gradinv's test_factored_gradients_equal_plain_autodiff; `factors` in eval
# mode is the first term of `factors_residual` (a mutated factor match fails that case too).
FACTORED_CASES = [
    ("powersgd:2", "observed", "eval"),
    ("powersgd:2", "factors_residual", "eval"),
    ("powersgd:1", "factors", "train"),
    ("topk:0.05", "sent_coordinates", "eval"),
    ("topk:0.05", "cosine_support", "train"),
    ("randomk:0.1", "sent_coordinates", "eval"),
]


@pytest.mark.parametrize("spec,objective,bn_statistics", FACTORED_CASES)
def test_every_objective_on_the_factored_route_equals_plain_autodiff(setting, spec, objective, bn_statistics):
    """Value and input gradient of each objective, factored kernels and factored targets, against the formulas."""
    model, variables, x, y = setting
    msg = round_message(model, variables, x, y, spec, bn_statistics)
    attacker = invert.attack_model(model)
    train = bn_statistics == "train"
    z = jnp.asarray(x[1:]) + 0.1  # away from the truth, where every term is non-zero
    yz = jnp.asarray(y[:1])
    weights = [1.0] * len(jax.tree.leaves(variables["params"]))
    fast = objectives.matching_loss(attacker, variables, objective, weights, train)
    slow = _plain_reference_loss(attacker, variables, objective, train)
    assert any(isinstance(g, factored.Factored) for g in gradients.factored_param_grads(attacker, variables, z, yz))
    # One program per side for the value and its input gradient (compiling each separately doubled the time).
    v_fast, g_fast = jax.jit(jax.value_and_grad(fast))(z, msg, yz)
    v_slow, g_slow = jax.jit(jax.value_and_grad(slow))(z, msg, yz)
    np.testing.assert_allclose(float(v_fast), float(v_slow), rtol=2e-5, atol=1e-6)
    assert float(jnp.linalg.norm(g_fast - g_slow) / jnp.linalg.norm(g_slow)) < 1e-4


def test_low_rank_dense_targets_keep_the_observed_loss_and_its_gradient():
    """A dense deep-layer target held as U V^T at its measured rank: the same value and input gradient."""
    ds = data.load("cifar10", source="sample")
    x = data.normalize(ds.x_train[:3, ::4, ::4], "cifar10")  # 8x8 images: the last convolution has 2x2 positions
    y = ds.y_train[:3]
    model = models.make_model("convnet", 10, width=32)  # ... against 64 channels and 576 patch entries
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
    # The aggregate of 2 workers: a dense message that is not the dummy's own gradient (rank 2 x 4 rows).
    round_ = victim.make_round(model, compress.none(), workers=2, observer="aggregate", bn_statistics="eval")
    msg = round_(variables, x[:2, None], y[:2, None]).message
    attacker = invert.attack_model(model)
    ranks = objectives.dense_target_ranks(attacker, variables, [msg], (1, 8, 8, 3), False)
    assert sorted({r for r in ranks if r is not None}) == [8 + objectives.RANGE_OVERSAMPLING], ranks
    weights = [1.0] * len(jax.tree.leaves(variables["params"]))
    z, yz = jnp.asarray(x[2:]), jnp.asarray(y[:1])

    def observed(target_ranks):
        loss = objectives.matching_loss(attacker, variables, "observed", weights, False, target_ranks)
        return jax.jit(jax.value_and_grad(loss))

    v_thin, g_thin = observed(ranks)(z, msg, yz)
    v_dense, g_dense = observed(None)(z, msg, yz)
    np.testing.assert_allclose(float(v_thin), float(v_dense), rtol=1e-5)
    assert float(jnp.linalg.norm(g_thin - g_dense) / jnp.linalg.norm(g_dense)) < 1e-4
    # Below the message's true rank a genuine direction is dropped: the loss moves (the test can fail).
    short = tuple(None if r is None else r - objectives.RANGE_OVERSAMPLING - 1 for r in ranks)
    v_short, _ = observed(short)(z, msg, yz)
    assert abs(float(v_short) - float(v_dense)) > 1e-4 * abs(float(v_dense))
    # The compiled attack, two attacks batched (prepare runs per attack, under vmap): the same losses.
    config = invert.AttackConfig(iterations=1, parallel=2, devices=1)
    two = jax.tree.map(lambda t: jnp.stack([t, t]), msg)
    zz, yy = jnp.stack([z, z + 0.1]), jnp.stack([yz, yz])
    losses = [
        invert.compile_attack(
            attacker, variables, "observed", config, "cifar10", (8, 8, 3), train=False, width=2, target_ranks=r
        ).final_loss(zz, two, yy)
        for r in (ranks, None)
    ]
    np.testing.assert_allclose(np.asarray(losses[0]), np.asarray(losses[1]), rtol=1e-5)
