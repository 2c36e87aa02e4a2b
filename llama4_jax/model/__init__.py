"""The Llama 4 network: its config and presets, layers, attention, MoE, vision tower, decoder.

The names most code needs are re-exported here (`from llama4_jax import model as model_lib`);
each concern keeps its own module.
"""

from llama4_jax.model.config import (
    EXECUTION_FIELDS,
    LLAMA4_VISION,
    PRESETS,
    REMAT_POLICIES,
    LayerKind,
    ModelConfig,
    Stage,
    layer_index_map,
    layer_stages,
)
from llama4_jax.model.llama4 import (
    Block,
    DecoderLayer,
    Llama4,
    abstract_model,
    count_params,
    decode_layout,
    merge_image_features,
    unstack_layers,
)

__all__ = [
    'EXECUTION_FIELDS',
    'LLAMA4_VISION',
    'PRESETS',
    'REMAT_POLICIES',
    'LayerKind',
    'ModelConfig',
    'Stage',
    'layer_index_map',
    'layer_stages',
    'Block',
    'DecoderLayer',
    'Llama4',
    'abstract_model',
    'count_params',
    'decode_layout',
    'merge_image_features',
    'unstack_layers',
]
