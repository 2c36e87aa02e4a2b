"""Trains Llama 4 from a config; running it again on the same workdir resumes.

  python scripts/train.py --config=configs/tiny.py --workdir=/tmp/llama4_tiny \\
      [--config.train.steps=100 ...]

Multi-process runs (TPU pods, SLURM, or explicit --coordinator_address,
--num_processes, --process_id) call jax.distributed.initialize first.
"""

import os

import jax
from absl import flags

from llama4_jax import cli, trainer

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and logs go.', required=True)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.', lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process (0..num_processes-1).', lower_bound=0
)


def initialize_distributed():
  """jax.distributed for multi-process runs: explicit flags, else cluster auto-detection.

  Must run before anything touches a device. CPU processes talk through gloo.
  """
  explicit = bool(_COORDINATOR.value)
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  tpu_pod = 'TPU_WORKER_HOSTNAMES' in os.environ or 'MEGASCALE_COORDINATOR_ADDRESS' in os.environ
  if not (explicit or slurm or tpu_pod):
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  else:
    jax.distributed.initialize()  # reads SLURM / TPU metadata


def main(argv):
  del argv
  initialize_distributed()
  result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0 and 'eval_loss' in result:
    baseline = (
        f' (best unigram model of the same data: {result["unigram_loss"]:.4f})'
        if 'unigram_loss' in result
        else ''
    )
    print(f'final validation loss {result["eval_loss"]:.4f} at step {result["step"]}{baseline}')
    if result.get('sample'):
      print(f'sample: {result["sample"]!r}')
    if 'qa_accuracy' in result:
      by_question = ', '.join(f'{k} {v:.1%}' for k, v in result['qa_accuracy_by_question'].items())
      print(
          f'held-out answer accuracy {result["qa_accuracy"]:.1%} over {result["qa_questions"]} '
          f'questions ({by_question}); best text-only answer: {result["text_only_accuracy"]:.1%}'
      )
    if 'eval_loss_before' in result:
      print(f'validation loss before fine-tuning {result["eval_loss_before"]:.4f}')
    if 'exact_match' in result:
      before = result.get('exact_match_before')
      print(
          f'held-out exact match {result["exact_match"]:.1%} over '
          f'{result["exact_match_conversations"]} conversations'
          + (f' ({before:.1%} before fine-tuning)' if before is not None else '')
      )


if __name__ == '__main__':
  cli.run_main(main, repeats_steps=True)
