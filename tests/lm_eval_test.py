"""The lm-evaluation-harness adapter against direct computations with the model (offline)."""

import json
import os
import subprocess
import sys

import small_run

# Before lm_eval imports `datasets`: no network, and its cache under the test cache.
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ.setdefault('HF_DATASETS_CACHE', os.path.join(small_run.REPO, '.pytest_cache', 'hf'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llama4_jax import checkpoint, config_lib, lm_eval_adapter, sampling  # noqa: E402
from llama4_jax import model as model_lib  # noqa: E402
from llama4_jax.data import text as text_data
from llama4_jax.data import tokenizer as tokenizer_lib  # noqa: E402

# Its module fixtures are expensive: one test worker runs the whole file (pyproject.toml).
pytestmark = pytest.mark.xdist_group(__name__)

MAX_LENGTH = 128

QUESTIONS = [
    {'question': 'def main(', 'choices': [')', 'self', 'import'], 'answer': 0},
    {'question': 'import ', 'choices': ['os', 'sys', '1234'], 'answer': 1},
    {'question': 'for i in ', 'choices': ['range(10):', 'x', 'yield'], 'answer': 0},
    {'question': 'return ', 'choices': ['None', 'def', ' '], 'answer': 2},
    {'question': '', 'choices': ['class', 'pass'], 'answer': 0},  # empty context: BOS only
]

TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A randomly initialised small model (peaked logits) with its own tokenizer."""
  path = tmp_path_factory.mktemp('run')
  tokenizer_lib.train_tokenizer(text_data.read_texts('', 200_000), 512, str(path / 'tok.model'))
  config = small_run.config(data__tokenizer=str(path / 'tok.model'), model__initializer_range=0.2)
  config_lib.save(config, str(path))
  model = model_lib.Llama4(config_lib.model_config(config), rngs=nnx.Rngs(0))
  params = checkpoint.flatten_tree(nnx.state(model))
  checkpoint.write_params_streaming(
      checkpoint.step_path(str(path), 3), ((k, np.asarray(v)) for k, v in params.items())
  )
  return path


@pytest.fixture(scope='module')
def lm(workdir):
  return lm_eval_adapter.Llama4LM(
      workdir=str(workdir), batch_size=4, max_length=MAX_LENGTH, max_gen_toks=24
  )


@pytest.fixture(scope='module')
def logits_of(lm):
  """Logits of one unpadded row (right-filled to MAX_LENGTH: causal, so nothing leaks back)."""
  graphdef, params = nnx.split(lm.model)
  forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0][0])

  def logits(ids):
    tokens = np.zeros((1, MAX_LENGTH), np.int32)
    tokens[0, : len(ids)] = ids
    return np.asarray(forward(params, jnp.asarray(tokens)))[: len(ids)]

  return logits


def direct_logprob(logits_of, ids, n_score):
  """Sum of log p of the last n_score tokens of ids."""
  logprobs = np.asarray(jax.nn.log_softmax(logits_of(ids[:-1]), axis=-1))
  targets = np.asarray(ids[1:])
  rows = np.arange(len(targets))[-n_score:]
  return float(logprobs[rows, targets[rows]].sum())


@pytest.mark.slow
def test_loglikelihood_equals_the_model_and_is_greedy_is_right(lm, logits_of):
  pairs = [(q['question'], c) for q in QUESTIONS for c in q['choices']]
  pairs.append(('x' * 400, ' = 1'))  # context longer than max_length: cut from the left
  requests = [Instance('loglikelihood', {}, pair, i) for i, pair in enumerate(pairs)]
  results = lm.loglikelihood(requests)
  assert len(results) == len(pairs)
  for (context, continuation), (logprob, is_greedy) in zip(pairs, results):
    context_ids, continuation_ids = lm.encode_pair(context, continuation)
    assert context_ids[0] == lm.tokenizer.bos_id
    ids = (context_ids + continuation_ids)[-(MAX_LENGTH + 1) :]
    np.testing.assert_allclose(
        logprob, direct_logprob(logits_of, ids, len(continuation_ids)), rtol=1e-5, atol=1e-4
    )
    assert logprob < 0
    greedy = np.argmax(logits_of(ids[:-1]), axis=-1)[-len(continuation_ids) :]
    assert is_greedy == bool(np.all(greedy == ids[-len(continuation_ids) :]))


@pytest.mark.slow
def test_loglikelihood_rolling_scores_every_token_once(lm, logits_of):
  text = open(os.path.join(small_run.REPO, 'llama4_jax', 'losses.py')).read()
  short = 'import os\n'
  ids = lm.tokenizer.encode(text)
  assert len(ids) > 2 * MAX_LENGTH
  results = lm.loglikelihood_rolling(
      [Instance('loglikelihood_rolling', {}, (t,), i) for i, t in enumerate([text, short])]
  )

  short_ids = [lm.tokenizer.bos_id] + lm.tokenizer.encode(short)
  np.testing.assert_allclose(
      results[1], direct_logprob(logits_of, short_ids, len(short_ids) - 1), rtol=1e-5
  )
  # The first window sees BOS + the first tokens; each later token sees MAX_LENGTH before it
  # within windows that end at multiples of MAX_LENGTH, or at the end of the text.
  expected = direct_logprob(logits_of, [lm.tokenizer.bos_id] + ids[:MAX_LENGTH], MAX_LENGTH)
  done = MAX_LENGTH
  while done < len(ids):
    end = min(done + MAX_LENGTH, len(ids))
    expected += direct_logprob(logits_of, ids[end - MAX_LENGTH - 1 : end], end - done)
    done = end
  np.testing.assert_allclose(results[0], expected, rtol=1e-5)


@pytest.mark.slow
def test_generate_until_is_greedy_generation_cut_at_until(lm):
  """Batched (sorted, left-padded, filled with dummy rows) = each prompt alone."""
  contexts = ['def main(', 'class A:\n  def f(self):\n    return ']
  expected = []
  for context in contexts:
    ids = sampling.generate(
        lm.model,
        [lm.encode_context(context)],
        max_new_tokens=24,
        eos_ids=lm.cfg.eos_token_ids,
        pad_id=lm.tokenizer.pad_id,
    )[0]
    expected.append(lm.tokenizer.decode(ids, skip_special=True))
  assert all(expected)

  def generate(**gen_kwargs):
    return lm.generate_until(
        [Instance('generate_until', {}, (c, gen_kwargs), i) for i, c in enumerate(contexts)]
    )

  assert generate(until=[], do_sample=False) == expected
  until = expected[0][len(expected[0]) // 2 :][:2]  # a string in the middle of the first
  assert generate(until=[until])[0] == expected[0][: expected[0].find(until)]
  sampled = generate(until=[], temperature=1.0)  # sampling: same shapes, no new compile
  assert all(isinstance(text, str) for text in sampled) and sampled != expected


def write_task(directory):
  (directory / 'data.jsonl').write_text(''.join(json.dumps(q) + '\n' for q in QUESTIONS))
  (directory / 'tiny_mc.yaml').write_text(TASK_YAML.format(data=directory / 'data.jsonl'))


@pytest.mark.slow
def test_simple_evaluate_on_a_local_multiple_choice_task(lm, logits_of, tmp_path):
  write_task(tmp_path)
  task_manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
  out = lm_eval.simple_evaluate(
      model=lm, tasks=['tiny_mc'], task_manager=task_manager, log_samples=True
  )
  correct = []
  for q in QUESTIONS:
    scores = []
    for choice in q['choices']:
      context_ids, continuation_ids = lm.encode_pair(q['question'], choice)
      scores.append(
          direct_logprob(logits_of, context_ids + continuation_ids, len(continuation_ids))
      )
    correct.append(float(np.argmax(scores) == q['answer']))
  assert out['results']['tiny_mc']['acc,none'] == pytest.approx(np.mean(correct))
  samples = sorted(out['samples']['tiny_mc'], key=lambda s: s['doc_id'])
  for q, sample in zip(QUESTIONS, samples):
    for choice, response in zip(q['choices'], sample['filtered_resps']):
      context_ids, continuation_ids = lm.encode_pair(q['question'], choice)
      expected = direct_logprob(logits_of, context_ids + continuation_ids, len(continuation_ids))
      np.testing.assert_allclose(response[0], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_command_line_entry_point(workdir, tmp_path):
  write_task(tmp_path)
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'llama4_jax.lm_eval_adapter',
          '--model_args',
          f'workdir={workdir},step=3,max_length={MAX_LENGTH},batch_size=4',
          '--tasks',
          'tiny_mc',
          '--include_path',
          str(tmp_path),
          '--output_path',
          str(tmp_path / 'out'),
      ],
      cwd=small_run.REPO,
      capture_output=True,
      text=True,
      env=small_run.script_env(),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tiny_mc' in result.stdout and 'acc' in result.stdout
