"""The offline CLIP tokenizer against hand-checked ids and against open_clip's SimpleTokenizer."""
import importlib.util
import os
import sys

import numpy as np
import pytest

from varcmp_jax import clip
# `clip.tokenizer` is the function; the module is imported by its full name.
from varcmp_jax.clip.tokenizer import find_bpe_file, vocab_and_merges


def _open_clip_simple_tokenizer():
  """open_clip's reference tokenizer module, loaded from its file: `import open_clip` needs torchvision."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    pytest.skip("open_clip is not installed")
  path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
  module_spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.SimpleTokenizer()


def test_known_ids():
  ids = clip.tokenizer()(["a photo of a cat"])
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert not ids[0, 7:].any()


def test_long_caption_is_truncated_with_eos_last():
  ids = clip.tokenizer()(["word " * 200, "a photo of a cat"])
  assert ids.shape == (2, 77)
  assert ids[0, 0] == 49406 and ids[0, 76] == 49407
  assert (ids[0, 1:76] != 49407).all() and (ids[0, 1:76] != 0).all()


def test_empty_and_single_string():
  tok = clip.tokenizer()
  assert tok([""])[0, :3].tolist() == [49406, 49407, 0]
  assert tok("a photo of a cat").shape == (1, 77)
  assert tok([]).shape == (0, 77)


def test_matches_open_clip_simple_tokenizer():
  reference = _open_clip_simple_tokenizer()
  texts = ["a photo of a cat", "A MAN &amp; a dog   fighting!! on the street at 3:45pm, café",
           "Ünïcödé 東京 😀 it's they're", "  leading and trailing  ", "Explosion" * 40,
           "Two men are fighting in the parking lot while a car drives past."]
  np.testing.assert_array_equal(clip.tokenizer()(texts), reference(texts).numpy())


def test_vocabulary_size_and_does_not_import_open_clip():
  vocab, merges = vocab_and_merges(find_bpe_file())
  assert (len(vocab), len(merges)) == (49408, 48894)
  assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
  assert "open_clip" not in sys.modules


def test_from_hf_directory(tmp_path):
  clip.tokenizer().hf_tokenizer.save_pretrained(str(tmp_path))
  ids = clip.tokenizer(str(tmp_path))(["a photo of a cat"])
  assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_errors_name_the_missing_file(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    clip.tokenizer(str(tmp_path))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps open-clip-torch"):
    find_bpe_file()
  bad = tmp_path / "bpe.txt.gz"
  bad.write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="bpe.txt.gz"):
    vocab_and_merges(str(bad))
