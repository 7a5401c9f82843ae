"""Training data: webdataset shards in, tokenised batches out.

`reader.py` the declarative reader (open_clip's stages: shards -> split -> samples ->
decode -> batch), `stages.py` its picklable stages, `stream.py` the endless, resumable
stream the loop pulls from (and the tokenizer's text pass), `augment.py` real-world image
changes, `scenes.py` the synthetic scene grammar, `shards.py` the shard writers
(`mm shards synth|convert`). Samples are read by the one schema in `mm/samples.py`.
"""
