"""scripts/eval.py on a converted random model against transformers' loss."""

import json
import os
import subprocess
import sys

import numpy as np
import torch

import hf_reference
from llama4_jax import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_window_loss(hf_model, windows):
  with torch.no_grad():
    logits = hf_model(input_ids=torch.as_tensor(windows[:, :-1], dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(
        logits.double().reshape(-1, logits.shape[-1]),
        torch.as_tensor(windows[:, 1:], dtype=torch.long).reshape(-1))
  return float(nll)


def test_eval_loss_equals_transformers(tmp_path):
  hf = hf_reference.text_model(num_experts_per_tok=2)
  hf.save_pretrained(tmp_path / 'hf', max_shard_size='100KB')
  subprocess.run([sys.executable, 'scripts/convert_checkpoint.py', f'--hf_dir={tmp_path}/hf',
                  f'--workdir={tmp_path}/ours'], check=True, cwd=REPO, capture_output=True)
  tokens = np.random.default_rng(0).integers(0, 128, 1000).astype(np.int32)
  np.save(tmp_path / 'tokens.npy', tokens)
  result = subprocess.run(
      [sys.executable, 'scripts/eval.py', f'--workdir={tmp_path}/ours',
       f'--tokens={tmp_path}/tokens.npy', '--seq_len=32', '--batch_size=8',
       f'--output={tmp_path}/result.json'], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  ours = json.loads((tmp_path / 'result.json').read_text())

  windows = evaluation.token_windows(tokens, 32)
  assert windows.shape == (30, 33) and ours['tokens'] == 30 * 32  # 10 leftover tokens dropped
  reference = hf_window_loss(hf, windows)
  assert reference > 1.0
  assert abs(ours['loss'] - reference) / reference <= 1e-5
  assert abs(ours['perplexity'] - np.exp(reference)) / np.exp(reference) <= 1e-4


def test_eval_rejects_out_of_vocabulary_tokens(tmp_path):
  hf_reference.text_model().save_pretrained(tmp_path / 'hf')
  subprocess.run([sys.executable, 'scripts/convert_checkpoint.py', f'--hf_dir={tmp_path}/hf',
                  f'--workdir={tmp_path}/ours'], check=True, cwd=REPO, capture_output=True)
  np.save(tmp_path / 'tokens.npy', np.array([1, 2, 500] * 50))
  result = subprocess.run([sys.executable, 'scripts/eval.py', f'--workdir={tmp_path}/ours',
                           f'--tokens={tmp_path}/tokens.npy', '--seq_len=8'],
                          cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 1 and 'tokens.npy' in result.stderr and '500' in result.stderr
