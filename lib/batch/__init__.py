"""Batch classification (operations): a folder or an s3:// prefix of images through the served ONNX model of a
published version or a run folder, resumable, shardable across AWS Batch array jobs or Kubernetes indexed Jobs.

images.py: listing, reading, decoding and sharding the images; manifest.py: the fixed file list every shard of a
run reads (`python -m lib.batch plan`); outputs.py: the output files and how they are written; classify.py: the run;
summary.py: class counts, the contact sheet of the least confident images, and the merge of shard outputs, checked
against the manifest. Imports go one way: classify -> summary -> manifest -> images, and outputs below them.
`python -m lib.batch --help` (CLI in __main__.py).
"""
