"""Meshes on 8 simulated CPU devices (set in conftest): sharded training must equal one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax.model import GPT, GPTConfig
from nanochat_jax.optim import build_optimizer
from nanochat_jax.sharding import global_batch, make_mesh, parse_mesh, state_shardings
from nanochat_jax.train import init_train_state, make_eval_step, make_train_step

# D, heads, kv heads, MLP and vocab all divide by the fsdp and tensor sizes used below
CONFIG = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def test_parse_mesh_sizes_and_errors():
    assert parse_mesh("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}  # default: pure data parallel
    assert parse_mesh("fsdp=-1,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="does not multiply out to the 8 devices"):
        parse_mesh("data=3", 8)
    with pytest.raises(ValueError, match="bad --mesh entry 'model=2'"):
        parse_mesh("model=2", 8)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        parse_mesh("data=-1,fsdp=-1", 8)


def train_three_steps(mesh_spec, devices):
    """Losses and final params of 3 full optimizer steps (Muon + AdamW) on the given mesh."""
    mesh = make_mesh(mesh_spec, devices=devices)
    tx = build_optimizer(CONFIG.n_embd, num_iterations=10, warmdown_ratio=0.5, ns_dtype=jnp.float32)
    graphdef, state = init_train_state(CONFIG, tx, mesh, seed=0)
    step = make_train_step(graphdef, state)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(3):
        batch = rng.integers(0, CONFIG.vocab_size, (2, 8, CONFIG.sequence_len + 1), dtype=np.int32)  # 2 micro-steps
        x, y = (global_batch(a, mesh, batch_axis=1) for a in (batch[..., :-1], batch[..., 1:]))
        state, metrics = step(state, x, y)
        losses.append(float(metrics["loss"]))
    model, _ = nnx.merge(graphdef, state)
    return np.array(losses), {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def single_device():
    return train_three_steps("data=1", jax.devices()[:1])


@pytest.mark.parametrize("mesh_spec", ["data=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2"])
def test_sharded_training_matches_one_device(single_device, mesh_spec):
    """Same losses and parameters, whatever the mesh: only the reduction order of fp32 sums may differ.
    (Newton-Schulz runs in fp32 here: in bf16 it rounds those tiny differences up to ~1e-3.)"""
    losses, params = train_three_steps(mesh_spec, jax.devices())
    ref_losses, ref_params = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    for name, ref in ref_params.items():
        rel = np.linalg.norm(params[name] - ref) / np.linalg.norm(ref)
        assert rel < 1e-5, f"{name}: relative difference {rel:.2e} on mesh {mesh_spec}"


def test_weighted_step_on_a_mesh_matches_one_device():
    """RL's update (per-token weights, each device summing its own rows' chunks under shard_map) gives one
    device's loss and parameters on data x fsdp."""
    rng = np.random.default_rng(1)
    batch = rng.integers(0, CONFIG.vocab_size, (2, 8, CONFIG.sequence_len + 1), dtype=np.int32)
    weights = rng.normal(size=(2, 8, CONFIG.sequence_len)).astype(np.float32) / 100
    out = []
    for spec, devices in (("data=1", jax.devices()[:1]), ("data=4,fsdp=2", jax.devices())):
        mesh = make_mesh(spec, devices=devices)
        tx = build_optimizer(CONFIG.n_embd, num_iterations=10, ns_dtype=jnp.float32)
        graphdef, state = init_train_state(CONFIG, tx, mesh, seed=0)
        step = make_train_step(graphdef, state, weighted=True)
        state, metrics = step(state, *(global_batch(a, mesh, batch_axis=1) for a in (batch[..., :-1], batch[..., 1:], weights)))
        out.append((float(metrics["loss"]), np.asarray(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)["lm_head"]["kernel"][...])))
    (loss_1, head_1), (loss_8, head_8) = out
    assert loss_8 == pytest.approx(loss_1, rel=1e-5)
    assert np.linalg.norm(head_8 - head_1) / np.linalg.norm(head_1) < 1e-5


def test_eval_loss_on_a_mesh_matches_one_device():
    """The per-token eval loss (bpb's) on data x fsdp and on data=8 equals one device's; ignored targets give 0."""
    rng = np.random.default_rng(2)
    batch = rng.integers(0, CONFIG.vocab_size, (8, CONFIG.sequence_len + 1), dtype=np.int32)
    batch[:, -5:] = -1
    out = []
    for spec, devices in (("data=1", jax.devices()[:1]), ("data=4,fsdp=2", jax.devices()), ("data=8", jax.devices())):
        mesh = make_mesh(spec, devices=devices)
        graphdef, state = init_train_state(CONFIG, build_optimizer(CONFIG.n_embd, num_iterations=10), mesh, seed=0)
        x, y = (global_batch(a, mesh) for a in (np.maximum(batch[:, :-1], 0), batch[:, 1:]))
        out.append(np.asarray(make_eval_step(graphdef, mesh)(state, x, y)))
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[2], out[0], rtol=1e-5, atol=1e-6)
    assert (out[0][:, -4:] == 0).all()


def test_eval_loss_chunks_are_each_devices_own_rows():
    """Left to GSPMD, the chunk loop over rows split across devices gathers every row onto every device (each
    computes every chunk); under shard_map each device loops over its own rows and nothing is gathered."""
    mesh = make_mesh("data=8")
    split = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    h = jax.device_put(np.random.default_rng(3).normal(size=(256, 64)).astype(np.float32), split("data", None))
    t = jax.device_put(np.arange(256, dtype=np.int32) % 100, split("data"))
    w = jnp.asarray(np.random.default_rng(4).normal(size=(64, 100)).astype(np.float32))

    from nanochat_jax.model import cross_entropy, sharded_cross_entropy
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        plain = jax.jit(lambda h, w, t: cross_entropy(h, w, t, 16))
        local = jax.jit(lambda h, w, t: sharded_cross_entropy(h, w, t, 16))
        assert "all-gather" in plain.lower(h, w, t).compile().as_text()
        assert "all-gather" not in local.lower(h, w, t).compile().as_text()
        np.testing.assert_allclose(np.asarray(local(h, w, t)), np.asarray(plain(h, w, t)), rtol=1e-6)


def test_params_and_optimizer_state_are_sharded_by_the_rules():
    """FSDP shards D over fsdp; tensor parallelism shards the MLP hidden; the Muon momentum follows its param."""
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    graphdef, state = init_train_state(CONFIG, build_optimizer(CONFIG.n_embd, num_iterations=10), mesh)
    model, optimizer = nnx.merge(graphdef, state)
    c_fc = model.blocks[0].mlp.c_fc.kernel[...]  # (D, 4D) = (64, 256)
    assert c_fc.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert c_fc.addressable_shards[0].data.shape == (32, 128)
    opt_leaves = [x for x in jax.tree.leaves(nnx.state(optimizer)) if getattr(x, "shape", None) == c_fc.shape]
    assert opt_leaves and all(x.sharding.spec == c_fc.sharding.spec for x in opt_leaves)


def test_unshardable_parameter_is_named():
    mesh = make_mesh("fsdp=8")
    bad = GPTConfig(sequence_len=32, vocab_size=256, n_layer=1, n_head=2, n_kv_head=2, n_embd=36)
    model = nnx.eval_shape(lambda: GPT(bad, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\['blocks'\]\[0\]\['attn'\]\['c_k'\]\['kernel'\] of shape \(36, 36\) cannot be sharded"):
        state_shardings(nnx.state(model), mesh)
