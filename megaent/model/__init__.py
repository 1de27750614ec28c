"""megaent.model: the policy over TP x PP (megatron-core layers), HF load/save.

Families (`megaent.model.arch.FAMILIES`): Qwen2, Llama, Qwen3, Mistral, and the MoE ones, Qwen3-MoE and Mixtral
(router statistics in `megaent.model.moe`; expert parallelism on megatron-core's GPTModel only, the own decoder's
experts are `megaent.model.sparse_moe`).

`load_hf(dir, state)` / `build_policy(arch, state)` give this rank's `Policy`
stage; `save_hf(policy, state, out_dir)` writes a HF checkpoint; `KVCache` /
`new_kv_cache` serve incremental decoding; `hf_names` holds the pure name table
and TP split/merge helpers.
"""
from megaent.model.arch import SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, ModelArch, stage_layer_ranges
from megaent.model.cache import KVCache, new_kv_cache
from megaent.model.hf_io import load_hf, save_hf
from megaent.model.hf_names import (hf_to_megaent, megaent_to_hf, merge_tp, model_param_specs, padded_vocab_size,
                                    split_tp)
from megaent.model.policy import Policy, build_policy

__all__ = ["KVCache", "ModelArch", "Policy", "SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES", "build_policy",
           "hf_to_megaent", "load_hf", "megaent_to_hf", "merge_tp", "model_param_specs", "new_kv_cache",
           "padded_vocab_size", "save_hf", "split_tp", "stage_layer_ranges"]
