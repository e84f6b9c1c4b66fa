"""Deprecated: the parcae_lm format moved to stabilitylab.formats.parcae_lm (docs/formats.md).

This module re-exports its names for one release and warns on import. It is the one
place model/ imports formats/ (the architecture test allows exactly this file); it goes
in the next release.
"""

import warnings

from stabilitylab.formats.parcae_lm import (WEIGHT_FILES, CheckpointError, KeyMapping,  # noqa: F401
                                            ParcaeCheckpoint, from_parcae, gpt_split, is_parcae_checkpoint,
                                            key_map, load_parcae_checkpoint, model_config, parcae_config,
                                            save_parcae_checkpoint, to_parcae, value_embedding_layers)

warnings.warn("stabilitylab.model.imports is deprecated: import stabilitylab.formats.parcae_lm (or use "
              "stabilitylab.formats.load); this alias goes in the next release", DeprecationWarning, stacklevel=2)

__all__ = ["CheckpointError", "ParcaeCheckpoint", "KeyMapping", "load_parcae_checkpoint", "save_parcae_checkpoint",
           "is_parcae_checkpoint", "model_config", "parcae_config", "key_map", "from_parcae", "to_parcae",
           "gpt_split", "value_embedding_layers", "WEIGHT_FILES"]
