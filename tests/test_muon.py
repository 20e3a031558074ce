"""Our Muon: same maths as optax's, same updates as nanochat's PyTorch Muon (golden file), and its design properties."""
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers, scale_by_muon as optax_scale_by_muon

from nanochat_jax.muon import aspect_scale, newton_schulz, scale_by_muon

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "..", "shared", "golden", "muon_steps.npz")
SHAPES = [(64, 256), (256, 64), (96, 80)]  # Flax (in, out): wide, tall (2x scale), near-square


def rel_err(x, ref):
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


def random_grads(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)  # numpy, not jax.random: eager jax ops compile once per shape
    return {f"w{i}": jnp.asarray(rng.standard_normal(s), jnp.float32) for i, s in enumerate(shapes)}


@jax.default_matmul_precision("highest")  # real f32 matmuls on GPUs too (not TF32)
def test_matches_optax_muon_in_float32():
    """optax's Muon with the same maths: NS in f32 on both sides, eps 1e-7, and optax's bias correction switched
    off by starting its step count at 10^6 (0.95^10^6 underflows to 0, so 1 - β^t is exactly 1); the aspect
    scale is optax's scale_by_shape rule sqrt(max(1, fan_out/fan_in)), applied here by hand."""
    ours = scale_by_muon(momentum=0.95, nesterov=True, ns_dtype=jnp.float32)
    ref = optax_scale_by_muon(beta=0.95, eps=1e-7, nesterov=True,
                              weight_dimension_numbers=lambda u: jax.tree.map(lambda _: MuonDimensionNumbers(0, 1), u))
    params = random_grads(0)
    s_ours, s_ref = ours.init(params), ref.init(params)
    s_ref = s_ref._replace(count=jnp.asarray(10**6, jnp.int32))
    for step in range(4):
        grads = random_grads(step + 1)
        u_ours, s_ours = jax.jit(ours.update)(grads, s_ours)
        u_ref, s_ref = jax.jit(ref.update)(grads, s_ref)
        for k, g in grads.items():
            assert u_ours[k].dtype == g.dtype == jnp.float32
            err = rel_err(u_ours[k], aspect_scale(g.shape) * np.asarray(u_ref[k]))
            # same f32 ops in the same order: measured 2e-6 (f32 roundoff through 5 NS steps); left with its bias
            # correction on, optax differs by 0.13, so this tolerance tells the two Nesterov forms apart
            assert err < 1e-4, (step, k, err)


def test_golden_updates_match_pytorch_nanochat():
    """Every step's update of nanochat's PyTorch Muon (NS in bf16) to within 10%: bf16 rounding alone is ~4-6%,
    while the common bugs (no Nesterov, no aspect scale, 3 NS steps, μ=0.9) land at 13-60%."""
    if not os.path.exists(GOLDEN):
        pytest.skip(f"golden file not found: {GOLDEN}")
    data = np.load(GOLDEN)
    meta = json.loads(bytes(data["meta_json"]))
    hyper, n = meta["hyper"], len(meta["shapes"])
    tx = optax.chain(scale_by_muon(hyper["momentum"], hyper["nesterov"], hyper["ns_steps"], tuple(hyper["ns_coeffs"])),
                     optax.scale(-hyper["lr"]))
    kernel = lambda a: jnp.asarray(a.T)  # torch (out, in) -> Flax (in, out)
    params = {i: kernel(data[f"init_{i}"]) for i in range(n)}
    state = tx.init(params)
    errors = []
    for s in range(meta["steps"]):
        updates, state = jax.jit(tx.update)({i: kernel(data[f"grad_{s}_{i}"]) for i in range(n)}, state, params)
        params = optax.apply_updates(params, updates)
        for i in range(n):
            prev = data[f"init_{i}"] if s == 0 else data[f"param_{s - 1}_{i}"]
            errors.append(rel_err(np.asarray(updates[i]).T, data[f"param_{s}_{i}"] - prev))
    print("muon golden update errors (step-major):", " ".join(f"{e:.4f}" for e in errors))
    assert max(errors) <= 0.1, errors


@pytest.mark.parametrize("shape, dtype", [((64, 256), jnp.bfloat16), ((192, 128), jnp.bfloat16), ((192, 128), jnp.float32)])
@jax.default_matmul_precision("highest")
def test_newton_schulz_singular_values_land_near_one(shape, dtype):
    """NS doesn't converge to exactly orthogonal: by design singular values end up roughly in (0.5, 1.5).
    Non-square Gaussian matrices keep their smallest singular value away from 0, so all of them get there."""
    G = jnp.asarray(3.0 * np.random.default_rng(0).standard_normal(shape), jnp.float32)

    @jax.jit
    def orthogonalize(G):  # the SVD in XLA too: numpy's threaded LAPACK crawls beside JAX's threads
        O = newton_schulz(G, dtype=dtype)
        U, _, Vt = jnp.linalg.svd(G, full_matrices=False)
        return O, U.T @ O.astype(jnp.float32) @ Vt.T  # diagonal iff O = U·S'·Vᵀ keeps G's singular vectors

    O, M = orthogonalize(G)
    assert O.dtype == dtype and O.shape == shape
    sv = np.diag(M)
    # the off-diagonal part is rounding only: measured 0.025-0.03 in bf16, 2e-6 in f32
    assert rel_err(M, np.diag(sv)) < (0.05 if dtype == jnp.bfloat16 else 1e-4)
    assert 0.5 < sv.min() and sv.max() < 1.5, (sv.min(), sv.max())


