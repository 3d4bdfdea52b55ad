"""Text clean-up for the corpus stage: Wikipedia markup to plain text, Unicode normalisation, sentences.

Everything here is a pure function of its input, so it runs the same in every `datasets.map` worker.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import mwparserfromhell
from mwparserfromhell.nodes import ExternalLink, Heading, HTMLEntity, Tag, Text, Wikilink
from sentencex import segment

# Tags whose content is not running prose (citations, tables, formulas, galleries, code...).
# Formatting tags (bold, italics, <small>, <span>, lists...) keep their content.
_DROPPED_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap", "score",
    "syntaxhighlight", "source", "pre", "hiero", "graph", "mapframe", "maplink", "templatedata",
    "noinclude", "includeonly", "inputbox", "categorytree",
})
# Link namespaces that are not text: images and category tags (a leading ":" makes them inline links).
_DROPPED_LINK_PREFIXES = frozenset({"file", "image", "media", "category"})
# Interlanguage links look like [[de:Title]]: a language code, a colon, no display text.
_LANGUAGE_PREFIX = re.compile(r"[a-z]{2,3}(-[a-z0-9]+)*|simple")
# Sections that hold lists of citations and links rather than prose: dropped with their content.
_DROPPED_SECTIONS = frozenset({
    "references", "external links", "see also", "further reading", "notes", "footnotes", "bibliography",
    "sources", "citations", "notes and references", "works cited",
})
# Behaviour switches such as __NOTOC__ are plain Text nodes to the parser.
_MAGIC_WORD = re.compile(r"__[A-Z]+__")

# Control characters (Unicode category Cc) are removed; a tab becomes a space, and carriage return, NEL
# and the line/paragraph separators become newlines, so that they still separate words and paragraphs.
_CONTROL_TABLE = {c: None for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]}
_CONTROL_TABLE.update({ord("\t"): " ", ord("\r"): "\n", ord("\n"): "\n", 0x85: "\n", 0x2028: "\n", 0x2029: "\n"})

# Sentence terminators of Chinese and Japanese; sentencex already splits after them (checked in
# tests/test_corpus.py), this is the safety net for text where it does not (e.g. no following space).
_CJK_TERMINATOR = re.compile(r"(?<=[。！？])(?=[^。！？」』）”’])")


def wiki_to_text(markup: str) -> str:
    """Plain text of a MediaWiki article: link text kept; templates, refs, tables, files, categories,
    interlanguage links, comments and headings dropped (a heading is not a sentence), reference-like
    sections (References, External links, ...) dropped whole. Paragraphs stay on their own lines."""
    out: list[str] = []
    _strip_nodes(mwparserfromhell.parse(markup).nodes, out, top_level=True)
    return _MAGIC_WORD.sub("", "".join(out))


def _strip_nodes(nodes: list, out: list[str], top_level: bool = False) -> None:
    skip_level = 0  # > 0 while inside a dropped section, until a heading of that level or higher
    for node in nodes:
        if isinstance(node, Heading):
            if top_level:
                if skip_level and node.level > skip_level:
                    continue
                title = " ".join(str(node.title.strip_code()).lower().split())
                skip_level = node.level if title in _DROPPED_SECTIONS else 0
            out.append("\n")
        elif skip_level:
            continue
        elif isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, Wikilink):
            out.append(_link_text(node))
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag == "br":
                out.append("\n")
            elif tag not in _DROPPED_TAGS and node.contents is not None:
                _strip_nodes(node.contents.nodes, out)
        elif isinstance(node, ExternalLink):
            if node.title is not None:  # [http://... label] keeps its label; a bare URL goes
                _strip_nodes(node.title.nodes, out)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        # Template, Argument, Comment: no prose.


def _link_text(link: Wikilink) -> str:
    title = str(link.title).strip()
    if title.startswith(":"):  # [[:Category:X|...]] is an ordinary inline link
        title = title[1:]
    elif ":" in title:
        prefix = title.split(":", 1)[0].strip().lower()
        if prefix in _DROPPED_LINK_PREFIXES:
            return ""
        if link.text is None and _LANGUAGE_PREFIX.fullmatch(prefix):
            return ""
    if link.text is not None:
        parts: list[str] = []
        _strip_nodes(link.text.nodes, parts)
        return "".join(parts)
    return title


def decode_utf8(data: bytes) -> tuple[str, bool]:
    """(text, was_invalid). Invalid bytes become U+FFFD, visibly, instead of being dropped."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def normalize_paragraphs(text: str) -> list[str]:
    """NFC, control characters removed, whitespace collapsed; one string per non-empty line."""
    text = unicodedata.normalize("NFC", text.translate(_CONTROL_TABLE))
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return [line for line in lines if line]


def split_sentences(paragraph: str, language: str) -> list[str]:
    sentences = []
    for piece in segment(language, paragraph):
        sentences += (s.strip() for s in _CJK_TERMINATOR.split(piece))
    return [s for s in sentences if s]


def document_id(normalized_text: str) -> str:
    return hashlib.sha1(normalized_text.encode("utf-8")).hexdigest()


def process_document(text: str, markup: str, language: str, min_sentence_chars: int) -> dict:
    """One raw document -> id, sentences and the counts the statistics need.

    The id is the sha1 of the normalised text (paragraphs joined by newlines), so documents that
    differ only in whitespace, control characters or Unicode composition are duplicates.
    """
    if markup == "wiki":
        text = wiki_to_text(text)
    paragraphs = normalize_paragraphs(text)
    sentences: list[str] = []
    for paragraph in paragraphs:
        sentences += split_sentences(paragraph, language)
    kept = [s for s in sentences if len(s) >= min_sentence_chars]
    return {
        "id": document_id("\n".join(paragraphs)),
        "sentences": kept,
        "characters": sum(len(s) for s in kept),
        "short_sentences_dropped": len(sentences) - len(kept),
    }
