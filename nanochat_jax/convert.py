"""
Move weights between nanochat's PyTorch layout and our model. nanochat names its tensors
`transformer.wte.weight` (V, D), `lm_head.weight` (V, D) and `transformer.h.{i}.attn.c_q.weight`
etc., each nn.Linear weight stored (out, in); our kernels are (in, out), the transpose.
This is how a nanochat checkpoint's tensors (e.g. saved to .npz from a model_*.pt) are imported.
"""
import numpy as np

LINEARS = ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def _our_params(model):
    """nanochat name -> (our nnx.Param, whether the value is stored transposed)."""
    params = {"transformer.wte.weight": (model.wte.embedding, False), "lm_head.weight": (model.lm_head.kernel, True)}
    for i, block in enumerate(model.blocks):
        for name in LINEARS:
            module, linear = name.split(".")
            params[f"transformer.h.{i}.{name}.weight"] = (getattr(getattr(block, module), linear).kernel, True)
    return params


def load_nanochat_weights(model, tensors):
    """Copy nanochat-layout tensors (name -> array) into model, checking names and shapes."""
    params = _our_params(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"nanochat weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, (param, transposed) in params.items():
        value = np.asarray(tensors[name], dtype=np.float32)
        value = value.T if transposed else value
        if value.shape != param.shape:
            raise ValueError(f"{name}: shape {tuple(np.shape(tensors[name]))} does not fit the model's {param.shape} (transposed: {transposed})")
        param[...] = value


def export_nanochat_weights(model):
    """Our model's weights as nanochat-layout numpy arrays."""
    return {name: np.asarray(param[...]).T if transposed else np.asarray(param[...])
            for name, (param, transposed) in _our_params(model).items()}

