"""The nanochat v1 optimizer chain: parameter groups, schedules, AdamW lrs, and no recompiles as the step moves."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nanochat_jax.muon import scale_by_muon
from nanochat_jax.optim import build_optimizer, lr_multiplier, muon_momentum, param_labels, traced_schedule

D, V = 16, 40


def dict_params(n_layer=2, full=True):
    """A dict with the model's key paths and Flax (in, out) kernel shapes; full=False keeps one square and one
    wide (2x aspect scale) block matrix, to keep compiles short."""
    rng = np.random.default_rng(0)
    w = lambda *shape: jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)
    block = lambda: {"attn": {"c_q": {"kernel": w(D, D)}, "c_k": {"kernel": w(D, D // 2)}, "c_v": {"kernel": w(D, D // 2)},
                              "c_proj": {"kernel": w(D, D)}},
                     "mlp": {"c_fc": {"kernel": w(D, 4 * D)}, "c_proj": {"kernel": w(4 * D, D)}}}
    mini_block = lambda: {"attn": {"c_q": {"kernel": w(D, D)}}, "mlp": {"c_fc": {"kernel": w(D, 4 * D)}}}
    blocks = {i: block() if full else mini_block() for i in range(n_layer)}
    return {"wte": {"embedding": w(V, D)}, "blocks": blocks, "lm_head": {"kernel": w(D, V)}}


def test_labels_follow_key_paths():
    labels = param_labels(dict_params())
    assert labels["wte"]["embedding"] == "embedding" and labels["lm_head"]["kernel"] == "unembedding"
    assert set(jax.tree.leaves(labels["blocks"])) == {"muon"}
    with pytest.raises(ValueError, match="'blocks_norm/scale' has no optimizer group"):
        param_labels({"blocks_norm": {"scale": jnp.ones(D)}, "wte": {"embedding": jnp.ones((V, D))}})


def test_lr_multiplier_is_nanochats_formula():
    """T=1000, warmdown 0.2: flat through step 800, then linear to final_lr_frac at step 1000."""
    assert [lr_multiplier(it, 1000) for it in (0, 799, 800, 900, 999, 1000)] == [1.0, 1.0, 1.0, 0.5, 0.005, 0.0]
    assert lr_multiplier(900, 1000, final_lr_frac=0.1) == pytest.approx(0.55)
    assert [lr_multiplier(it, 1000, warmup_ratio=0.05) for it in (0, 24, 49, 50)] == [0.02, 0.5, 1.0, 1.0]
    assert [muon_momentum(it) for it in (0, 150, 300, 5000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])


@pytest.mark.parametrize("T, warmup, warmdown, final", [(1000, 0.0, 0.2, 0.0), (37, 0.1, 0.3, 0.05), (10, 0.0, 0.0, 0.0)])
def test_traced_schedules_equal_the_python_ones_at_every_step(T, warmup, warmdown, final):
    """The optimizer interpolates the Python schedules between their corners; that must be exact, step by step."""
    kw = dict(warmup_ratio=warmup, warmdown_ratio=warmdown, final_lr_frac=final)
    W, Dn = round(warmup * T), round(warmdown * T)
    lrm = traced_schedule(lambda it: lr_multiplier(it, T, **kw), [0, max(W - 1, 0), T - Dn, T])
    steps = jnp.arange(T + 1)
    np.testing.assert_allclose(jax.vmap(lrm)(steps), [lr_multiplier(it, T, **kw) for it in range(T + 1)], atol=1e-6)
    mom = traced_schedule(muon_momentum, [0, 300])
    np.testing.assert_allclose(jax.vmap(mom)(jnp.arange(400)), [muon_momentum(it) for it in range(400)], atol=1e-6)


def test_first_step_sizes_of_each_group():
    """Adam's first step is lr·sign(g), so the AdamW lrs can be read off the update: base·(D/768)^-0.5.
    Muon's step is matrix_lr times our Muon direction (no D scaling). Warmup 0.5 of T=10: multiplier 0.2 on all."""
    params = dict_params(n_layer=1, full=False)
    grads = jax.tree.map(lambda p: jnp.asarray(np.sin(1000.0 * np.asarray(p))), params)  # any gradient without zeros
    d_model = 192  # sets only the lr scale, 2x here; the params stay tiny
    tx = build_optimizer(d_model, 10, warmup_ratio=0.5)
    muon = scale_by_muon(momentum=0.85)  # the schedule's μ at step 0
    both = jax.jit(lambda: (tx.update(grads, tx.init(params), params)[0], muon.update(grads["blocks"], muon.init(grads["blocks"]))[0]))
    updates, direction = both()  # one compile for both
    scale = (d_model / 768) ** -0.5
    np.testing.assert_allclose(jnp.abs(updates["wte"]["embedding"]), 0.2 * 0.2 * scale, rtol=1e-5)
    np.testing.assert_allclose(jnp.abs(updates["lm_head"]["kernel"]), 0.2 * 0.004 * scale, rtol=1e-5)
    for u, o in zip(jax.tree.leaves(updates["blocks"]), jax.tree.leaves(direction)):
        # equal up to bf16 NS rounding (0 on CPU, 4-5% on an H200); a wrong lr scale would be off by 2x or 5x
        assert np.linalg.norm(u + 0.2 * 0.02 * o) / np.linalg.norm(u) < 0.1


