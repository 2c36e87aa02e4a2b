"""What a small run shows at its end: a greedy sample and the unigram baseline; for the
built-in shapes questions, the held-out answer accuracy next to the best text-only answer;
for chat data, the held-out exact-match accuracy of the answers, before and after.

These need the whole model on one host and a pass over the data, so they are for small
single-process runs (the README's CPU jobs), not for Scout or Maverick.
"""

import ml_collections as mlc
from flax import nnx

from llama4_jax import evaluation, sampling
from llama4_jax import model as model_lib
from llama4_jax import workdir as workdir_lib
from llama4_jax.data import chat, image_text, shapes_data
from llama4_jax.data import text as text_data

SAMPLE_PROMPT = 'def main('  # the built-in corpus is Python source
MAX_PARAMS = 2_000_000_000  # above this a run is not "small"
EXACT_MATCH_CONVERSATIONS = 200  # held-out chats whose answers are generated and compared


def wanted(config: mlc.ConfigDict, num_params: int, first_step: int, process_count: int) -> bool:
  """Whether the run should report them: a small one-process run that trained this time."""
  return (
      config.train.sample_tokens > 0
      and first_step < config.train.steps
      and process_count == 1
      and num_params <= MAX_PARAMS
  )


def report(config: mlc.ConfigDict, cfg, graphdef, params, tokenizer, workdir: str) -> dict:
  """{'sample', 'unigram_loss'} for text runs; the shapes accuracies for image-text runs;
  `chat_report`'s for chat runs."""
  if image_text.is_image_text(config):
    return shapes_accuracy(config, cfg, graphdef, params, tokenizer, workdir)
  model = nnx.merge(graphdef, params)
  if config.data.modality == 'chat':
    return chat_report(config, model, tokenizer, workdir)
  return {
      'sample': greedy_sample(
          model, tokenizer, config.train.sample_tokens, sample_prompt(config, tokenizer)
      ),
      'unigram_loss': text_data.unigram_loss(config.data, tokenizer, seq_len=config.data.seq_len),
  }


def sample_prompt(config: mlc.ConfigDict, tokenizer, max_chars: int = 40) -> str:
  """The start of the run's first validation document (its own text, whatever it is; of token
  arrays, their first tokens decoded), or SAMPLE_PROMPT for the built-in corpus."""
  data = config.data
  files = data.eval_files or data.train_files
  if not files:
    return SAMPLE_PROMPT
  first = text_data.expand_globs(files)[0]
  if first.endswith('.npy'):
    tokens = text_data.read_token_file(first, tokenizer.vocab_size)[:max_chars]
    text = tokenizer.decode([int(t) for t in tokens], skip_special=True)
  else:
    text = next((t for t in text_data.read_texts(first, 1) if t.strip()), '')
  return text.lstrip().split('\n', 1)[0][:max_chars] or SAMPLE_PROMPT


def greedy_sample(model, tokenizer, num_tokens: int, prompt: str = SAMPLE_PROMPT) -> str:
  """The prompt and its greedy continuation of at most `num_tokens` tokens (KV-cache decoding)."""
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  num_tokens = min(num_tokens, model.cfg.max_position_embeddings - len(ids))
  [new] = sampling.generate(
      model,
      [ids],
      max_new_tokens=num_tokens,
      eos_ids=model.cfg.eos_token_ids,
      pad_id=tokenizer.pad_id,
  )
  return prompt + tokenizer.decode(new, skip_special=True)


def shapes_accuracy(config: mlc.ConfigDict, cfg, graphdef, params, tokenizer, workdir: str):
  """Held-out question accuracy and the text-only best, when the data are the built-in shapes
  questions (`shapes_data.QUESTIONS`: their answer choices are known)."""
  held_out = image_text.split_records(config, 'validation', workdir)
  questions = set(shapes_data.QUESTIONS.values())
  if not all(r.question in questions and r.answer for r in held_out):
    return {}
  train = image_text.split_records(config, 'train', workdir)
  maker = image_text.row_maker(config, cfg, tokenizer)
  score_fn = evaluation.make_row_score_fn(graphdef, params)
  return image_text.shapes_accuracy(score_fn, maker, train, held_out)


def chat_report(config: mlc.ConfigDict, model, tokenizer, workdir: str) -> dict:
  """Held-out answers of a chat run: the first one, and the exact-match accuracy of the
  final assistant turns (of the model it started from too, with train.init_from)."""
  held_out = chat.split_conversations(config, 'validation', workdir)[:EXACT_MATCH_CONVERSATIONS]
  held_out = [c for c in held_out if not c.images and c.messages[-1]['role'] == 'assistant']
  if not held_out:
    return {}
  answers = chat_answers(model, tokenizer, held_out, config.train.sample_tokens)
  result = {
      'sample': {'prompt': held_out[0].messages[-2]['content'], 'answer': answers[0]},
      'exact_match': exact_match(answers, held_out),
      'exact_match_conversations': len(held_out),
  }
  if config.train.init_from:
    try:
      before, _ = workdir_lib.load_checkpoint(
          config.train.init_from, model_lib.abstract_model(model.cfg)
      )
    except FileNotFoundError as e:  # gone since the fine-tune began; a resume needs it not
      print(f'no exact match before fine-tuning: {e}', flush=True)
      return result
    answers = chat_answers(before, tokenizer, held_out, config.train.sample_tokens)
    result['exact_match_before'] = exact_match(answers, held_out)
  return result


def chat_answers(model, tokenizer, conversations, max_new_tokens: int) -> list[str]:
  """Greedy answers to each conversation's turns before its last, up to `<|eot|>`."""
  prompts = [tokenizer.format_chat(c.messages[:-1]) for c in conversations]
  answers = sampling.generate(
      model,
      prompts,
      max_new_tokens=max(max_new_tokens, 1),
      eos_ids=[*model.cfg.eos_token_ids, tokenizer.eot_id],
      pad_id=tokenizer.pad_id,
  )
  return [tokenizer.decode(ids, skip_special=True) for ids in answers]


def exact_match(answers: list[str], conversations) -> float:
  """Fraction of answers equal to the reference final turn (surrounding whitespace aside)."""
  references = [c.messages[-1]['content'] for c in conversations]
  references = [r if isinstance(r, str) else ''.join(p['text'] for p in r) for r in references]
  return sum(a.strip() == r.strip() for a, r in zip(answers, references)) / len(answers)
