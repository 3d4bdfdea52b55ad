"""corpus: documents from the configured sources, cleaned, sentence-split, deduplicated and split into
train and validation (build.py); read back with outputs.load_split."""

from tasks.corpus.config import CorpusConfig, corpus_key
from tasks.stage import StageSpec

STAGE = StageSpec(name="corpus", build="tasks.corpus.build:build_corpus", section=CorpusConfig,
                  key_config=corpus_key,
                  code_modules=("tasks.sources", "tasks.text", "tasks.corpus.shards", "tasks.corpus.select"))
