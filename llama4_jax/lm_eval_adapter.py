"""A workdir's checkpoint as the lm-evaluation-harness model `llama4_jax`.

  python -m llama4_jax.lm_eval_adapter --model_args workdir=OUT[,step=N,max_length=S] \\
      --tasks TASKS [--include_path DIR] [--batch_size B] [other lm_eval options]

Importing this module registers the model, so that in Python
`lm_eval.simple_evaluate(model='llama4_jax', model_args='workdir=OUT', ...)`
works too. Model arguments: `workdir`, `step` (default: latest), `batch_size`,
`max_length` (tokens the model sees at once; default: the run's data.seq_len),
`max_gen_toks` (default generation length), `tokenizer` (a tokenizer.json or SentencePiece .model;
default: the run's), `seed` (sampling).

Text is tokenized with the run's tokenizer and every context starts with BOS,
as in training. Requests are sorted by length and batched; scored rows are
right-padded to [batch_size, length rounded up to a multiple of 64], so a task
compiles a handful of programs rather than one per request. The model runs on
one device.
"""

import json
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api import model as lm_model
from lm_eval.api import registry

from llama4_jax import losses, sampling
from llama4_jax import workdir as workdir_lib
from llama4_jax.data import tokenizer as tokenizer_lib

MODEL_NAME = 'llama4_jax'
DEFAULT_BATCH_SIZE = 16
LENGTH_MULTIPLE = 64  # padded lengths are multiples of this: few distinct shapes, few compiles


