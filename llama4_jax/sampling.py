"""Generation with a KV cache: one prefill, then one jitted decode step per token.

The whole loop (prefill + `lax.while_loop` over decode steps) is one jitted
function, compiled once per (batch, prompt length, max_new_tokens, top_k):
nothing recompiles per step. Prompts of different lengths are left-padded;
padding is segment 0, so it is never attended to and positions start at each
row's first real token. A row stops at its first EOS; the loop stops when
every row has.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax import model as model_lib


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_BP, segment_ids_BP): prompts right-aligned, segment 1 = real, 0 = padding."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token')
  P = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  segments = np.zeros((len(prompts), P), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, P - len(prompt) :] = prompt
    segments[row, P - len(prompt) :] = 1
  return tokens, segments


def _nucleus(scaled_BV: jax.Array, top_p: jax.Array) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability mass reaches top_p."""
  sorted_BV = jnp.sort(scaled_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  kept_B = jnp.sum(jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p, axis=-1)
  # The most likely token always stays (HF's min_tokens_to_keep=1): with top_p <= 0 nothing
  # would, and index -1 would wrap round to the least likely token, filtering nothing.
  cutoff_index_B = jnp.maximum(kept_B - 1, 0)
  cutoff_B = jnp.take_along_axis(sorted_BV, cutoff_index_B[:, None], axis=-1)
  return jnp.where(scaled_BV < cutoff_B, -jnp.inf, scaled_BV)


def sample_logits(
    logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array
) -> jax.Array:
  """Greedy when temperature == 0, else top-k / nucleus (top-p) sampling.

  The branches are `lax.cond`s so that greedy decoding never sorts the vocabulary.
  """
  logits_BV = logits_BV.astype(jnp.float32)

  def sample(_):
    scaled_BV = logits_BV / temperature
    if top_k:
      kth_B = jax.lax.top_k(scaled_BV, top_k)[0][:, -1:]
      scaled_BV = jnp.where(scaled_BV < kth_B, -jnp.inf, scaled_BV)
    scaled_BV = jax.lax.cond(top_p < 1.0, _nucleus, lambda x, _: x, scaled_BV, top_p)
    return jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)

  greedy = lambda _: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, sample, greedy, None)


def check_image_placeholders(prompts: Sequence[Sequence[int]], pixels_BMCHW, vision_cfg) -> None:
  """Raises ValueError unless each prompt has one `<|patch|>` placeholder per image token.

  The model gives a row's k-th placeholder its k-th image token, and cannot count them
  under jit (model.merge_image_features): a surplus placeholder would silently repeat the
  last image token, a tile without placeholders would be dropped. A row's tiles are those
  up to its last one that is not all zeros: place_images pads with zero tiles, and a real
  tile never is one (8-bit pixels normalised with Llama 4's mean and std of 0.5 are never
  exactly 0: image_processing._normalise).
  """
  if pixels_BMCHW is None:  # no image: no placeholder either
    pixels_BMCHW = np.zeros((len(prompts), 0, 1, 1, 1), np.float32)
  pixels_BMCHW = np.asarray(pixels_BMCHW)
  if pixels_BMCHW.ndim != 5 or pixels_BMCHW.shape[0] != len(prompts):
    raise ValueError(
        f'pixels_BMCHW must be [prompts, tiles, C, H, W] with {len(prompts)} prompts, '
        f'got shape {pixels_BMCHW.shape}'
    )
  per_tile = vision_cfg.tokens_per_tile
  B, M = pixels_BMCHW.shape[:2]
  is_image_BM = pixels_BMCHW.reshape(B, M, -1).any(axis=-1) if M else np.zeros((B, 0), bool)
  for row, (prompt, is_image_M) in enumerate(zip(prompts, is_image_BM)):
    tiles = int(np.flatnonzero(is_image_M)[-1]) + 1 if is_image_M.any() else 0
    placeholders = sum(1 for t in prompt if t == vision_cfg.image_token_id)
    if placeholders != tiles * per_tile:
      raise ValueError(
          f'prompt {row} has {placeholders} <|patch|> placeholders (id '
          f'{vision_cfg.image_token_id}), but its {tiles} image tiles need {tiles * per_tile} '
          f"({per_tile} per tile; padding tiles after a row's images must be all zeros)"
      )


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'top_k', 'cache_dtype'))
def _generate(
    graphdef,
    state,
    tokens_BP,
    segments_BP,
    pixels_BMCHW,
    key,
    eos_ids,
    temperature,
    top_p,
    pad_id,
    *,
    max_new_tokens: int,
    top_k: int,
    cache_dtype,
):
  # Weights sliced per layer and per expert once, before the loop.
  model = model_lib.decode_layout(nnx.merge(graphdef, state))
  B, P = tokens_BP.shape
  cache = model.init_cache(B, P + max_new_tokens, cache_dtype)
  # The images are encoded once, in the prefill; decode steps see only tokens.
  logits_B1V, cache = model.decode(
      tokens_BP, cache, segments_BP, pixels_BMCHW, last_logits_only=True
  )
  key, first_key = jax.random.split(key)
  token_B = sample_logits(logits_B1V[:, 0], first_key, temperature, top_k, top_p)
  out_BN = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)
  done_B = jnp.isin(token_B, eos_ids)

  def cond(carry):
    step, _, _, done_B, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):  # produces token number `step`, from the previous one
    step, cache, token_B, done_B, out_BN, key = carry
    logits_B1V, cache = model.decode(token_B[:, None], cache, jnp.ones((B, 1), jnp.int32))
    key, step_key = jax.random.split(key)
    token_B = sample_logits(logits_B1V[:, 0], step_key, temperature, top_k, top_p)
    out_BN = out_BN.at[:, step].set(jnp.where(done_B, pad_id, token_B))
    done_B = done_B | jnp.isin(token_B, eos_ids)
    return step + 1, cache, token_B, done_B, out_BN, key

  carry = (jnp.ones((), jnp.int32), cache, token_B, done_B, out_BN, key)
  return jax.lax.while_loop(cond, body, carry)[4]


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    pixels_BMCHW=None,
) -> list[list[int]]:
  """Generated ids per prompt (without the prompt), each cut after its first EOS.

  pixels_BMCHW: with a multimodal model, each prompt's image tiles in the order
  of its `<|patch|>` runs, then all-zero padding tiles (image_text.place_images
  builds both); see check_image_placeholders.
  """
  cfg = model.cfg
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be at least 1, got {max_new_tokens}')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  tokens, segments = left_pad(prompts, pad_id)
  if cfg.vision is not None:
    check_image_placeholders(prompts, pixels_BMCHW, cfg.vision)
  if tokens.shape[1] + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(
        f'prompt of {tokens.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds '
        f"the model's max_position_embeddings={cfg.max_position_embeddings}"
    )
  graphdef, state = nnx.split(model)
  out = _generate(
      graphdef,
      state,
      tokens,
      segments,
      pixels_BMCHW,
      jax.random.key(seed),
      jnp.asarray(list(eos_ids), jnp.int32),
      jnp.float32(temperature),
      jnp.float32(top_p),
      jnp.int32(pad_id),
      max_new_tokens=max_new_tokens,
      top_k=int(top_k),
      cache_dtype=cfg.dtype,
  )
  results = []
  eos = set(int(e) for e in eos_ids)
  for row in np.asarray(out).tolist():
    cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    results.append(row[:cut])
  return results
