"""Batch classification (operations): a folder or an s3:// prefix of images through the served ONNX model of a
published version or a run folder, resumable, shardable across AWS Batch array jobs or Kubernetes indexed Jobs.

images.py: listing, reading, decoding and sharding the images; classify.py: the run and its output files;
summary.py: class counts, the contact sheet of the least confident images, and the merge of shard outputs.
`python -m lib.batch --help` (CLI in __main__.py).
"""
