"""Where each parameter of the GPT lives on a mesh: parallel.RULES applied to the model's logical axes. The
expected PartitionSpecs are written out here, parameter by parameter, for a mesh of data 1 x fsdp 2 x tensor 2
(not computed from RULES), so a changed rule or a renamed logical axis fails by the parameter's name."""

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh, PartitionSpec as P

from gpt_jax.attention import ACTIVATION_AXES
from gpt_jax.config import load_config
from gpt_jax.model import init_params
from gpt_jax.parallel import RULES, param_shardings

# Megatron's split: the fused q/k/v outputs and the MLP's hidden units over `tensor` (column-parallel), the
# attention and MLP output projections' inputs over `tensor` (row-parallel), the vocabulary rows over `tensor`;
# the model width over `fsdp` everywhere; the stacked layer axis whole.
EXPECTED = {
    "wte.embedding": P("tensor", "fsdp"),
    "wpe.embedding": P(None, "fsdp"),
    "h.ln_1.scale": P(None, "fsdp"),
    "h.ln_1.bias": P(None, "fsdp"),
    "h.attn.c_attn.kernel": P(None, "fsdp", "tensor"),
    "h.attn.c_attn.bias": P(None, "tensor"),
    "h.attn.c_proj.kernel": P(None, "tensor", "fsdp"),
    "h.attn.c_proj.bias": P(None, "fsdp"),
    "h.ln_2.scale": P(None, "fsdp"),
    "h.ln_2.bias": P(None, "fsdp"),
    "h.mlp.c_fc.kernel": P(None, "fsdp", "tensor"),
    "h.mlp.c_fc.bias": P(None, "tensor"),
    "h.mlp.c_proj.kernel": P(None, "tensor", "fsdp"),
    "h.mlp.c_proj.bias": P(None, "fsdp"),
    "ln_f.scale": P("fsdp"),
    "ln_f.bias": P("fsdp"),
}


def test_every_parameter_s_partition_spec_on_an_fsdp_2_by_tensor_2_mesh():
    config = load_config(None, ["model.preset=gpt2-tiny"])  # every dimension splits in 2 (vocabulary padded to 512)
    abstract = jax.eval_shape(lambda: init_params(config.model, jax.random.key(0)))
    shardings = param_shardings(config, AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor")), abstract)
    got = {".".join(k.key for k in path): s.spec for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    wrong = {name: f"{got.get(name)}, expected {EXPECTED.get(name)}" for name in got.keys() | EXPECTED.keys()
             if got.get(name) != EXPECTED.get(name)}
    assert not wrong, wrong


def test_attention_activations_split_their_batch_over_data_and_fsdp_and_their_heads_over_tensor():
    """What the fused attention kernels are handed under the mesh strategy (attention.py, run per shard)."""
    with nn.logical_axis_rules(RULES):
        assert nn.logical_to_mesh_axes(ACTIVATION_AXES) == P(("data", "fsdp"), None, "tensor", None)
