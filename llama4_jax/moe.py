"""Llama 4 mixture of experts: sigmoid top-k router, routed SwiGLU experts, shared expert.

The routed computation goes through one interface, `dispatch(x_ND, weights_NK,
experts_NK, wi_gate, wi_up, wo) -> y_ND`, so that dispatch strategies (the
dense reference here; grouped/sharded ones elsewhere) are interchangeable.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax import layers, sharding


def swiglu_expert(x_ND, wi_gate_DF, wi_up_DF, wo_FD):
  return (jax.nn.silu(x_ND @ wi_gate_DF) * (x_ND @ wi_up_DF)) @ wo_FD


def dense_dispatch(x_ND, weights_NK, experts_NK, wi_gate_EDF, wi_up_EDF, wo_EFD):
  """Runs every expert on every token, as HF does: exact, but E times the cost.

  Unselected experts see a zero input and return exactly zero (no biases,
  silu(0) = 0), so the sum over experts equals the sum over the selected ones.
  """
  E = wi_gate_EDF.shape[0]
  score_NE = jnp.sum(jax.nn.one_hot(experts_NK, E, dtype=x_ND.dtype) * weights_NK[..., None], axis=1)
  x_END = x_ND[None] * score_NE.T[..., None]
  gate_ENF = jnp.einsum('END,EDF->ENF', x_END, wi_gate_EDF)
  up_ENF = jnp.einsum('END,EDF->ENF', x_END, wi_up_EDF)
  y_END = jnp.einsum('ENF,EFD->END', jax.nn.silu(gate_ENF) * up_ENF, wo_EFD)
  return jnp.sum(y_END, axis=0)


DISPATCHERS: dict[str, Callable] = {
    'dense': dense_dispatch,
}


def router_statistics(logits_NE: jax.Array, experts_NK: jax.Array) -> dict[str, jax.Array]:
  """Auxiliary losses and load statistics of one MoE layer (all float32).

  load_balance_loss = E * sum_e f_e * p_e, where f_e is the fraction of routing
  slots given to expert e and p_e the mean over tokens of the router's sigmoid
  probabilities normalised over experts (Llama 4 routes with a sigmoid, so the
  probabilities are normalised to a distribution before the Switch formula).
  It is 1 for a perfectly balanced router. router_z_loss = mean_n logsumexp(logits_n)^2.
  """
  E = logits_NE.shape[-1]
  logits32 = logits_NE.astype(jnp.float32)
  counts_E = jnp.sum(jax.nn.one_hot(experts_NK, E, dtype=jnp.float32), axis=(0, 1))
  fraction_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
  probs_NE = jax.nn.sigmoid(logits32)
  probs_NE = probs_NE / jnp.sum(probs_NE, axis=-1, keepdims=True)
  load_balance = E * jnp.sum(fraction_E * jnp.mean(probs_NE, axis=0))
  z_loss = jnp.mean(jax.nn.logsumexp(logits32, axis=-1) ** 2)
  return {'load_balance_loss': load_balance, 'router_z_loss': z_loss, 'tokens_per_expert': counts_E}


class MoE(nnx.Module):
  """The Llama 4 MoE feed-forward.

  1. Router logits = x @ W_router (model dtype, no bias).
  2. Top-k experts by raw logit; weight = sigmoid(selected logit) in float32, cast
     back (no softmax, no renormalisation).
  3. Each selected expert sees x * weight (the *input* is scaled) and runs a
     SwiGLU of width F; the routed outputs are summed.
  4. An ungated shared SwiGLU expert of width F is added.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    std, dtype, pdt = cfg.initializer_range, cfg.dtype, cfg.param_dtype
    init = nnx.initializers.normal(std)
    self.router = layers.Einsum('ND,DE->NE', (D, E), ('embed', None), rngs=rngs, std=std,
                                dtype=dtype, param_dtype=pdt)
    self.wi_gate = nnx.Param(init(rngs.params(), (E, D, F), pdt), out_sharding=('expert', 'embed', 'mlp'))
    self.wi_up = nnx.Param(init(rngs.params(), (E, D, F), pdt), out_sharding=('expert', 'embed', 'mlp'))
    self.wo = nnx.Param(init(rngs.params(), (E, F, D), pdt), out_sharding=('expert', 'mlp', 'embed'))
    self.shared_expert = layers.MLP(D, F, rngs=rngs, std=std, dtype=dtype, param_dtype=pdt)
    self.top_k = cfg.num_experts_per_tok
    self.dtype = dtype
    self.dispatch = cfg.moe_dispatch
    if cfg.moe_dispatch not in DISPATCHERS:
      raise ValueError(f'model.moe_dispatch={cfg.moe_dispatch!r}; choose one of {sorted(DISPATCHERS)}')

  def __call__(self, x_BTD: jax.Array):
    B, T, D = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D).astype(self.dtype)
    logits_NE = self.router(x_ND)
    top_logits_NK, experts_NK = jax.lax.top_k(logits_NE, self.top_k)
    weights_NK = jax.nn.sigmoid(top_logits_NK.astype(jnp.float32)).astype(self.dtype)
    routed_ND = DISPATCHERS[self.dispatch](
        x_ND, weights_NK, experts_NK, self.wi_gate[...].astype(self.dtype),
        self.wi_up[...].astype(self.dtype), self.wo[...].astype(self.dtype))
    y_BTD = self.shared_expert(x_BTD) + routed_ND.reshape(B, T, D)
    y_BTD = sharding.shard(y_BTD, 'act_batch', 'act_seq', 'act_embed')
    return y_BTD, router_statistics(logits_NE, experts_NK)