def _round_up(n: int, multiple: int, cap: int) -> int:
  return min(-(-n // multiple) * multiple, cap)


@registry.register_model(MODEL_NAME)
class Llama4LM(lm_model.LM):
  """loglikelihood, loglikelihood_rolling and generate_until of a llama4_jax checkpoint."""

  def __init__(
      self,
      workdir: str,
      step: int | None = None,
      batch_size: int | str = DEFAULT_BATCH_SIZE,
      max_length: int | None = None,
      max_gen_toks: int = 256,
      tokenizer: str = '',
      seed: int = 0,
      device: str | None = None,
      max_batch_size: int | None = None,
  ):
    super().__init__()
    del device, max_batch_size  # JAX places the model; the batch size is fixed
    workdir = str(workdir)
    self.model, config, self.step = workdir_lib.load_model(
        workdir, None if step in (None, '') else int(step)
    )
    self.cfg = self.model.cfg
    self.tokenizer = tokenizer_lib.run_tokenizer(workdir, config, tokenizer or '')
    # lm_eval's CLI passes '--batch_size' through as a string ('auto' included).
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
    self.max_length = int(max_length or config.data.seq_len)
    if not 1 < self.max_length <= self.cfg.max_position_embeddings:
      raise ValueError(
          f'max_length={self.max_length} must lie in [2, max_position_embeddings='
          f'{self.cfg.max_position_embeddings}]'
      )
    self.max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)
    graphdef, self._params = nnx.split(self.model)

    @jax.jit
    def target_logprobs(params, inputs_BT, targets_BT, segments_BT):
      logits_BTV, _ = nnx.merge(graphdef, params)(inputs_BT, segments_BT)
      return (
          losses.target_log_probs(logits_BTV, targets_BT),
          jnp.argmax(logits_BTV, axis=-1) == targets_BT,
      )

    self._target_logprobs = target_logprobs

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    """Model arguments win over lm_eval's (its CLI always passes batch_size)."""
    extra = {
        k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict
    }
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  # Tokens ---------------------------------------------------------------------------

  def encode_context(self, text: str) -> list[int]:
    """BOS + tokens of `text` (no second BOS if the text starts with one)."""
    ids = self.tokenizer.encode(text)
    return ids if ids[:1] == [self.tokenizer.bos_id] else [self.tokenizer.bos_id] + ids

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split as lm_eval's models split them.

    Trailing spaces of the context move to the continuation; the two are
    tokenized together and the continuation is what follows the context's own
    tokens, unless a token straddles the boundary (e.g. '(' + ')' -> '()'):
    then the continuation is tokenized alone, so that exactly its text is
    scored.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = self.encode_context(context)
    whole = self.encode_context(context + continuation)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
      return context_ids, whole[len(context_ids) :]
    return context_ids, self.tokenizer.encode(continuation)

  # Scoring --------------------------------------------------------------------------

  def score_tokens(
      self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
  ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether it is the greedy one) per pair.

    Contexts longer than max_length are cut from the left; each row of a batch
    is right-padded (segment 0) to the batch's length rounded up to 64.
    """
    rows = []
    for context, continuation in pairs:
      if not continuation:
        raise ValueError('empty continuation: nothing to score')
      if len(continuation) > self.max_length:
        raise ValueError(
            f'continuation of {len(continuation)} tokens exceeds max_length=' f'{self.max_length}'
        )
      whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
      rows.append((np.asarray(whole, np.int32), len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start : start + self.batch_size]
      T = _round_up(max(len(rows[i][0]) - 1 for i in chunk), LENGTH_MULTIPLE, self.max_length)
      inputs = np.full((self.batch_size, T), self.tokenizer.pad_id, np.int32)
      targets = np.zeros((self.batch_size, T), np.int32)
      segments = np.zeros((self.batch_size, T), np.int32)
      for r, i in enumerate(chunk):
        whole = rows[i][0]
        n = len(whole) - 1
        inputs[r, :n], targets[r, :n], segments[r, :n] = whole[:-1], whole[1:], 1
      logprobs, greedy = jax.device_get(
          self._target_logprobs(
              self._params, jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(segments)
          )
      )
      for r, i in enumerate(chunk):
        whole, n_cont = rows[i]
        span = slice(len(whole) - 1 - n_cont, len(whole) - 1)
        results[i] = (
            float(np.sum(logprobs[r, span], dtype=np.float64)),
            bool(np.all(greedy[r, span])),
        )
    return results

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    del disable_tqdm
    results = self.score_tokens([self.encode_pair(*req.args) for req in requests])
    for req, result in zip(requests, results):
      self.cache_hook.add_partial('loglikelihood', req.args, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Whole-document log-likelihood: windows of max_length, each token predicted once.

    The first window is conditioned on BOS; later ones on as much of the
    preceding text as fits (lm_eval's rolling windows).
    """
    del disable_tqdm
    pairs, owners = [], []
    for doc, req in enumerate(requests):
      ids = self.tokenizer.encode(req.args[0])
      windows = lm_utils.get_rolling_token_windows(
          token_list=ids,
          prefix_token=self.tokenizer.bos_id,
          max_seq_len=self.max_length,
          context_len=1,
      )
      for window in map(lm_utils.make_disjoint_window, windows):
        pairs.append(window)
        owners.append(doc)
    totals = [0.0] * len(requests)
    for doc, (logprob, _) in zip(owners, self.score_tokens(pairs)):
      totals[doc] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  # Generation -----------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations (greedy, or sampled with temperature/top_k/top_p) cut at `until`.

    gen_kwargs: until (str or list), max_gen_toks, do_sample, temperature,
    top_k, top_p. Sampling happens when do_sample is true, or when it is
    absent and temperature > 0.
    """
    del disable_tqdm
    groups = {}
    for i, req in enumerate(requests):
      key = json.dumps(req.args[1], sort_keys=True, default=str)
      groups.setdefault(key, []).append(i)
    results = [None] * len(requests)
    for indices in groups.values():
      texts = self._generate_group(
          [requests[i].args[0] for i in indices], dict(requests[indices[0]].args[1])
      )
      for i, text in zip(indices, texts):
        results[i] = text
        self.cache_hook.add_partial('generate_until', requests[i].args, text)
    return results

  def _generate_group(self, contexts: Sequence[str], gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.pop('until', None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(gen_kwargs.pop('max_gen_toks', self.max_gen_toks))
    temperature = float(gen_kwargs.pop('temperature', 0.0) or 0.0)
    do_sample = gen_kwargs.pop('do_sample', None)
    if do_sample is not None and not do_sample:
      temperature = 0.0
    top_k = int(gen_kwargs.pop('top_k', 0) or 0)
    top_p = float(gen_kwargs.pop('top_p', 1.0) or 1.0)
    if gen_kwargs:
      logging.warning('llama4_jax ignores gen_kwargs %s', sorted(gen_kwargs))
    max_prompt = self.max_length - max_new
    if max_prompt < 1:
      raise ValueError(
          f'max_gen_toks={max_new} leaves no room for a prompt in max_length=' f'{self.max_length}'
      )

    prompts = [self.encode_context(c)[-max_prompt:] for c in contexts]
    # Prompts are left-padded to the longest of their batch, not to a multiple of 64 as
    # in scoring: left padding moves a row's absolute positions, which Llama 4's attention
    # temperature (NoPE layers) depends on, so extra padding would change the outputs.
    # Sorting by length keeps the padding small.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [None] * len(prompts)
    for batch_index, start in enumerate(range(0, len(order), self.batch_size)):
      chunk = order[start : start + self.batch_size]
      batch = [prompts[i] for i in chunk]
      batch += [[self.tokenizer.bos_id]] * (self.batch_size - len(batch))  # fixed batch size
      outputs = sampling.generate(
          self.model,
          batch,
          max_new_tokens=max_new,
          eos_ids=self.cfg.eos_token_ids,
          pad_id=self.tokenizer.pad_id,
          temperature=temperature,
          top_k=top_k,
          top_p=top_p,
          seed=self.seed + batch_index,
      )
      for i, ids in zip(chunk, outputs):
        text = self.tokenizer.decode(ids, skip_special=True)
        cut = min((text.find(s) for s in until if s and s in text), default=len(text))
        texts[i] = text[:cut]
    return texts


def main(argv: Sequence[str] | None = None):
  """lm_eval's command line with `--model llama4_jax` registered and chosen by default."""
  args = list(sys.argv[1:] if argv is None else argv)
  if not any(a in ('--model', '-M') or a.startswith('--model=') for a in args):
    args = ['--model', MODEL_NAME] + args
  # lm_eval's CLI passes --batch_size (default 1) to the model; default to ours instead.
  if not any('batch_size' in a or a == '-b' for a in args):
    args += ['--batch_size', str(DEFAULT_BATCH_SIZE)]
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top

  sys.argv = ['lm-eval'] + args
  cli_evaluate()


if __name__ == '__main__':
  main()
