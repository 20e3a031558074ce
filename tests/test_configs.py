"""The tiers in configs/: nanochat's shapes, batch geometry and horizons."""
import importlib

import pytest
from flax import nnx

from nanochat_jax.model import GPT, config_for_depth


@pytest.mark.parametrize("tier", ["tiny", "d20", "d26", "d32"])
def test_batch_geometry_divides(tier):
    """total batch = device batch x seq len x devices x grad_accum must hold with an integer grad_accum on 1 and 8 devices."""
    bt = importlib.import_module(f"configs.{tier}").base_train
    for devices in (1, 8) if tier != "tiny" else (1,):
        assert bt["total_batch_size"] % (bt["device_batch_size"] * bt["max_seq_len"] * devices) == 0


@pytest.mark.parametrize("tier, steps", [("d20", 21_400), ("d26", 41_275), ("d32", 71_680)])
def test_horizon_is_nanochats(tier, steps):
    """20 tokens per parameter (all params, v1) over 524,288-token steps gives nanochat's step counts."""
    bt = importlib.import_module(f"configs.{tier}").base_train
    params = nnx.eval_shape(lambda: GPT(config_for_depth(bt["depth"]), rngs=nnx.Rngs(0))).num_params()
    assert bt["target_param_data_ratio"] * params // bt["total_batch_size"] == steps
