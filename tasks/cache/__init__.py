"""cache: the teacher's outputs over every pairs example (top-k soft labels, hidden states), computed once
for the students (build.py); read back with outputs.CachedPairs."""

from tasks.cache.config import CacheConfig, cache_key, check_layers
from tasks.stage import StageSpec

# tasks.engine is left out of code_modules on purpose: the padding and device helpers used here do not
# change the values, and an engine change must not throw away a cache of many GB.
STAGE = StageSpec(name="cache", build="tasks.cache.build:build_cache", upstream=("teacher", "pairs"),
                  section=CacheConfig, key_config=cache_key, checks=(check_layers,),
                  code_modules=("tasks.cache.outputs",), resumable=True)
