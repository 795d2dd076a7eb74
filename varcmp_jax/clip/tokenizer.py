"""The CLIP BPE tokenizer, offline.

The vocabulary comes from a user-given HF CLIP directory, or from `bpe_simple_vocab_16e6.txt.gz` shipped
inside an installed `open_clip` (open-clip-torch) or OpenAI `clip` package. The packages are located
with `importlib.util.find_spec`, which does not import them (open_clip's import needs torchvision).
Ids follow OpenAI CLIP: <|startoftext|> words <|endoftext|>, zero padded to 77; longer captions are
truncated and keep <|endoftext|> as their last token.
"""
import functools
import gzip
import html
import importlib.util
import os

import ftfy
import numpy as np

CONTEXT_LENGTH = 77
EOS_TOKEN_ID = 49407     # <|endoftext|>
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2   # OpenAI CLIP uses the first 48894 merges of the file


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode map (the BPE alphabet)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def find_bpe_file() -> str:
  """Path of the BPE merges file inside an installed open_clip or clip package, without importing it."""
  looked = []
  for package in ("open_clip", "clip"):
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
      path = os.path.join(folder, BPE_FILE)
      if os.path.isfile(path):
        return path
      looked.append(path)
  raise FileNotFoundError(
      f"No CLIP BPE vocabulary found (looked for {BPE_FILE} in {looked or 'no installed open_clip/clip package'}). "
      "Install it with `pip install --no-deps open-clip-torch`, or pass a HF CLIP directory holding "
      "vocab.json/merges.txt or tokenizer.json: tokenizer(hf_dir=...).")


def vocab_and_merges(bpe_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """OpenAI's vocabulary construction: 256 bytes, 256 bytes + </w>, one token per merge, 2 specials."""
  try:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"{bpe_path}: cannot read the gzipped BPE merges ({e})") from e
  merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
  if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f"{bpe_path}: expected {_NUM_MERGES} merge lines of two symbols each")
  alphabet = list(_bytes_to_unicode().values())
  tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}, merges


def _clean(text: str) -> str:
  """OpenAI CLIP's basic_clean; the HF fast tokenizer then lowercases and collapses whitespace."""
  return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


class Tokenizer:
  """tok(list[str] | str) -> np.int32 (N, context_length) ids; never raises on long captions."""

  def __init__(self, hf_tokenizer, context_length: int = CONTEXT_LENGTH):
    self.hf_tokenizer = hf_tokenizer
    self.context_length = context_length
    self.bos_id = hf_tokenizer.bos_token_id
    self.eos_id = hf_tokenizer.eos_token_id

  def __call__(self, texts) -> np.ndarray:
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = np.zeros((len(texts), self.context_length), np.int32)
    if not texts:
      return ids
    encoded = self.hf_tokenizer([_clean(t) for t in texts], add_special_tokens=False)["input_ids"]
    for row, words in zip(ids, encoded):
      tokens = [self.bos_id] + list(words[:self.context_length - 2]) + [self.eos_id]
      row[:len(tokens)] = tokens
    return ids


def word_counts(ids) -> np.ndarray:
  """Words per caption of token ids (..., L): the tokens between <|startoftext|> and the first <|endoftext|>."""
  return np.argmax(np.asarray(ids) == EOS_TOKEN_ID, axis=-1) - 1


@functools.lru_cache(maxsize=4)
def tokenizer(hf_dir: str | None = None, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
  """The CLIP tokenizer (built once per argument set): from `hf_dir` if given, else the packaged BPE."""
  import transformers  # pylint: disable=g-import-not-at-top
  if hf_dir is not None:
    if not any(os.path.isfile(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "vocab.json")):
      raise FileNotFoundError(f"{os.path.join(hf_dir, 'vocab.json')}: not found (nor tokenizer.json); "
                              "pass a HF CLIP directory saved with its tokenizer")
    return Tokenizer(transformers.CLIPTokenizer.from_pretrained(hf_dir), context_length)
  vocab, merges = vocab_and_merges(find_bpe_file())
  return Tokenizer(transformers.CLIPTokenizer(vocab=vocab, merges=merges), context_length)
