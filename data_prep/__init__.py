"""Raw videos and caption tables -> ArrayRecord shards (prep), the procedural benchmark (synth), TFDS builders."""
