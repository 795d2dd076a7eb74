"""Records against config, before anything compiles (SPEC section 3).

  records_check.check(config, split, manifest)   # RecordsMismatch: the config field, the records, the fix

Everything the config will read is checked against the split's entry in manifest.json (`varcmp prep` and
`varcmp extract-features` write per split the shape and dtype of every field and, in `fields`, how many
records hold each optional one): the video input (frames and their size, or features, their width and the
region tokens), the audio input (mel bins x frames, or audio features and their width), the external prior,
the captions of a text model, and T. A manifest without shapes (hand-written) is not checked here; the
pipeline still names a record that lacks a field.

T: config.data.snippets may be smaller than the records' snippets (each batch takes a uniform subsample
over the whole video) but not larger: padding every video with empty snippets would only waste compute
and mask, so it is an error.
"""
import math
import pathlib

from varcmp_jax import config as config_lib


class RecordsMismatch(ValueError):
  """The records cannot feed this config; the message has one line per mismatch, each with its fix."""


def problems(config, split_info: dict, manifest: dict) -> list[str]:
  """One message per mismatch between `config` and a manifest split entry (empty: the records fit)."""
  shapes, records = split_info.get("shapes"), split_info.get("records", 0)
  if not isinstance(shapes, dict) or not shapes:
    return []
  fields = split_info.get("fields")
  if fields is None:   # manifests from before `fields`: only mel was counted
    fields = {"mel": split_info.get("mel_records", records)}

  def count(field):   # records holding `field`
    return fields.get(field, records) if field in shapes else 0

  def holding(field):
    return f"and {count(field)} of {records} records have it" if count(field) else "and the records have none"

  out, m = [], config.model
  # The video side.
  if config.regime == "frames":
    size = shapes["frames"][1] if "frames" in shapes else None
    if size is None:
      out.append("regime='frames' needs `frames`, and the records have none (feature records): set "
                 "--config.regime=features (released features: configs/ucfcrime_ar.py:released, "
                 "configs/xdviolence_ar.py:released)")
    elif size != m.clip.vision.image_size:
      out.append(f"model.clip.vision.image_size={m.clip.vision.image_size}, the records' frames are {size} x {size}: "
                 f"set --config.model.clip.vision.image_size={size}, or re-run `varcmp prep` with --image-size "
                 f"{m.clip.vision.image_size}")
  else:
    width, dim = config_lib.stored_video_width(m), config_lib.video_feature_dim(m)
    field = (f"model.video_features.dim={dim}" if dim else
             f"model.video_features.dim=0 (CLIP joint-space features, model.clip.projection_dim={width} wide)")
    got = shapes["features"][-1] if "features" in shapes else None
    if count("features") < records:
      out.append(f"regime='features' needs `features` in every record, {holding('features')}: run `varcmp "
                 "extract-features` on frame records, or `varcmp prep --visual-features PATTERN "
                 "--visual-clip-seconds S`, or set --config.regime=frames")
    elif got != width:
      fix = f"set --config.model.video_features.dim={got}"
      if got == m.clip.projection_dim:
        fix += " (a learned projection), or 0 if they are CLIP joint-space features"
      out.append(f"{field}: the records' features are {got} wide: {fix}")
    if config_lib.uses_regions(config):
      regions = shapes.get("regions")
      if regions is None:
        out.append(f"loss.levels.spatial={config.loss.levels.spatial} needs region tokens, and the records have "
                   "no `regions` (released features): set --config.loss.levels.spatial=0")
      elif regions[1] != m.region_grid ** 2:
        grid = math.isqrt(regions[1])
        fix = (f"set --config.model.region_grid={grid}" if grid * grid == regions[1] else
               "re-run `varcmp extract-features` with a --region-grid")
        out.append(f"model.region_grid={m.region_grid} gives {m.region_grid ** 2} regions, the records hold "
                   f"{regions[1]}: {fix}")
      elif regions[-1] != width and got == width:   # (a features width mismatch is already reported)
        out.append(f"{field}: the records' regions are {regions[-1]} wide, and regions must have the features' "
                   "width")
  # The query side.
  if config.task == "text":
    missing = records - fields.get("caption", 0 if manifest.get("task") == "audio" else records)
    if missing:
      out.append(f"task='text' needs a caption in every record, and {missing} of {records} have none (written by "
                 "`varcmp prep --task audio`): use an audio config (--config.task=audio, e.g. "
                 "configs/xdviolence_ar.py), or re-run prep with --task text and a captions table")
  elif m.audio.kind == "spectrogram":
    if count("mel") < records:
      fix = ("set --config.model.audio.kind=features" if count("audio_features") == records else
             "re-run `varcmp prep` on the videos with --task audio")
      out.append(f"model.audio.kind='spectrogram' needs a log-mel `mel` in every record, {holding('mel')}: {fix}")
    elif tuple(shapes["mel"][1:]) != (m.audio.mel_frames, m.audio.mel_bins):
      frames, bins = shapes["mel"][1:]
      out.append(f"model.audio.mel_frames x mel_bins = {m.audio.mel_frames} x {m.audio.mel_bins}, the records' mel "
                 f"is {frames} x {bins}: set --config.model.audio.mel_frames={frames} "
                 f"--config.model.audio.mel_bins={bins}")
  elif count("audio_features") < records:
    fix = ("set --config.model.audio.kind=spectrogram" if count("mel") == records else
           "re-run `varcmp prep` with --audio-features PATTERN --audio-clip-seconds S")
    out.append(f"model.audio.kind='features' needs `audio_features` in every record, {holding('audio_features')}: "
               f"{fix}")
  elif shapes["audio_features"][-1] != m.audio.feature_dim:
    width = shapes["audio_features"][-1]
    out.append(f"model.audio.feature_dim={m.audio.feature_dim}, the records' audio features are {width} wide: set "
               f"--config.model.audio.feature_dim={width}")
  if config.prior.source != "head" and count("prior") < records:
    out.append(f"prior.source={config.prior.source!r} needs an external `prior` in every record, {holding('prior')}: "
               "set --config.prior.source=head, or re-run `varcmp prep` with --prior PATTERN --prior-clip-seconds S")
  # T.
  video_key = "frames" if config.regime == "frames" else "features"
  stored = shapes[video_key][0] if video_key in shapes else None
  if stored is not None and config.data.snippets > stored:
    out.append(f"data.snippets={config.data.snippets}, the records hold {stored} snippets per video (padding would "
               f"add only empty snippets): set --config.data.snippets={stored}, or re-run `varcmp prep` with "
               f"--snippets {config.data.snippets}")
  return out


