"""pairs: masked NSP and SOP sentence pairs from the corpus, chunk by chunk (build.py, shards.py,
instances.py, masking.py); read back with outputs.load_split."""

from tasks.pairs.config import PairsConfig, pairs_key
from tasks.stage import StageSpec

STAGE = StageSpec(name="pairs", build="tasks.pairs.build:build_pairs", upstream=("corpus", "tokenizer"),
                  section=PairsConfig, key_config=pairs_key,
                  code_modules=("tasks.pairs.masking", "tasks.pairs.instances", "tasks.pairs.shards",
                                "tasks.pairs.outputs", "tasks.corpus.outputs"),
                  resumable=True)