@jax.default_matmul_precision("highest")
def test_a_stack_of_matrices_is_orthogonalized_one_by_one():
    """scale_by_muon runs NS on stacks of same-shaped matrices: each slice must come out as if alone,
    with its own normalisation (here the scales differ by 1000x)."""
    rng = np.random.default_rng(1)
    G = jnp.asarray(rng.standard_normal((3, 48, 80)) * np.array([1e-3, 1.0, 1e2])[:, None, None], jnp.float32)
    stacked = jax.jit(lambda G: newton_schulz(G, dtype=jnp.float32))(G)
    for i in range(3):
        assert rel_err(stacked[i], newton_schulz(G[i], dtype=jnp.float32)) < 1e-5
    tall = jnp.swapaxes(G, 1, 2)  # tall matrices go through NS on their transpose
    assert rel_err(newton_schulz(tall, dtype=jnp.float32), jnp.swapaxes(stacked, 1, 2)) < 1e-5


def test_momentum_is_a_hyperparameter_not_a_recompile():
    """A momentum schedule must not retrace: μ injected as state (inject_hyperparams) or computed from the count."""
    g = random_grads(1, [(32, 48)])["w0"]
    mus = [0.85, 0.9, 0.95]
    expected_buf = 0.0
    for mu in mus:
        expected_buf = mu * expected_buf + (1 - mu) * g

    traces = []
    injected = optax.inject_hyperparams(scale_by_muon, static_args=("ns_steps", "ns_dtype"))(momentum=0.5, ns_dtype=jnp.float32)
    scheduled = scale_by_muon(momentum=lambda count: jnp.asarray(mus)[count], ns_dtype=jnp.float32)
    for tx in [injected, scheduled]:
        def step(state, grads, tx=tx):
            traces.append(1)
            return tx.update(grads, state)
        step = jax.jit(step)
        state = tx.init({"w": g})
        for mu in mus:
            if tx is injected:
                state.hyperparams["momentum"] = jnp.asarray(mu)
            _, state = step(state, {"w": g})
        buf = state.inner_state.buf if tx is injected else state.buf
        np.testing.assert_allclose(buf["w"], expected_buf, rtol=1e-6)
    assert len(traces) == 2  # one trace per transform, none per step


def test_non_matrix_leaves_are_refused():
    tx = scale_by_muon()
    with pytest.raises(ValueError, match="2-D matrices.*'blocks/0/scale'.*\\(16,\\)"):
        tx.init({"blocks": [{"scale": jnp.ones(16), "w": jnp.ones((16, 16))}]})
    with pytest.raises(ValueError, match="2-D"):
        tx.update({"w": jnp.ones((2, 16, 16))}, tx.init({"w": jnp.ones((16, 16))}))


def test_sharded_matrices_give_the_same_update():
    """Under jit with the kernel sharded over fsdp x tensor, GSPMD gathers what NS needs: same numbers, and the
    momentum buffer keeps the param's sharding. Runs in a subprocess to get 4 fake CPU devices."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from nanochat_jax.muon import scale_by_muon
        mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        sharding = NamedSharding(mesh, P("fsdp", "tensor"))
        g = jnp.asarray(np.random.default_rng(0).standard_normal((64, 128)), jnp.float32)
        tx = scale_by_muon(ns_dtype=jnp.float32)
        u_ref, _ = jax.jit(tx.update)({"w": g}, tx.init({"w": g}))
        gs = {"w": jax.device_put(g, sharding)}
        u, state = jax.jit(tx.update)(gs, jax.jit(tx.init)(gs))
        assert len(u["w"].sharding.device_set) == 4, u["w"].sharding
        assert state.buf["w"].sharding.is_equivalent_to(sharding, 2), state.buf["w"].sharding
        np.testing.assert_allclose(u["w"], u_ref["w"], atol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_a_stack_is_split_over_the_devices_of_a_mesh():
    """Under a mesh of 8 devices (data x fsdp x tensor) the 16 same-shaped matrices are orthogonalized 2 per
    device, not all 16 on each (the compiled program's Newton-Schulz dots are on stacks of 2), with the same
    update as one device; a stack that no axis divides (3 matrices) stays whole."""
    from nanochat_jax.sharding import make_mesh
    grads = random_grads(5, [(32, 64)] * 16 + [(48, 48)] * 3)
    tx = scale_by_muon(ns_dtype=jnp.float32)
    update = jax.jit(lambda g: tx.update(g, tx.init(g))[0])
    alone = update(grads)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    on_mesh = jax.device_put(grads, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))  # replicated, as data parallelism
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        hlo = update.lower(on_mesh).compile().as_text()
        spread = update(on_mesh)
    dots = set(re.findall(r"= f32\[(\d+),(?:32|48),(?:32|48)\]\{[\d,]*\} dot\(", hlo))
    assert dots == {"2", "3"}, dots  # A = X·Xᵀ, A·A on 2 of the 16 per device; all 3 of the odd stack
    for name in grads:
        np.testing.assert_allclose(spread[name], alone[name], atol=1e-5)
