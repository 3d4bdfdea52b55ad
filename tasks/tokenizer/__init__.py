"""tokenizer: a WordPiece vocabulary trained on the corpus, or the pretrained teacher's own (build.py)."""

from tasks.stage import StageSpec
from tasks.tokenizer.config import TokenizerConfig, tokenizer_key

STAGE = StageSpec(name="tokenizer", build="tasks.tokenizer.build:build_tokenizer", upstream=("corpus",),
                  section=TokenizerConfig, key_config=tokenizer_key, code_modules=("tasks.corpus.outputs",))
