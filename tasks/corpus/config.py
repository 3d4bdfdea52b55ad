"""The corpus stage's section: which sources, and how documents are cleaned, filtered and split."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.section import Section


class SourceSpec(Section):
    """One corpus source. Exactly one of name / path / url / hf is set.

    A plain string in YAML is shorthand for {name: ...} (an embedded source of data/sources.yaml).
    """

    name: str | None = Field(None, description="embedded source, see data/sources.yaml")
    path: str | None = Field(None, description="local file or folder (.txt, .jsonl, .parquet, .xml.bz2)")
    url: str | None = Field(None, description="http(s) URL of a file in one of the local formats")
    sha256: str | None = Field(None, description="expected sha256 of the downloaded file (url only)")
    hf: str | None = Field(None, description="Hugging Face datasets id (needs a hub)")
    hf_config: str | None = None
    split: str = "train"
    # None = the embedded source's own setting (data/sources.yaml), else the default named here. Unset
    # stays distinguishable from set, also after a round trip through a saved config.
    text_field: str | None = Field(None, description="field/column with the text (.jsonl, .parquet, hf); "
                                   "default 'text'")
    format: Literal["auto", "txt", "jsonl", "parquet", "wikixml"] | None = Field(
        None, description="default auto: by each file's extension")
    txt_documents: Literal["blank_line", "file", "line"] | None = Field(
        None,
        description="how a .txt file is cut into documents: at blank lines (the default, BERT's "
        "convention), one document per file, or one per line",
    )
    max_documents: int | None = Field(None, ge=1)
    group_by: str | int | None = Field(
        None, description="records that make one document: a field / column name (.jsonl, .parquet): consecutive "
        "records with the same value of it; or a number N: every N consecutive records (lines with "
        "txt_documents: line). For corpora of one sentence per record, which NSP and SOP cannot use otherwise")

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> SourceSpec:
        kinds = [k for k in ("name", "path", "url", "hf") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(
                f"a source needs exactly one of name, path, url or hf (got {kinds or 'none'}); "
                "e.g. {name: enwiki-sample} or {path: /data/texts} or {url: https://...}"
            )
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https:// (got {self.url!r})")
        if isinstance(self.group_by, int) and (self.group_by < 1 or isinstance(self.group_by, bool)):
            raise ValueError(f"group_by must be a field name or a number of records >= 1 (got {self.group_by!r})")
        if self.sha256 is not None:
            s = self.sha256.lower()
            if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
                raise ValueError("sha256 must be 64 hexadecimal characters")
            self.__dict__["sha256"] = s
        return self

    @property
    def label(self) -> str:
        """Short name used for per-source statistics."""
        return self.name or self.hf or self.url or Path(self.path or "").name or str(self.path)


class CorpusConfig(Section):
    sources: list[SourceSpec] = Field(
        default_factory=lambda: [SourceSpec(name="enwiki-sample"), SourceSpec(name="bbc-news")]
    )
    language: str = Field("en", description="ISO code for the sentence splitter (sentencex)")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    min_sentence_chars: int = Field(2, ge=1)
    min_document_sentences: int = Field(2, ge=1, description="shorter documents are dropped")
    max_documents: int | None = Field(None, ge=1, description="cap on documents kept, after dedupe")
    shard_documents: int = Field(5000, ge=1, description="raw documents per cleaning shard (one task each; "
                                 "memory per worker: one shard's cleaned rows at most)")
    dedupe: bool = True
    max_bad_char_share: float = Field(
        0.2, gt=0.0, le=1.0, description="a text file whose sampled characters are more than this share invalid "
        "UTF-8 or control characters is refused (it is binary or not UTF-8); a folder's empty and binary files "
        "are skipped and listed")
    max_dropped_share: float = Field(0.25, ge=0.0, le=1.0, description="more than this share of a source's "
                                     "documents dropped (too short, duplicates) is a warning in the run summary")

    @field_validator("sources", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": s} if isinstance(s, str) else s for s in v]
        return v

    @field_validator("sources")
    @classmethod
    def _non_empty(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        if not v:
            raise ValueError("at least one source is needed, e.g. sources: [enwiki-sample]")
        return v


def output_section(cfg) -> dict[str, Any]:
    """The corpus section less what decides only how the work is cut (the output does not depend on it)."""
    return {k: v for k, v in cfg.section("corpus").items() if k != "shard_documents"}


def corpus_key(cfg) -> dict[str, Any]:
    """What decides the output: the corpus section, the local files (by stat, not content), and the
    embedded sources' manifest entries (their checksums pin the fetched data)."""
    from tasks.sources import embedded_sources, local_input_stats

    sources = cfg.corpus.sources
    return {
        "corpus": output_section(cfg),
        "local_inputs": [local_input_stats(s, i) for i, s in enumerate(sources) if s.path],
        "embedded": {s.name: embedded_sources().get(s.name) for s in sources if s.name},
    }
