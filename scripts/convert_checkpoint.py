"""Converts Hugging Face Llama 4 checkpoints to a llama4_jax workdir, and back.

  python scripts/convert_checkpoint.py --hf_dir=HF_DIR --workdir=OUT
  python scripts/convert_checkpoint.py --to_hf --workdir=OUT --hf_dir=HF_OUT [--step=N]

Streams tensor by tensor: host memory holds one Hugging Face tensor and one of our stacked
tensors (Orbax's read of it too); --to_hf, one output shard (--max_shard_gb) and an MoE layer's
two stacked gate and up projections, fused a layer at a time.
"""

from absl import flags

from llama4_jax import cli
from llama4_jax.tools import hf_convert

_HF_DIR = flags.DEFINE_string(
    'hf_dir', None, 'HF checkpoint directory (input, or output with --to_hf).'
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'llama4_jax workdir (output, or input with --to_hf).'
)
_TO_HF = flags.DEFINE_bool('to_hf', False, 'Export a workdir checkpoint to HF safetensors.')
_STEP = flags.DEFINE_integer(
    'step', None, 'With --to_hf: checkpoint step (default: latest).', lower_bound=0
)
_SHARD_GB = flags.DEFINE_float('max_shard_gb', 5.0, 'With --to_hf: safetensors shard size.')
flags.register_validator(
    'max_shard_gb', lambda gb: gb > 0, message='--max_shard_gb must be positive'
)
flags.mark_flags_as_required(['hf_dir', 'workdir'])


def main(argv):
  del argv
  if _TO_HF.value:
    files = hf_convert.workdir_to_hf(
        _WORKDIR.value, _HF_DIR.value, _STEP.value, int(_SHARD_GB.value * (1 << 30))
    )
    print(f'wrote {len(files)} safetensors file(s) and config.json to {_HF_DIR.value}')
  else:
    cfg = hf_convert.hf_to_workdir(_HF_DIR.value, _WORKDIR.value)
    print(
        f'converted {cfg.num_layers}-layer Llama 4 ({cfg.num_experts} experts) into '
        f'{_WORKDIR.value}'
    )


if __name__ == '__main__':
  cli.run_main(main)