def check(config, split: str, manifest: dict) -> None:
  """Raises RecordsMismatch when the `split` entry of config.data.records' manifest cannot feed `config`."""
  found = problems(config, manifest["splits"].get(split, {}), manifest)
  if found:
    where = pathlib.Path(config.data.records) / "manifest.json"
    raise RecordsMismatch(f"the {split!r} records of {where} do not fit the config:\n  " + "\n  ".join(found))


def check_size(config, split: str, manifest: dict) -> None:
  """RecordsMismatch when `split` holds no records or, as the train split, fewer records than a train batch:
  each batch would then hold some video twice, and the contrastive loss would count its copy as a negative of it
  (the InfoNCE diagonal assumes B distinct videos)."""
  where = pathlib.Path(config.data.records) / "manifest.json"
  records = manifest["splits"].get(split, {}).get("records", 0)
  field = "data.train_split" if split == config.data.train_split else "data.eval_split"
  if not records:
    raise RecordsMismatch(f"{field}={split!r}: that split of {where} has no records (its videos were all skipped, "
                          f"see `skipped` there, or the table has none): re-run `varcmp prep`, or set "
                          f"--config.{field} to a split with records")
  batch = config.train.batch_size
  if split == config.data.train_split and batch > records:
    raise RecordsMismatch(f"train.batch_size={batch}, and the {split!r} split of {where} holds {records} records: "
                          f"every batch would repeat videos (the contrastive loss needs {batch} distinct ones): set "
                          f"--config.train.batch_size to at most {records} (a multiple of the device count)")


# ---- the caption word budget (config.model.max_words) -------------------------------------------------


def caption_words(split_info: dict) -> dict[int, int] | None:
  """{words: captions} of a manifest split (`varcmp prep` counts them); None for manifests written before."""
  histogram = split_info.get("caption_words")
  return None if histogram is None else {int(words): int(n) for words, n in histogram.items()}


def describe_words(histogram: dict[int, int]) -> str:
  """'p50 17, p99 38, max 50 words' of a {words: captions} histogram."""
  lengths = sorted(w for w, n in histogram.items() for _ in range(n))
  if not lengths:
    return "no captions"
  at = lambda q: lengths[min(len(lengths) - 1, math.ceil(q * len(lengths)) - 1)]
  return f"p50 {at(0.5)}, p99 {at(0.99)}, max {lengths[-1]} words"


def word_budget(config, manifest: dict, splits) -> tuple[int, list[str]]:
  """(the word budget config.model.max_words resolves to, one note per split whose captions exceed it).

  max_words = 0 sizes the budget to the longest caption of `splits` (nothing is cut); a manifest that does not
  count caption words (written before `varcmp prep` did) keeps all 75 words, with a note saying so.
  """
  budget = int(config.model.get("max_words", 0))
  histograms = {split: caption_words(manifest["splits"].get(split, {})) for split in dict.fromkeys(splits)}
  if budget == 0:
    known = [h for h in histograms.values() if h]
    if not known or any(h is None for h in histograms.values()):
      return config_lib.MAX_WORDS, [f"{pathlib.Path(config.data.records) / 'manifest.json'} does not count caption "
                                    f"words (records from an older `varcmp prep`): the text tower reads all "
                                    f"{config_lib.MAX_WORDS}; set --config.model.max_words to the longest caption"]
    budget = max(max(h) for h in known)
    budget = min(max(budget, 1), config_lib.MAX_WORDS)
  notes = []
  for split, histogram in histograms.items():
    over = sum(n for words, n in (histogram or {}).items() if words > budget)
    if over:
      notes.append(f"{over} of {sum(histogram.values())} {split!r} captions have more than model.max_words={budget} "
                   f"words ({describe_words(histogram)}): only their first {budget} words are read")
  return budget, notes