def test_jitted_steps_follow_the_schedule_without_recompiling():
    """With a constant gradient Adam's step stays lr·sign(g), so |Δwte| traces the LR multiplier step by step."""
    T = 6
    params = dict_params(n_layer=1, full=False)
    grads = jax.tree.map(jnp.ones_like, params)
    tx = build_optimizer(D, T, warmdown_ratio=0.5, final_lr_frac=0.1)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    state = jax.jit(tx.init)(params)
    base_lr = 0.2 * (D / 768) ** -0.5
    for it in range(T):
        params, state, updates = step(params, state)
        np.testing.assert_allclose(-updates["wte"]["embedding"], base_lr * lr_multiplier(it, T, warmdown_ratio=0.5, final_lr_frac=0.1), rtol=1e-5)
    assert len(traces) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_weight_decay_is_decoupled_and_adamw_only():
    """torch AdamW: a zero gradient still shrinks p by lr·wd·p; v1's Muon has no weight decay."""
    params = dict_params(n_layer=1, full=False)
    tx = build_optimizer(D, weight_decay=0.1)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(lambda: tx.update(zeros, tx.init(params), params))()
    lr = 0.004 * (D / 768) ** -0.5
    np.testing.assert_allclose(updates["lm_head"]["kernel"], -lr * 0.1 * params["lm_head"]["kernel"], rtol=1e-5)
    assert all((u == 0).all() for u in jax.tree.leaves(updates["blocks"]))


class TinyGPT(nnx.Module):
    """Just the parameter names and layout of our GPT (wte, blocks[i].attn/mlp, lm_head)."""

    def __init__(self, rngs):
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
        self.wte = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([nnx.Dict(attn=nnx.Dict(c_q=linear(D, D)), mlp=nnx.Dict(c_fc=linear(D, 4 * D), c_proj=linear(4 * D, D)))
                                for _ in range(1)])
        self.lm_head = linear(D, V)

    def __call__(self, idx):
        x = self.wte(idx)
        for block in self.blocks:
            x = x + block.attn.c_q(x) + block.mlp.c_proj(jax.nn.relu(block.mlp.c_fc(x)) ** 2)
        return self.lm_head(x)


def test_nnx_optimizer_steps_a_model():
    @nnx.jit  # one compile instead of one per eager init op
    def init():
        model = TinyGPT(nnx.Rngs(0))
        return model, nnx.Optimizer(model, build_optimizer(768, 100), wrt=nnx.Param)  # D=768: AdamW lrs unscaled

    model, optimizer = init()
    idx = jnp.asarray(np.arange(12).reshape(2, 6) % V)

    @nnx.jit
    def train_step(model, optimizer):
        loss_fn = lambda model: optax.softmax_cross_entropy_with_integer_labels(model(idx[:, :-1]), idx[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    before = np.asarray(model.blocks[0].mlp.c_fc.kernel[...])
    losses = [float(train_step(model, optimizer)) for _ in range(2)]  # float() syncs
    assert losses[-1] < losses[0]
    assert not np.allclose(before, model.blocks[0].mlp.c_fc.kernel[...])
